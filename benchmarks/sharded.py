"""FSDP2 on 2 gloo ranks: pyckpt against torch.distributed.checkpoint (save, async_save, load).

    python benchmarks/sharded.py            # ~256 MB of parameters (+ 2 AdamW moments: ~768 MB of state)
    python benchmarks/sharded.py --mb 1024  # the issue's ~1 GB model (needs ~8 GB of RAM)

Every rank holds half of the parameters and of the optimizer state (fully_shard of each layer and
of the root). Times are the slowest rank's, after a barrier; "blocked" is how long training could
not touch its tensors (pyckpt: save() returned and captured(); dcp.async_save: until it returns),
"total" until the checkpoint is durable/committed. Loads start with both checkpoints evicted
from the page cache (posix_fadvise DONTNEED), into the live sharded state dict. The state is the sharded state dict from
get_state_dict. Results go to stdout as one table (docs/PERFORMANCE.md records them).

Then, unless ``--train-steps 0``, the same methods inside real FSDP training steps (``_in_training``):
a save right after an optimizer step, the next forward/backward overlapping it, the next optimizer
step waiting for capture; printed as blocked time and the step's time over a plain step.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _page_cache  # benchmarks/_page_cache.py (the script's folder is on sys.path)


def build(mb: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    width = 2048
    layers = max(1, mb * (1 << 20) // (4 * width * width))
    torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (world,))
    for layer in m:
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(2, width)).sum().backward()
    opt.step()
    return m, opt


def _slowest(t: float) -> float:
    x = torch.tensor([t], dtype=torch.float64)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x)


def _touch(state) -> None:
    """Change every tensor in place, as an optimizer step would."""
    for v in state["model"].values():
        v.to_local().add_(1.0)
    for per_param in state["optim"]["state"].values():
        for t in per_param.values():
            if torch.is_tensor(t) and t.dim() > 0:
                (t.to_local() if hasattr(t, "to_local") else t).add_(1.0)


def _worker(rank: int, world: int, args, tmp: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=world)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import pyckpt
    from pyckpt.coord import StoreCoordinator

    m, opt = build(args.mb, world)
    msd, osd = get_state_dict(m, opt)
    state = {"model": msd, "optim": osd}
    nbytes = sum(v.to_local().numel() * 4 for v in msd.values()) * 3
    out: dict[str, float] = {}
    ck = pyckpt.Checkpointer(f"{tmp}/pyckpt", keep=1, coordinator=StoreCoordinator())
    for i in range(args.repeat):
        _touch(state)  # every byte changes between saves, so incremental saves skip nothing
        dist.barrier()
        t0 = time.perf_counter()
        fut = ck.save(i, state)
        returned = time.perf_counter() - t0
        fut.captured()
        blocked = time.perf_counter() - t0
        fut.result()
        total = time.perf_counter() - t0
        out["pyckpt save() returned"] = _slowest(returned)
        out["pyckpt save blocked"] = _slowest(blocked)
        out["pyckpt save total"] = _slowest(total)
    for i in range(args.repeat):
        d = f"{tmp}/dcp-{i}"
        dist.barrier()
        t0 = time.perf_counter()
        dcp.save(state, checkpoint_id=d)
        out["dcp.save total"] = _slowest(time.perf_counter() - t0)
    for i in range(args.repeat):
        d = f"{tmp}/dcpa-{i}"
        dist.barrier()
        t0 = time.perf_counter()
        f = dcp.async_save(state, checkpoint_id=d)
        blocked = time.perf_counter() - t0
        f.result()
        total = time.perf_counter() - t0
        out["dcp.async_save blocked"] = _slowest(blocked)
        out["dcp.async_save total"] = _slowest(total)
    if args.train_steps:
        out.update(_in_training(m, opt, state, ck, tmp, args.train_steps))
    if rank == 0:
        _page_cache.drop(f"{tmp}/pyckpt")
        _page_cache.drop(f"{tmp}/dcp-0")
    dist.barrier()
    t0 = time.perf_counter()
    ck.restore(into=state)
    out["pyckpt load"] = _slowest(time.perf_counter() - t0)
    dist.barrier()
    t0 = time.perf_counter()
    dcp.load(state, checkpoint_id=f"{tmp}/dcp-0")
    out["dcp.load"] = _slowest(time.perf_counter() - t0)
    ck.close()
    if rank == 0:
        results.update(out)
        results["state MB per rank"] = nbytes / 2**20
    dist.barrier()
    dist.destroy_process_group()


def _in_training(m, opt, state, ck, tmp: str, steps: int) -> dict[str, float]:
    """Checkpoints inside real FSDP training steps (forward, backward, optimizer step).

    A save is started right after an optimizer step; the next forward/backward runs while it copies,
    and the next optimizer step first waits until the tensors are captured (pyckpt: captured();
    dcp.async_save with a background stager: staging_completion; plain dcp.async_save stages before
    it returns). "blocked" = the save call + that wait: the time the training loop stood still.
    "step over plain" = that step's time over the median plain step: the whole cost, including
    the copy slowing the overlapped forward/backward on shared cores."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    x = torch.randn(64, 2048)
    # dcp's background upload runs collectives while training runs FSDP's: on one group they would
    # interleave differently on each rank and hang (dcp's docs ask for a separate gloo group).
    group = dist.new_group(backend="gloo")

    def step(save=None, wait=None) -> tuple[float, float]:
        t0 = time.perf_counter()
        handle = save() if save else None
        blocked = time.perf_counter() - t0
        m(x).square().mean().backward()
        t1 = time.perf_counter()
        if handle is not None:
            wait(handle)
        blocked += time.perf_counter() - t1
        opt.step()
        opt.zero_grad(set_to_none=True)
        return blocked, time.perf_counter() - t0

    out: dict[str, float] = {}
    dist.barrier()
    plain = sorted(step()[1] for _ in range(steps))
    base = plain[len(plain) // 2]
    out["training: plain step"] = _slowest(base)
    stager = DefaultStager(StagingOptions(False, False, True, False))  # staged on its own thread
    pending: list = []

    def dcp_plain(i: int) -> None:
        pending.append(dcp.async_save(state, checkpoint_id=f"{tmp}/dcpa-t", process_group=group))

    def dcp_staged(i: int):
        r = dcp.async_save(state, checkpoint_id=f"{tmp}/dcps", async_stager=stager, process_group=group)
        pending.append(r.upload_completion)
        return r.staging_completion

    ways = {
        "pyckpt": (lambda i: ck.save(1000 + i, state), lambda f: f.captured()),
        "dcp.async_save": (dcp_plain, lambda _: None),
        "dcp.async_save+stager": (dcp_staged, lambda f: f.result()),
    }
    for name, (save, wait) in ways.items():
        blocked, over = [], []
        for i in range(steps):
            # As with a checkpoint every N steps: the previous one is durable before the next starts
            # (and the same directory can be overwritten); not timed.
            for f in pending:
                f.result()
            pending.clear()
            ck.wait()
            dist.barrier()
            b, t = step(lambda: save(i), wait)
            blocked.append(_slowest(b))
            over.append(_slowest(t) - out["training: plain step"])
        for f in pending:
            f.result()
        pending.clear()
        ck.wait()
        out[f"training: {name} blocked"] = sorted(blocked)[len(blocked) // 2]
        out[f"training: {name} step over plain"] = sorted(over)[len(over) // 2]
    stager.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256, help="parameter MB (the issue's figure: 1024)")
    ap.add_argument("--repeat", type=int, default=2, help="saves of each kind; the last one is reported")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--train-steps", type=int, default=3,
                    help="training steps with a checkpoint each, per method (0: skip the in-training table)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="pyckpt-sharded-", dir=args.dir)
    try:
        with mp.Manager() as mgr:
            results = mgr.dict()
            mp.spawn(_worker, args=(2, args, tmp, results), nprocs=2, join=True)
            r = dict(results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"FSDP2, 2 ranks (gloo, CPU), {args.mb} MB parameters, {r['state MB per rank']:.0f} MB state per rank, "
          f"{os.cpu_count()} CPUs")
    print(f"{'':28s}{'seconds':>10s}")
    for k in ("pyckpt save() returned", "pyckpt save blocked", "pyckpt save total", "dcp.async_save blocked",
              "dcp.async_save total", "dcp.save total", "pyckpt load", "dcp.load"):
        print(f"{k:28s}{r[k]:10.3f}")
    print(f"blocked: pyckpt / dcp.async_save = {r['pyckpt save blocked'] / r['dcp.async_save blocked']:.2f}  "
          f"(goal <= 0.10)")
    print(f"total:   pyckpt / dcp.save        = {r['pyckpt save total'] / r['dcp.save total']:.2f}  (goal <= 1)")
    print(f"load:    pyckpt / dcp.load        = {r['pyckpt load'] / r['dcp.load']:.2f}")
    if args.train_steps:
        print(f"\nIn training (a checkpoint right after an optimizer step, the next forward/backward overlapping "
              f"it; medians of {args.train_steps}): plain step {r['training: plain step']:.3f} s")
        print(f"{'':24s}{'blocked':>10s}{'step over plain':>18s}")
        for k in ("pyckpt", "dcp.async_save", "dcp.async_save+stager"):
            print(f"{k:24s}{r[f'training: {k} blocked']:10.3f}{r[f'training: {k} step over plain']:18.3f}")
        print(f"blocked in training: pyckpt / dcp.async_save = "
              f"{r['training: pyckpt blocked'] / r['training: dcp.async_save blocked']:.3f} (goal <= 0.10); "
              f"/ dcp.async_save+stager = "
              f"{r['training: pyckpt blocked'] / r['training: dcp.async_save+stager blocked']:.3f}")


if __name__ == "__main__":
    main()
