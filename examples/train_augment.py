"""Train a small classifier with random data augmentation in DataLoader worker processes.

A plain PyTorch script in the style of image training: the dataset's ``__getitem__``
augments every sample at random (noise from ``torch``, a random flip from Python's
``random``, a random scale from NumPy's global generator), and the shuffled DataLoader
runs it in two worker processes, which torch seeds per worker and epoch. Optionally the
workers persist across epochs, and a second, unlabelled loader (consistency-regularisation
style) is zipped with the training loader. The data is synthetic and made in memory from a
seed (no downloads).

    python examples/train_augment.py --out final.pt
    python examples/train_augment.py --out final.pt --persistent-workers --paired
"""
import argparse
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train with random augmentation in worker processes.")
    p.add_argument("--out", required=True, help="where to write the final state (torch.save)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=44, help="training samples (11 batches of 4)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--persistent-workers", action="store_true", help="keep the workers across epochs")
    p.add_argument("--paired", action="store_true",
                   help="zip an unlabelled augmented loader with the training loader (consistency loss)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep after each step (stand-in for a bigger model)")
    return p.parse_args()


class Augmented(Dataset):
    """Points in 16-d labelled by a fixed random linear teacher; every access augments at random."""

    def __init__(self, n: int, seed: int, labelled: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 16, generator=g)
        teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(1234))
        self.y = (self.x @ teacher).argmax(dim=1)
        self.labelled = labelled

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i] + 0.1 * torch.randn(16)  # torch's generator
        if random.random() < 0.5:  # Python's generator
            x = x.flip(0)
        x = x * float(np.random.uniform(0.8, 1.2))  # NumPy's global generator
        return (x, self.y[i]) if self.labelled else x


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    common = dict(batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                  persistent_workers=args.persistent_workers and args.workers > 0)
    train_loader = DataLoader(Augmented(args.samples, args.seed + 1), **common)
    unlabelled = DataLoader(Augmented(args.samples + 8, args.seed + 3, labelled=False), **common)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr)

    step = 0
    for epoch in range(args.epochs):
        batches = zip(train_loader, unlabelled) if args.paired else ((b, None) for b in train_loader)
        for (x, y), u in batches:
            loss = F.cross_entropy(model(x), y)
            if u is not None:
                loss = loss + 0.1 * model(u).softmax(1).var(0).sum()
            optim.zero_grad()
            loss.backward()
            optim.step()
            step = int(optim.state[optim.param_groups[0]["params"][0]]["step"])
            print(f"step {step} epoch {epoch} loss {loss.item():.9g}", flush=True)
            time.sleep(args.step_sleep)

    torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, args.out)


if __name__ == "__main__":
    main()
