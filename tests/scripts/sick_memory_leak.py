"""Sick: a memory leak. Each step also computes a validation loss, but without torch.no_grad(), and keeps
it as a tensor in a list "for the plot at the end": every kept loss holds its autograd graph and with it
the activations saved for backward (~0.8 MiB per step). RSS grows steadily; tui_debug must warn
(memory_error, warning) with the growth rate.

It trains for at least --seconds (memory is sampled about once a second, and a leak is judged over at
least 8 samples) and at least --steps steps."""

import argparse
import time

import torch
import torch.nn as nn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seconds", type=float, default=11.0)
    p.add_argument("--max-steps", type=int, default=3000)  # bounds the leak (~0.8 MiB a step)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    w_true = torch.randn(128, 10)
    val_x = torch.randn(128, 128)
    val_y = (val_x @ w_true).argmax(1)
    val_losses = []  # the leak: tensors with their graphs
    t0 = time.perf_counter()
    step = 0
    while step < args.max_steps and (step < args.steps or time.perf_counter() - t0 < args.seconds):
        xb = torch.randn(64, 128)
        yb = (xb @ w_true).argmax(1)
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        val_losses.append(criterion(model(val_x), val_y))  # should be .item() under torch.no_grad()
        step += 1
        if step % 200 == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}  val {val_losses[-1].item():.4f}", flush=True)
    print(f"{step} steps in {time.perf_counter() - t0:.1f}s; kept {len(val_losses)} validation losses")


if __name__ == "__main__":
    main()
