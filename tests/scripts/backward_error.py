"""An error raised inside loss.backward() (through tui_debug's backward patch)."""

import torch


def train_step():
    model = torch.nn.Linear(2, 1)
    out = model(torch.ones(1, 2)).sum()
    out.backward()
    out.backward()  # the graph was freed: RuntimeError


train_step()
