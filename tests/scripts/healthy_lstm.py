"""Healthy: an LSTM forecaster on noisy sine waves (random frequency, phase and amplitude): predict the
next value at every position. Adam, ReduceLROnPlateau on a held-out set, gradient clipping at 1.0."""

import argparse
import math

import torch
import torch.nn as nn


def make_batch(n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(length + 1, dtype=torch.float32)
    freq = 0.05 + 0.25 * torch.rand(n, 1)
    phase = 2 * math.pi * torch.rand(n, 1)
    amp = 0.5 + torch.rand(n, 1)
    series = amp * torch.sin(freq * t + phase) + 0.05 * torch.randn(n, length + 1)
    return series[:, :-1, None], series[:, 1:, None]


class Forecaster(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, num_layers=2, batch_first=True, dropout=0.1)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--length", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(1)  # small model on a shared CPU: one thread is fastest
    torch.manual_seed(0)
    model = Forecaster()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=2)
    criterion = nn.MSELoss()
    val_x, val_y = make_batch(256, args.length)
    for step in range(args.steps):
        model.train()
        xb, yb = make_batch(32, args.length)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(xb), yb)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0:
            model.eval()
            with torch.no_grad():
                val = criterion(model(val_x), val_y).item()
            scheduler.step(val)
            print(f"step {step + 1:4d}  train loss {loss.item():.4f}  val loss {val:.4f}  "
                  f"lr {optimizer.param_groups[0]['lr']:.1e}", flush=True)


if __name__ == "__main__":
    main()
