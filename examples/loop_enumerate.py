"""Epoch loop over ``enumerate(loader)`` with a hand-kept global step (a common tutorial style).

    python examples/loop_enumerate.py --out final.pt
    torchrun --standalone --nproc-per-node 2 examples/loop_enumerate.py --out final.pt

The learning rate warms up linearly with ``global_step`` (set by hand in the
param groups), an epoch ends early at ``i >= max_batches``, and every
``log_every`` batches the running loss is logged and reset. Under torchrun the
model is wrapped in DistributedDataParallel (gloo) and a DistributedSampler splits
each batch of 8 across the ranks; rank 0 prints and saves.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def main():
    p = argparse.ArgumentParser(description="enumerate(loader) training with a global step")
    p.add_argument("--out", required=True, help="where to write the final state (torch.save)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-batches", type=int, default=7)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--log-every", type=int, default=3)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each step")
    args = p.parse_args()

    distributed = "WORLD_SIZE" in os.environ  # launched by torchrun
    if distributed:
        dist.init_process_group("gloo")
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)

    torch.manual_seed(0)
    x = torch.randn(96, 8)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    sampler = DistributedSampler(data, shuffle=True, seed=0) if distributed else None
    # 12 batches (of 8 in all ranks together), only max_batches used
    loader = DataLoader(data, batch_size=8 // world, shuffle=sampler is None, sampler=sampler)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    if distributed:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    global_step = 0
    logged = []
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        running_loss = 0.0
        for i, (inputs, labels) in enumerate(loader):
            if i >= args.max_batches:
                break
            lr = args.lr * min(1.0, (global_step + 1) / args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
            optimizer.step()
            global_step += 1
            running_loss += loss.item()
            if i % args.log_every == args.log_every - 1:
                logged.append(round(running_loss / args.log_every, 6))
                running_loss = 0.0
            if rank == 0:
                print(f"step {global_step} epoch {epoch} loss {loss.item():.9g} i {i} lr {lr:.9g}", flush=True)
            time.sleep(args.step_sleep)

    if rank == 0:
        print(f"FINAL global_step {global_step} logged {logged}", flush=True)
        state = model.module.state_dict() if distributed else model.state_dict()
        torch.save({"model": state, "optim": optimizer.state_dict()}, args.out)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
