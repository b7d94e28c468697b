"""Sharded data parallelism (FSDP2) with torchrun on CPU (gloo).

    torchrun --standalone --nproc-per-node 2 examples/train_fsdp.py --out final.pt

``fully_shard`` of each block and then of the root (every rank holds a slice of
each parameter and of the AdamW state), a DistributedSampler re-seeded every
epoch, a per-step cosine LR schedule. The script knows nothing of pyckpt; under
``pyckpt-run`` (or ``PYCKPT_DIR``) it is checkpointed shard by shard and resumed
exactly. At the end every rank joins the gather of the full state dict and rank
0 writes it to ``--out``.
"""
import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="FSDP2 training with torchrun on CPU (gloo).")
    p.add_argument("--out", required=True, help="where rank 0 writes the gathered final state")
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
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    torch.manual_seed(args.seed)
    dataset = make_data(args.samples, seed=args.seed + 1)
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    # Uneven sizes (37 rows over 2 ranks) on purpose: shards of different lengths.
    model = nn.Sequential(nn.Linear(16, 37), nn.GELU(), nn.Linear(37, 64), nn.GELU(), nn.Linear(64, 4))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in (model[0], model[2]):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    total = args.epochs * len(loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=total)

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

    msd, osd = get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"model": msd, "optim": osd, "sched": sched.state_dict()}, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
