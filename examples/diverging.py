"""A run destroyed by a learning rate far too high: linear regression whose loss explodes to inf/NaN.

    python examples/diverging.py                              # the loss ends as nan
    python -m tui_debug --recover auto examples/diverging.py  # tui_debug saves it

Under --recover auto, tui_debug warns while the loss is still finite, halves the learning rate,
skips the steps whose gradients went non-finite, rolls back to the last good snapshot, and the run
ends with finite parameters and a low loss.
"""

import argparse

import torch
import torch.nn as nn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.3)
    args = p.parse_args()
    torch.manual_seed(0)
    true_w = torch.randn(10, 1)
    model = nn.Linear(10, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    worst = 0.0
    for step in range(args.steps):
        x = 3 * torch.randn(64, 10)
        y = x @ true_w
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        worst = max(worst, loss.item()) if loss.item() == loss.item() else float("inf")
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.4g}  lr {optimizer.param_groups[0]['lr']:.3g}", flush=True)
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    print(f"final loss {loss.item():.4g}; worst loss {worst:.4g}; parameters finite: {finite}")


if __name__ == "__main__":
    main()
