"""Sick (performance): one slow step. An MLP regression with ~10 ms steps whose last batch comes from a
shard on a slow network disk: fetching it stalls for 0.5 s. tui_debug must report the slow step
(timeout_error, severity info) with its duration and the median."""

import argparse
import time

import torch
import torch.nn as nn


def batches(n_steps: int, slow_at: int, stall: float):
    w = torch.randn(256, 1)
    for i in range(1, n_steps + 1):
        if i == slow_at:
            time.sleep(stall)  # the slow shard
        x = torch.randn(256, 256)
        yield x, x @ w + 0.1 * torch.randn(256, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--slow-at", type=int, default=200)
    p.add_argument("--stall", type=float, default=0.5)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    last = time.perf_counter()
    times = []
    for step, (x, y) in enumerate(batches(args.steps, args.slow_at, args.stall), start=1):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    times.sort()
    print(f"median step {times[len(times) // 2] * 1e3:.1f} ms; slowest {times[-1]:.3f} s")


if __name__ == "__main__":
    main()
