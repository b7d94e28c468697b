"""Set-up shared by the torchrun examples (train_ddp.py, train_fsdp.py, train_zero.py).

The usual data-parallel boilerplate: command-line options, a synthetic
classification data set, the gloo process group and a DistributedSampler-driven
DataLoader, and (for the per-step-scheduler examples) the training loop. It
lives next to the scripts, so they stay runnable as plain scripts under
torchrun (``examples/`` is the script's directory, first on ``sys.path``).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def parse_args(description: str, epochs: int, samples: int,
               extra: list[tuple[str, dict]] = ()) -> argparse.Namespace:
    """The common options (``--out``, ``--epochs``, ``--samples``, ``--batch-size``, ``--lr``,
    ``--seed``, ``--step-sleep``) plus ``extra`` ((flag, add_argument keywords) pairs)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", required=True, help="where rank 0 writes the final state")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--samples", type=int, default=samples, help="training samples (all ranks)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size per rank")
    for flag, kwargs in extra:
        p.add_argument(flag, **kwargs)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep after each step (stand-in for a bigger model)")
    return p.parse_args()


def make_data(n: int, seed: int, scale: float | None = None, shift: float | None = None) -> TensorDataset:
    """``n`` random 16-feature inputs (times ``scale`` plus ``shift``) labelled by a fixed random
    teacher into 4 classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    if scale is not None:
        x = x * scale
    if shift is not None:
        x = x + shift
    y = (x @ torch.randn(16, 4, generator=torch.Generator().manual_seed(99))).argmax(dim=1)
    return TensorDataset(x, y)


def setup(args: argparse.Namespace, scale: float | None = None,
          shift: float | None = None) -> tuple[int, DistributedSampler, DataLoader]:
    """Join the gloo process group (torchrun's environment), seed, and build the sharded loader
    (full batches only). Returns (rank, sampler, loader)."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(args.seed)
    dataset = make_data(args.samples, args.seed + 1, scale, shift)
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    return rank, sampler, loader


def train(model: nn.Module, optim: torch.optim.Optimizer, sched: object, sampler: DistributedSampler,
          loader: DataLoader, args: argparse.Namespace, rank: int) -> None:
    """Cross-entropy training, the scheduler stepped after every optimizer step; rank 0 prints
    ``step N epoch E loss X`` lines."""
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
