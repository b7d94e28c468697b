"""Stall of a transparent-mode snapshot vs the explicit ``Checkpointer.save(...).captured()``.

A training job with ``--junk`` million extra live Python objects (a big
in-memory dataset index, a tokenizer's tables...) trains an MLP with Adam
under ``PYCKPT_DIR`` and snapshots every ``--every`` steps; the time the
training thread spends in each snapshot is measured. Then the same process
saves the same model and optimizer state with an explicit ``Checkpointer``
at the same cadence and times ``save(...)`` + ``captured()``. Printed: the
median (and the first) of each, and their ratio (goal: <= 2x). Runs one
process, then 2 ranks under DDP on gloo (``--ranks``).

    python benchmarks/snapshot_stall.py [--junk 3] [--steps 60] [--every 5] [--ranks 1,2]
                                        [--loop-state-max-bytes 0]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def worker(args: argparse.Namespace) -> None:
    """One training process (a torchrun rank, or the only process); rank 0 prints a JSON line."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import pyckpt
    import pyckpt.activation as activation
    from pyckpt.coord import LocalCoordinator, StoreCoordinator

    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # a stuck run can be asked for its stacks
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if ddp else 0
    junk = [[] for _ in range(int(args.junk * 1e6))]  # live, gc-tracked objects
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 1))
    if ddp:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = args.steps * 8 * (dist.get_world_size() if ddp else 1)
    data = TensorDataset(torch.randn(n, 256), torch.randn(n, 1))
    sampler = torch.utils.data.DistributedSampler(data) if ddp else None
    loader = DataLoader(data, batch_size=8, sampler=sampler)

    session = activation._SESSION
    assert session is not None, "run with PYCKPT_DIR set"
    take, stalls = session._snapshot, []

    def timed_snapshot() -> None:
        t0 = time.perf_counter()
        take()
        stalls.append(time.perf_counter() - t0)

    session._snapshot = timed_snapshot

    def train(n: int, it) -> None:
        for _ in range(n):
            x, y = next(it)
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()

    it = iter(loader)
    train(args.steps, it)
    session.flush()
    activation.disable()  # no transparent snapshot during the explicit phase

    # The same state, saved explicitly at the same cadence.
    coord = StoreCoordinator(prefix="bench-explicit") if ddp else LocalCoordinator()
    explicit = []
    where = os.path.join(os.path.dirname(os.environ["PYCKPT_DIR"]), "explicit")  # run() removes both
    with pyckpt.Checkpointer(where, coordinator=coord) as ck:
        it = iter(loader)
        for step in range(args.every, args.steps + 1, args.every):
            train(args.every, it)
            t0 = time.perf_counter()
            ck.save(step, {"model": model.state_dict(), "opt": opt.state_dict()}).captured()
            explicit.append(time.perf_counter() - t0)
        ck.wait()
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3
    if rank == 0:
        print("RESULT " + json.dumps({"transparent": stalls, "explicit": explicit, "state_mib": state_bytes / 2**20,
                                      "live_objects": len(gc.get_objects())}), flush=True)
    del junk
    if ddp:
        dist.destroy_process_group()


def run(ranks: int, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_")}
    root = tempfile.mkdtemp(prefix="pyckpt-stall-")
    env.update(PYCKPT_DIR=os.path.join(root, "transparent"), PYCKPT_EVERY_STEPS=str(args.every),
               PYCKPT_LOG="quiet", OMP_NUM_THREADS="1")
    if args.loop_state_max_bytes is not None:  # the extra objects are a local: loop state walks them
        env["PYCKPT_LOOP_STATE_MAX_BYTES"] = str(args.loop_state_max_bytes)
    me = [os.path.abspath(__file__), "--worker", "--junk", str(args.junk), "--steps", str(args.steps),
          "--every", str(args.every)]
    if ranks == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *me]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"benchmark run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--junk", type=float, default=3.0, help="millions of extra live Python objects")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--loop-state-max-bytes", type=int, default=None,
                    help="PYCKPT_LOOP_STATE_MAX_BYTES for the runs (0: no script variables captured)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"{'ranks':>5} {'state':>8} {'live objs':>10} {'transparent first':>18} {'median':>8} "
          f"{'explicit median':>16} {'ratio':>6}")
    for ranks in (int(x) for x in args.ranks.split(",")):
        res = run(ranks, args)
        t, e = res["transparent"], res["explicit"]
        # The first snapshot of a process also allocates the staging pool: compare the later ones.
        tm, em = statistics.median(t[1:]), statistics.median(e[1:])
        print(f"{ranks:>5} {res['state_mib']:>6.2f}Mi {res['live_objects'] / 1e6:>9.2f}M {t[0] * 1e3:>16.1f}ms "
              f"{tm * 1e3:>6.1f}ms {em * 1e3:>14.1f}ms {tm / em:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
