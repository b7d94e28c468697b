"""Sharded data parallelism (FSDP2) with torchrun on CPU (gloo).

    torchrun --standalone --nproc-per-node 2 examples/train_fsdp.py --out final.pt

``fully_shard`` of each block and then of the root (every rank holds a slice of
each parameter and of the AdamW state), a DistributedSampler re-seeded every
epoch, a per-step cosine LR schedule. The script knows nothing of pyckpt; under
``pyckpt-run`` (or ``PYCKPT_DIR``) it is checkpointed shard by shard and resumed
exactly. At the end every rank joins the gather of the full state dict and rank
0 writes it to ``--out``. The set-up and the loop are in ``_dist_setup.py``.
"""
import torch
import torch.distributed as dist
from torch import nn

from _dist_setup import parse_args, setup, train


def main() -> None:
    args = parse_args("FSDP2 training with torchrun on CPU (gloo).", epochs=3, samples=96)
    rank, sampler, loader = setup(args)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # Uneven sizes (37 rows over 2 ranks) on purpose: shards of different lengths.
    model = nn.Sequential(nn.Linear(16, 37), nn.GELU(), nn.Linear(37, 64), nn.GELU(), nn.Linear(64, 4))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in (model[0], model[2]):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=args.epochs * len(loader))

    train(model, optim, sched, sampler, loader, args, rank)

    msd, osd = get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"model": msd, "optim": osd, "sched": sched.state_dict()}, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
