"""A slow CPU step (over 5 ms) whose forward is not observed goes NaN in a named layer: its forward is
replayed at the step's read. Prints what the replay must leave as it was: BatchNorm's running
statistics, a buffer the forward reassigns, and the next draws of torch's and Python's random number
generators, right after the bad step; the forward warns on the bad step (a replay's warning is not
the script's)."""
import random
import sys
import time
import warnings

import torch
import torch.nn as nn

BAD_STEP = int(sys.argv[1])


class LogBelow(nn.Module):
    """log(x - 100): NaN everywhere once switched on."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.calls = 0
        self.register_buffer("seen", torch.zeros(()))  # reassigned by each forward, not changed in place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.006)  # every step slow (over 5 ms), whatever the machine
        self.calls += 1
        self.seen = self.seen + x.shape[0]
        random.random()  # (a draw of Python's generator, in the replay too)
        if self.on:  # (a new message each call: Python shows each once)
            warnings.warn(f"LogBelow switched on, call {self.calls}")
        return torch.log(x - 100) if self.on else x


torch.manual_seed(0)
random.seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), LogBelow(), nn.Linear(32, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
for step in range(1, BAD_STEP + 1):
    model[4].on = step == BAD_STEP
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
print(f"AFTER {model[1].running_mean.sum().item():.9g} {model[1].num_batches_tracked.item()} {model[4].seen.item()} "
      f"{torch.rand(1).item():.9g} {random.random():.9g}")
