"""Trains a tiny model; prints READY after step 3 (for the signal tests).

Default: keeps training forever. ``--idle``: after READY it stops stepping and idles (still running
Python bytecode, so an interrupt reaches it), which makes "the steps done before READY are in the
report" deterministic to check.
"""

import sys
import time

import torch

idle = "--idle" in sys.argv[1:]
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn(8, 4)
y = torch.randn(8, 1)
step = 0
while True:
    if idle and step == 3:
        time.sleep(0.01)
        continue
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    step += 1
    if step == 3:
        print("READY", flush=True)
