"""A module whose forward raises ValueError on its third call (training step 3)."""

import torch
import torch.nn as nn


class Bad(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise ValueError("Bad.forward failed on call 3")
        return x * 2


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 4), Bad(), nn.Linear(4, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn(8, 4)
for step in range(10):
    optimizer.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    optimizer.step()
print("unreachable", flush=True)
