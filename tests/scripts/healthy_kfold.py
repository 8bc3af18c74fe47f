"""Healthy: 3-fold cross-validation, a fresh model, Adam and scheduler per fold, the same training loop.

Each fold starts from a high loss again, after the last one ended near its best: a monitor must not
take that for an explosion, must count the folds' steps one after the other, and must not keep a
finished fold's model alive (the script prints whether each one was freed, as plain Python frees it).
Loading a fold's data takes 0.4 s (the first step of each fold is slow for a reason)."""

import argparse
import gc
import time
import weakref

import torch
import torch.nn as nn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(600, 16)
    y = (x[:, :4].sum(dim=1) > 0).long() + (x[:, 4] > 1).long()
    fold_size = len(x) // args.folds
    finished: list[weakref.ref] = []
    for fold in range(args.folds):
        time.sleep(0.4)  # the fold's data
        held_out = torch.arange(fold * fold_size, (fold + 1) * fold_size)
        train = torch.ones(len(x), dtype=torch.bool)
        train[held_out] = False
        xt, yt = x[train], y[train]
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3))
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.5)
        loss_fn = nn.CrossEntropyLoss()
        for step in range(args.steps):
            i = torch.randint(0, len(xt), (64,))
            loss = loss_fn(model(xt[i]), yt[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        with torch.no_grad():
            acc = (model(x[held_out]).argmax(1) == y[held_out]).float().mean().item()
        print(f"fold {fold}: loss {loss.item():.4f}, held-out accuracy {acc:.3f}", flush=True)
        finished.append(weakref.ref(model[0].weight))
        del model, optimizer, scheduler, loss
        gc.collect()  # (the scheduler and its optimizer form a cycle)
        print(f"fold {fold}: earlier folds' weights freed: {all(r() is None for r in finished)}", flush=True)


if __name__ == "__main__":
    main()
