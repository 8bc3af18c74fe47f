"""Asks the CPU allocator for 40 TB (torch raises 'DefaultCPUAllocator: can't allocate memory')."""

import torch

model = torch.nn.Linear(4, 4)
huge = torch.empty(10**13)
print("unreachable", flush=True)
