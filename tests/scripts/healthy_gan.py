"""Healthy: a GAN on a 2-D mixture of 8 Gaussians on a ring. Generator and discriminator MLPs, two Adam
optimizers, BCE-with-logits; ``d_loss.backward()`` then ``g_loss.backward()`` every step."""

import argparse
import math

import torch
import torch.nn as nn


def real_batch(n: int) -> torch.Tensor:
    k = torch.randint(0, 8, (n,))
    angle = k.float() * (2 * math.pi / 8)
    centers = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) * 2.0
    return centers + 0.05 * torch.randn(n, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(1)  # small model on a shared CPU: one thread is fastest
    torch.manual_seed(0)
    z_dim = 8
    G = nn.Sequential(nn.Linear(z_dim, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    D = nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    ones = torch.ones(args.batch, 1)
    zeros = torch.zeros(args.batch, 1)
    for step in range(args.steps):
        # discriminator
        real = real_batch(args.batch)
        fake = G(torch.randn(args.batch, z_dim))
        d_loss = bce(D(real), ones) + bce(D(fake.detach()), zeros)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        # generator (non-saturating loss)
        g_loss = bce(D(fake), ones)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        if step % 50 == 0 or step == args.steps - 1:
            with torch.no_grad():
                sample = G(torch.randn(1000, z_dim))
                radius = sample.norm(dim=1).mean().item()
            print(f"step {step:4d}  d_loss {d_loss.item():.3f}  g_loss {g_loss.item():.3f}  "
                  f"mean radius {radius:.2f} (target 2.0)", flush=True)


if __name__ == "__main__":
    main()
