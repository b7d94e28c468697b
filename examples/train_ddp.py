"""Data-parallel training with torchrun on CPU (gloo).

    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py --out final.pt

DistributedDataParallel over a small network with BatchNorm, a DistributedSampler
re-seeded every epoch with ``set_epoch``, gradient accumulation that skips the
all-reduce on the accumulating micro-batches (``no_sync``), bf16 autocast with a
GradScaler, Adam with two parameter groups (no weight decay on biases and norms)
and a StepLR schedule stepped once per epoch. Only rank 0 writes ``--out``.
"""
import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from _dist_setup import parse_args, setup


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 4),
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def main() -> None:
    args = parse_args("Data-parallel training with torchrun on CPU (gloo).", epochs=4, samples=128, extra=[
        ("--accum", {"type": int, "default": 2, "help": "micro-batches per optimizer step"})])
    rank, sampler, loader = setup(args, scale=2.0, shift=1.0)  # inputs ~ N(1, 4)

    model = DistributedDataParallel(make_model())
    optim = torch.optim.Adam(param_groups(model.module, 1e-4), lr=args.lr)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1, gamma=0.7)
    # A small growth interval so the loss scale changes during the run.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            last_micro = (i + 1) % args.accum == 0
            sync = contextlib.nullcontext() if last_micro else model.no_sync()
            with sync:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y) / args.accum
                scaler.scale(loss).backward()
            if not last_micro:
                continue
            scaler.step(optim)
            scaler.update()
            optim.zero_grad()
            # The optimizer's own step count is the global step.
            steps = int(optim.state[optim.param_groups[0]["params"][0]]["step"])
            if rank == 0:
                print(f"step {steps} epoch {epoch} loss {loss.item() * args.accum:.9g}", flush=True)
            time.sleep(args.step_sleep)
        sched.step()

    if rank == 0:
        torch.save({"model": model.module.state_dict(), "optim": optim.state_dict(),
                    "sched": sched.state_dict(), "scaler": scaler.state_dict()}, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
