"""Fine-tune a frozen network through low-rank adapters (LoRA).

    python examples/train_lora.py --out final.pt

A "pre-trained" base network (here: a seeded random MLP) is frozen; every
Linear layer gets a trainable low-rank update ``B @ A`` (B starts at zero, so
training starts from the base network) with dropout on the adapter input. Only
the adapters are given to the optimizer; the learning rate warms up linearly
and then decays, stepped every batch.
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fine-tune a frozen network through low-rank adapters (LoRA).")
    p.add_argument("--out", required=True, help="where to write the final state (torch.save)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=4, help="adapter rank")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep after each step (stand-in for a bigger model)")
    return p.parse_args()


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))`` with ``base`` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 8.0, dropout: float = 0.1):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()
        return self.base(x) + self.scale * update


def make_base() -> nn.Sequential:
    torch.manual_seed(2024)  # the "pre-trained" weights
    return nn.Sequential(nn.Linear(24, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                         nn.Linear(64, 8))


def add_adapters(model: nn.Sequential, rank: int) -> nn.Sequential:
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Linear):
            model[i] = LoRALinear(layer, rank)
    return model


def make_task(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 24, generator=g)
    w = torch.randn(24, 8, generator=g) / 5
    return TensorDataset(x, torch.tanh(x @ w))


def make_scheduler(optim: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    warmup = max(1, total // 6)
    return torch.optim.lr_scheduler.SequentialLR(optim, [
        torch.optim.lr_scheduler.LinearLR(optim, start_factor=0.1, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=total - warmup),
    ], milestones=[warmup])


def main() -> None:
    args = parse_args()
    model = add_adapters(make_base(), args.rank)
    torch.manual_seed(args.seed)
    loader = DataLoader(make_task(args.samples, args.seed + 1), batch_size=args.batch_size,
                        shuffle=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    sched = make_scheduler(optim, args.epochs * len(loader))

    for epoch in range(args.epochs):
        for x, y in loader:
            loss = F.mse_loss(model(x), y)
            optim.zero_grad()
            loss.backward()
            optim.step()
            sched.step()
            step = int(optim.state[trainable[0]]["step"])
            print(f"step {step} epoch {epoch} loss {loss.item():.9g}", flush=True)
            time.sleep(args.step_sleep)

    torch.save({"model": model.state_dict(), "optim": optim.state_dict(),
                "sched": sched.state_dict()}, args.out)


if __name__ == "__main__":
    main()
