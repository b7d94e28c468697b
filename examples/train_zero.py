"""ZeRO-1 (ZeroRedundancyOptimizer) with torchrun on CPU (gloo).

    torchrun --standalone --nproc-per-node 2 examples/train_zero.py --out final.pt

DistributedDataParallel with a ZeroRedundancyOptimizer over AdamW (each rank
holds the optimizer state of its share of the parameters), a DistributedSampler
re-seeded every epoch, a per-step cosine LR schedule. The script knows nothing
of pyckpt; under ``pyckpt-run`` (or ``PYCKPT_DIR``) each rank's optimizer share
is checkpointed without a gather and resumed exactly. At the end the optimizer
state is consolidated (a gather, once) and rank 0 writes it to ``--out``. The
set-up and the loop are in ``_dist_setup.py``.
"""
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from _dist_setup import parse_args, setup, train


def main() -> None:
    args = parse_args("ZeRO-1 training with torchrun on CPU (gloo).", epochs=3, samples=96)
    rank, sampler, loader = setup(args)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(16, 37), nn.GELU(), nn.Linear(37, 64), nn.GELU(),
                                                  nn.Linear(64, 4)))
    optim = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=args.lr,
                                    weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=args.epochs * len(loader))

    train(model, optim, sched, sampler, loader, args, rank)

    optim.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "optim": optim.state_dict(), "sched": sched.state_dict()},
                   args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
