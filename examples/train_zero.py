"""ZeRO-1 (ZeroRedundancyOptimizer) with torchrun on CPU (gloo).

    torchrun --standalone --nproc-per-node 2 examples/train_zero.py --out final.pt

DistributedDataParallel with a ZeroRedundancyOptimizer over AdamW (each rank
holds the optimizer state of its share of the parameters), a DistributedSampler
re-seeded every epoch, a per-step cosine LR schedule. The script knows nothing
of pyckpt; under ``pyckpt-run`` (or ``PYCKPT_DIR``) each rank's optimizer share
is checkpointed without a gather and resumed exactly. At the end the optimizer
state is consolidated (a gather, once) and rank 0 writes it to ``--out``.
"""
import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ZeRO-1 training with torchrun on CPU (gloo).")
    p.add_argument("--out", required=True, help="where rank 0 writes the final state")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=96, help="training samples (all ranks)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size per rank")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep after each step (stand-in for a bigger model)")
    return p.parse_args()


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=torch.Generator().manual_seed(99))).argmax(dim=1)
    return TensorDataset(x, y)


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(args.seed)
    dataset = make_data(args.samples, seed=args.seed + 1)
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    model = DistributedDataParallel(nn.Sequential(nn.Linear(16, 37), nn.GELU(), nn.Linear(37, 64), nn.GELU(),
                                                  nn.Linear(64, 4)))
    optim = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=args.lr,
                                    weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=args.epochs * len(loader))

    step = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optim.step()
            optim.zero_grad()
            sched.step()
            step += 1
            if rank == 0:
                print(f"step {step} epoch {epoch} loss {loss.item():.9g}", flush=True)
            time.sleep(args.step_sleep)

    optim.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "optim": optim.state_dict(), "sched": sched.state_dict()},
                   args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
