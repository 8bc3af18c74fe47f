"""A run that goes wrong: a layer whose forward takes log() of a value that turns negative mid-run.

Training on the 8x8 digits is healthy until step --break-at, when a "feature scaling" layer starts
producing NaN. Under tui_debug the report names the layer (model.2 (LogScale)) and the step.

    python -m tui_debug examples/nan_midrun.py
"""

import argparse

import torch
import torch.nn as nn
from sklearn.datasets import load_digits


class LogScale(nn.Module):
    """log(1 + x * scale); the scale is wrongly decayed below zero after a while (the bug)."""

    def __init__(self, break_at: int) -> None:
        super().__init__()
        self.calls = 0
        self.break_at = break_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        scale = 1.0 if self.calls < self.break_at else -5.0
        return torch.log1p(x * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--break-at", type=int, default=120)
    args = parser.parse_args()

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), LogScale(args.break_at), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (64,))
        optimizer.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    print(f"final loss {loss.item()}")


if __name__ == "__main__":
    main()
