"""Sick: --kind dead: a ReLU layer behind a bias of -10 (every unit dead); --kind saturated: a tanh layer
fed with weights 50x too large (outputs pinned at +-1); --kind update: Adam with lr=1 on small weights
(each update far larger than the weight); --kind stall: a dataset that takes 3 ms per sample."""

import argparse
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset


class Slow(Dataset):
    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, i: int):
        time.sleep(0.003)
        x = torch.randn(10)
        return x, x.sum(0, keepdim=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kind", choices=["dead", "saturated", "update", "stall"], required=True)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    act = nn.Tanh() if args.kind == "saturated" else nn.ReLU()
    model = nn.Sequential(nn.Linear(10, 64), act, nn.Linear(64, 1))
    with torch.no_grad():
        if args.kind == "dead":
            model[0].bias.fill_(-10.0)
        if args.kind == "saturated":
            model[0].weight.mul_(50.0)
        if args.kind == "update":
            for prm in model.parameters():
                prm.mul_(0.01)
    lr = 1.0 if args.kind == "update" else 1e-3
    opt = torch.optim.Adam(model.parameters(), lr=lr) if args.kind == "update" else torch.optim.SGD(
        model.parameters(), lr=lr)
    if args.kind == "stall":
        batches = iter(DataLoader(Slow(), batch_size=8))
    for step in range(args.steps):
        if args.kind == "stall":
            x, y = next(batches)
        else:
            x = torch.randn(32, 10)
            y = x.sum(1, keepdim=True)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    print("done", flush=True)


if __name__ == "__main__":
    main()
