"""Mixed precision on the CPU with a GradScaler that starts far too high: it skips most of its 60
iterations (scaled gradients overflow float32) while it calibrates, then steps."""

import torch
import torch.nn as nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
for step in range(60):
    x = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().square().mean() * 1000
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
print("SCALE", scaler.get_scale())
