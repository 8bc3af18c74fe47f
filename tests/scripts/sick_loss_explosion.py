"""Sick: linear regression with a learning rate too high. The inputs have unit variance, so plain SGD on
the MSE is stable only for lr < 1.0 (and less with minibatch noise); at lr=1.2 the loss grows ~3x per
step (1e5x every 10 steps) and first reaches inf at about step 85. tui_debug must warn (loss_error,
warning) while the loss is still finite, within the first few tens of steps."""

import argparse

import torch
import torch.nn as nn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1.2)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    true_w = torch.randn(16, 1)
    model = nn.Linear(16, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    first_nonfinite = None
    for step in range(args.steps):
        x = torch.randn(128, 16)
        y = x @ true_w + 0.1 * torch.randn(128, 1)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        if first_nonfinite is None and not torch.isfinite(loss):
            first_nonfinite = step + 1
        if step % 10 == 0:
            print(f"step {step + 1:4d}  loss {loss.item():.4g}", flush=True)
    print(f"first non-finite loss at step {first_nonfinite}")


if __name__ == "__main__":
    main()
