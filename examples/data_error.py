"""A data pipeline that breaks mid-epoch: one corrupt record makes a DataLoader worker raise.

    python -m tui_debug examples/data_error.py

tui_debug classifies it as a data_error and keeps the dataset's original traceback (the worker,
the sample index, the line in __getitem__) in the report.
"""

import argparse

import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset


class DigitsFile(Dataset):
    """Digits "read from disk"; record 1234 is corrupt (a truncated row)."""

    def __init__(self) -> None:
        digits = load_digits()
        self.rows = [list(r) for r in digits.data]
        self.labels = list(digits.target)
        self.rows[1234] = self.rows[1234][:40]  # the corruption

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        if len(row) != 64:
            raise ValueError(f"record {i}: expected 64 pixels, got {len(row)}")
        return torch.tensor(row, dtype=torch.float32) / 16.0, int(self.labels[i])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    loader = DataLoader(DigitsFile(), batch_size=32, shuffle=True, num_workers=args.workers)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(args.epochs):
        for step, (x, y) in enumerate(loader):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch}: loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
