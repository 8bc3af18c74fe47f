"""Sick: vanishing gradients. A deep (12 layers) sigmoid MLP, as in a 1990s tutorial, with PyTorch's
default initialisation, classifying the 8x8 digits with SGD. Each sigmoid layer multiplies the
backpropagated signal by at most 0.25 x |W|, so the first layer's gradient is ~1e-9 of the last's: it
learns nothing. tui_debug must warn (gradient_error, warning) naming model.0.weight."""

import argparse

import torch
import torch.nn as nn
from sklearn.datasets import load_digits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--depth", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    layers: list[nn.Module] = []
    width = 64
    for _ in range(args.depth):
        layers += [nn.Linear(width, 64), nn.Sigmoid()]
        width = 64
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (64,))
        optimizer.zero_grad()
        loss = criterion(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            g0 = model[0].weight.grad.norm().item()
            glast = model[-1].weight.grad.norm().item()
            print(f"step {step + 1:4d}  loss {loss.item():.4f}  |grad model.0.weight| {g0:.3g}  "
                  f"|grad last| {glast:.3g}", flush=True)


if __name__ == "__main__":
    main()
