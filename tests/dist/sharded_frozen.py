"""FSDP2 or ZeRO-1 training with a frozen layer, under torchrun (gloo, CPU), for the memory-tier tests
(test_sharded_tier.py): the frozen weight's chunks never change, so incremental checkpoints reference
them in earlier ones. Knows nothing of pyckpt; rank 0 writes the gathered final state to ``--out``.

    torchrun --standalone --nproc-per-node 2 tests/dist/sharded_frozen.py --out final.pt --parallel fsdp
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from _dist_setup import parse_args, setup, train  # noqa: E402


def main() -> None:
    args = parse_args("FSDP2 / ZeRO-1 with a frozen layer.", epochs=3, samples=96,
                      extra=[("--parallel", {"choices": ["fsdp", "zero"], "default": "fsdp"})])
    rank, sampler, loader = setup(args)
    # The frozen 4096 x 128 weight is 2 MiB (1 MiB a rank under FSDP2): chunks of its own.
    model = nn.Sequential(nn.Linear(16, 128), nn.GELU(), nn.Linear(128, 4096), nn.GELU(), nn.Linear(4096, 4))
    model[2].requires_grad_(False)
    if args.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in (model[0], model[2], model[4]):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    else:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        model = nn.parallel.DistributedDataParallel(model)
        optim = ZeroRedundancyOptimizer([p for p in model.parameters() if p.requires_grad],
                                        optimizer_class=torch.optim.AdamW, lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=args.epochs * len(loader))

    train(model, optim, sched, sampler, loader, args, rank)

    if args.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        optim.consolidate_state_dict(to=0)
        msd, osd = model.module.state_dict(), optim.state_dict() if rank == 0 else None
    if rank == 0:
        torch.save({"model": msd, "optim": osd, "sched": sched.state_dict()}, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
