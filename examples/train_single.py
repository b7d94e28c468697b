"""Train a small classifier on one process.

A plain PyTorch training script: AdamW, a learning-rate schedule stepped every
batch (OneCycleLR), dropout, a shuffled DataLoader with two worker processes and
a validation pass at the end of every epoch. The data is synthetic and made in
memory from a seed, so the run needs no downloads and takes a few seconds.

    python examples/train_single.py --out final.pt
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a small classifier on one process.")
    p.add_argument("--out", required=True, help="where to write the final state (torch.save)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=48, help="training samples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep after each step (stand-in for a bigger model)")
    return p.parse_args()


def make_data(n: int, seed: int) -> TensorDataset:
    """Points in 16-d labelled by a fixed random linear teacher (4 classes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(1234))
    y = (x @ teacher + 0.3 * torch.randn(n, 4, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(64, 4),
    )


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in loader:
        total += F.cross_entropy(model(x), y, reduction="sum").item()
        count += len(y)
    model.train()
    return total / count


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    train_set = make_data(args.samples, seed=args.seed + 1)
    val_set = make_data(32, seed=args.seed + 2)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                              num_workers=args.workers)
    val_loader = DataLoader(val_set, batch_size=16, shuffle=False)

    model = make_model()
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        optim, max_lr=args.lr, total_steps=args.epochs * len(train_loader))

    for epoch in range(args.epochs):
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            optim.zero_grad()
            loss.backward()
            optim.step()
            sched.step()
            # The optimizer's own step count is the global step.
            step = int(optim.state[optim.param_groups[0]["params"][0]]["step"])
            print(f"step {step} epoch {epoch} loss {loss.item():.9g}", flush=True)
            time.sleep(args.step_sleep)
        print(f"val epoch {epoch} loss {validate(model, val_loader):.9g}", flush=True)

    torch.save({"model": model.state_dict(), "optim": optim.state_dict(),
                "sched": sched.state_dict()}, args.out)


if __name__ == "__main__":
    main()
