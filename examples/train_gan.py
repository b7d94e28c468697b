"""Train a tiny GAN on a 2-d mixture of Gaussians.

    python examples/train_gan.py --out final.pt

Two networks with an optimizer each: every batch first updates the
discriminator on real and generated points, then the generator through the
discriminator. The noise comes from torch's global generator, and the
generator's learning rate decays once per epoch.
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NOISE_DIM = 8


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a tiny GAN on a 2-d mixture of Gaussians.")
    p.add_argument("--out", required=True, help="where to write the final state (torch.save)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep after each step (stand-in for a bigger model)")
    return p.parse_args()


def ring_of_gaussians(n: int, seed: int) -> TensorDataset:
    """Points drawn around 8 centres on the unit circle."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.randint(0, 8, (n,), generator=g).float() * (2 * math.pi / 8)
    centres = torch.stack([angle.cos(), angle.sin()], dim=1)
    return TensorDataset(centres + 0.05 * torch.randn(n, 2, generator=g))


def make_generator() -> nn.Module:
    return nn.Sequential(nn.Linear(NOISE_DIM, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 2))


def make_discriminator() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))


def discriminator_step(gen, disc, opt_d, real: torch.Tensor) -> torch.Tensor:
    fake = gen(torch.randn(len(real), NOISE_DIM)).detach()
    logits = torch.cat([disc(real), disc(fake)])
    target = torch.cat([torch.ones(len(real), 1), torch.zeros(len(fake), 1)])
    loss = F.binary_cross_entropy_with_logits(logits, target)
    opt_d.zero_grad()
    loss.backward()
    opt_d.step()
    return loss


def generator_step(gen, disc, opt_g, batch: int) -> torch.Tensor:
    logits = disc(gen(torch.randn(batch, NOISE_DIM)))
    loss = F.binary_cross_entropy_with_logits(logits, torch.ones(batch, 1))
    opt_g.zero_grad()
    loss.backward()
    opt_g.step()
    return loss


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    loader = DataLoader(ring_of_gaussians(args.samples, args.seed + 1),
                        batch_size=args.batch_size, shuffle=True, drop_last=True)
    gen, disc = make_generator(), make_discriminator()
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.999))
    sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=0.8)

    for epoch in range(args.epochs):
        for (real,) in loader:
            loss_d = discriminator_step(gen, disc, opt_d, real)
            loss_g = generator_step(gen, disc, opt_g, len(real))
            step = int(opt_g.state[opt_g.param_groups[0]["params"][0]]["step"])
            print(f"step {step} epoch {epoch} loss {loss_g.item():.9g} "
                  f"d_loss {loss_d.item():.9g}", flush=True)
            time.sleep(args.step_sleep)
        sched_g.step()

    torch.save({"model": {"generator": gen.state_dict(), "discriminator": disc.state_dict()},
                "optim": {"generator": opt_g.state_dict(), "discriminator": opt_d.state_dict()},
                "sched": sched_g.state_dict()}, args.out)


if __name__ == "__main__":
    main()
