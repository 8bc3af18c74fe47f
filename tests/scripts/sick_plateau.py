"""Sick (optimisation, info): a learning rate far too small. Logistic regression on the 8x8 digits,
full batch, SGD at lr=1e-7: the loss does not move for over a thousand steps. tui_debug must report the
plateau (optimization_error, severity info) naming the loss."""

import argparse

import torch
import torch.nn as nn
from sklearn.datasets import load_digits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=1300)
    p.add_argument("--lr", type=float, default=1e-7)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Linear(64, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    criterion = nn.CrossEntropyLoss()
    for step in range(args.steps):
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        if step % 200 == 0:
            print(f"step {step + 1:5d}  loss {loss.item():.6f}", flush=True)


if __name__ == "__main__":
    main()
