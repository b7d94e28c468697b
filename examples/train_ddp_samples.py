"""DDP training on gloo that records every sample it trains and never mentions pyckpt.

Run it under torchrun (or any launcher that sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) with
PYCKPT_DIR set; kill it; relaunch it with another number of ranks: the rest of the interrupted
epoch is split across the new ranks, and the logs show every sample of that epoch trained once.

Environment (all optional):
  SAMPLES_LOG   directory; each rank writes <RUN>-<rank>.txt, one line "epoch step idx idx ..." per step,
                and <RUN>-first-<rank>.pt: the model and optimizer state at its first batch (after a resume:
                the restored state)
  RUN           name of this launch in the log file names (default "run")
  DROP_LAST     1: DistributedSampler(drop_last=True)
  EPOCHS        number of epochs (default 3)
  STOP_AT, STOP_AFTER   after optimizer step STOP_AT, once the file STOP_AFTER exists (a committed
                checkpoint), write <RUN>-<rank>.stopped (holding the pid) and wait to be killed (tests
                SIGKILL the job); once per log directory. STOP_RANK: only these ranks stop (e.g. "2,3")
  BIAS          0: the DDP model is one weight without a bias (one parameter)
  PARALLEL      ddp (default: DistributedDataParallel), fsdp (FSDP2 fully_shard of the first layer and
                the root; the .pt files hold full tensors, gathered) or zero (DDP with a
                ZeroRedundancyOptimizer; the .pt files hold this rank's optimizer share, keyed by the
                parameters' global index)
"""
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
n = 27
class RankedDataset(TensorDataset):
    """A dataset that knows its process's rank (as sharded or per-rank augmenting datasets do): a plain
    attribute of a script class, which a resume on another number of ranks must not take from a saved
    rank (a new rank 2 would get saved rank 0's)."""

    def __init__(self, *tensors):
        super().__init__(*tensors)
        self.rank = rank


ds = RankedDataset(torch.arange(n), torch.randn(n, 4), torch.randn(n, 1))
sampler = DistributedSampler(ds, shuffle=True, seed=3, drop_last=os.environ.get("DROP_LAST") == "1")
loader = DataLoader(ds, batch_size=3, sampler=sampler)
mode = os.environ.get("PARALLEL", "ddp")
if mode == "ddp":
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 1, bias=os.environ.get("BIAS", "1") == "1"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    counted = model.module.weight
else:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # 8 rows: uneven on 3 ranks
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        fully_shard(net[0], mesh=mesh)
        model = fully_shard(net, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    else:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        model = nn.parallel.DistributedDataParallel(net)
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2)
    counted = next(model.parameters())


def full(v):
    """A DTensor (FSDP2) gathered to the whole tensor (a collective: every rank calls it, in order)."""
    return v.full_tensor() if hasattr(v, "full_tensor") else v


def snapshot():
    """Model and optimizer state as plain tensors (ZeRO: this rank's share, global parameter indices)."""
    if mode == "zero":
        index = {id(p): i for i, p in enumerate(model.parameters())}
        return {"model": model.state_dict(), "opt": {
            "state": {index[id(p)]: dict(st) for p, st in opt.optim.state.items()},
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]}}
    o = opt.state_dict()
    return {"model": {k: full(v) for k, v in model.state_dict().items()},
            "opt": {"state": {i: {k: full(v) for k, v in st.items()} for i, st in o["state"].items()},
                    "param_groups": o["param_groups"]}}


def step_count():
    """The optimizer's own step count (survives a resume, unlike a local counter); under ZeRO the
    local optimizer holds the state of the parameters this rank owns."""
    if mode == "zero":
        return int(next(iter(opt.optim.state.values()))["step"])
    return int(opt.state[counted]["step"])


logdir, run = os.environ.get("SAMPLES_LOG"), os.environ.get("RUN", "run")
log = open(os.path.join(logdir, f"{run}-{rank}.txt"), "w") if logdir else None
for epoch in range(int(os.environ.get("EPOCHS", "3"))):
    sampler.set_epoch(epoch)
    for idx, x, y in loader:
        first = os.path.join(logdir, f"{run}-first-{rank}.pt") if logdir else ""
        if first and not os.path.exists(first):  # a file, not a variable: pyckpt may restore variables
            torch.save(snapshot(), first)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        step = step_count()
        if ds.rank != rank:
            raise SystemExit(f"rank {rank}: the dataset says rank {ds.rank}")
        if log:
            log.write(f"{epoch} {step} {' '.join(map(str, idx.tolist()))}\n")
            log.flush()
        stopped = os.path.join(logdir, f"{run}-{rank}.stopped") if logdir else ""
        stoppers = os.environ.get("STOP_RANK", str(rank)).split(",")
        # once: a restarted attempt passes this step again
        if step == int(os.environ.get("STOP_AT", "-1")) and str(rank) in stoppers and not os.path.exists(stopped):
            deadline = time.monotonic() + 120
            while not os.path.exists(os.environ["STOP_AFTER"]) and time.monotonic() < deadline:
                time.sleep(0.02)
            with open(stopped + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(stopped + ".tmp", stopped)
            time.sleep(600)
final = snapshot() if log else None
if rank == 0 and log:
    torch.save(final, os.path.join(logdir, f"{run}-final.pt"))
dist.barrier()  # no rank tears gloo down while another still talks to it
dist.destroy_process_group()
