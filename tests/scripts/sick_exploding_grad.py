"""Sick: exploding gradients from a corrupted data shard. A deep MLP classifier (6 hidden layers) trains
healthily on the 8x8 digits; at --bad-at a shard whose pixels were not scaled (0..16 instead of 0..1,
and brightened by a preprocessing bug: x100) arrives for --bad-steps steps. The gradients jump by orders
of magnitude; tui_debug must warn (gradient_error, warning) and name the layers."""

import argparse

import torch
import torch.nn as nn
from sklearn.datasets import load_digits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--bad-at", type=int, default=150)
    p.add_argument("--bad-steps", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    layers: list[nn.Module] = []
    width = 64
    for _ in range(6):
        layers += [nn.Linear(width, 128), nn.ReLU()]
        width = 128
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (64,))
        xb, yb = x[idx], y[idx]
        if args.bad_at <= step < args.bad_at + args.bad_steps:
            xb = xb * 16.0 * 100.0  # the corrupted shard
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or args.bad_at <= step < args.bad_at + args.bad_steps:
            print(f"step {step + 1:4d}  loss {loss.item():.4g}", flush=True)


if __name__ == "__main__":
    main()
