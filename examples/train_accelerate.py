"""Train a small classifier with Hugging Face accelerate.

A plain accelerate training script: ``Accelerator.prepare`` for the model,
optimizer, a shuffled DataLoader with two worker processes and a per-step
learning-rate schedule; gradient accumulation over two micro-batches with
``accelerator.accumulate``, dropout, and a validation pass at the end of every
epoch. The data is synthetic and made in memory from a seed (no downloads).

    python examples/train_accelerate.py --out final.pt
    torchrun --standalone --nproc-per-node 2 examples/train_accelerate.py --out final.pt
"""
import argparse
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a small classifier with accelerate.")
    p.add_argument("--out", required=True, help="where to write the final state (torch.save)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=44, help="training samples (11 micro-batches of 4)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep after each optimizer step (stand-in for a bigger model)")
    return p.parse_args()


def make_data(n: int, seed: int) -> TensorDataset:
    """Points in 16-d labelled by a fixed random linear teacher (4 classes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(1234))
    y = (x @ teacher + 0.3 * torch.randn(n, 4, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 4))


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
    # On a machine without CUDA, torchrun ranks form a gloo group (accelerate needs cpu=True for that).
    accelerator = Accelerator(gradient_accumulation_steps=args.accumulate, cpu=not torch.cuda.is_available())
    train_loader = DataLoader(make_data(args.samples, seed=args.seed + 1), batch_size=args.batch_size,
                              shuffle=True, num_workers=args.workers)
    val_loader = DataLoader(make_data(16, seed=args.seed + 2), batch_size=8)
    model = make_model()
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps_per_epoch = -(-len(train_loader) // args.accumulate)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=args.lr,
                                                total_steps=args.epochs * steps_per_epoch)
    model, optim, train_loader, val_loader, sched = accelerator.prepare(
        model, optim, train_loader, val_loader, sched)

    for epoch in range(args.epochs):
        for x, y in train_loader:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                optim.step()
                sched.step()
                optim.zero_grad()
            if accelerator.sync_gradients and accelerator.is_main_process:
                inner = optim.optimizer
                step = int(inner.state[inner.param_groups[0]["params"][0]]["step"])
                print(f"step {step} epoch {epoch} loss {loss.item():.9g}", flush=True)
                time.sleep(args.step_sleep)
        val = validate(model, val_loader)
        if accelerator.is_main_process:
            print(f"val epoch {epoch} loss {val:.9g}", flush=True)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save({"model": accelerator.unwrap_model(model).state_dict(), "optim": optim.optimizer.state_dict(),
                    "sched": sched.scheduler.state_dict()}, args.out)
    accelerator.end_training()


if __name__ == "__main__":
    main()
