"""A CNN whose convolutions keep their bias although a BatchNorm follows each (the bias cancels out:
its gradient is ~0 by construction), and one convolution that feeds a ReLU (its bias is needed)."""

import torch
import torch.nn as nn

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(
    nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
    nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
for step in range(80):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
