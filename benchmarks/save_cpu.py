"""CPU a checkpoint costs the process: pyckpt ``Checkpointer.save`` of a changing 0.6 GB state.

On a machine whose cores all train, every CPU second a checkpoint spends is taken from training,
so this prints, per save, the time until ``captured()`` and until durable, and the process's user
and system CPU seconds over the save (``getrusage``; copy, checksums, writes, commit, retention).
State: the 12 x 2048² fp32 MLP + Adam of benchmarks/train_loop.py (0.6 GB), every tensor changed
before each save (as an optimizer step would), ``keep=2``. The first save (staging allocation and
first touch) is printed but left out of the medians. Also per save: the machine's busy CPU
(``/proc/stat``, Linux, 10 ms ticks): all processes and kernel threads, so work the kernel does for
the writes on its own threads (converting allocated blocks, completions) counts too; on a quiet
machine the rest of it is near zero. Also printed: what the process read per save over
the whole run (``/proc/self/io`` ``rchar``, Linux): with incremental chunks, the background check after
each commit reads back the chunks the next save may reference.

``--memory-tier``: the same saves go to the memory tier alone (``PYCKPT_SHM_MB``'s ``/dev/shm`` copy,
``keep=1``, no storage), as every snapshot of a job with ``PYCKPT_STORAGE_EVERY`` does; its first two
saves create the two files the tier then writes over in turn, so the medians start at the third.

    python benchmarks/save_cpu.py [--saves 8] [--dir DIR] [--memory-tier]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time

import torch
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saves", type=int, default=8)
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--memory-tier", action="store_true", help="save to the /dev/shm memory tier only")
    args = ap.parse_args()
    if args.memory_tier:
        os.environ["PYCKPT_SHM_MB"] = "4096"
    import pyckpt
    from pyckpt import shm_tier

    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(12)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(2, 2048)).sum().backward()
    opt.step()
    root = tempfile.mkdtemp(prefix="pyckpt-savecpu-", dir=args.dir)
    rows = []
    tier = None
    read0 = _bytes_read()
    try:
        ck = pyckpt.Checkpointer(root, keep=2)
        if args.memory_tier:
            tier = shm_tier.tier_for(ck, ck.coord)
            if tier is None:
                raise SystemExit("save_cpu: the memory tier is off here (see the pyckpt: line above)")
            ck = tier.ckpt  # its Checkpointer: keep=1, codec none, in /dev/shm
        for i in range(args.saves):
            with torch.no_grad():
                for t in [*model.parameters(), *(v for s in opt.state.values() for v in s.values() if v.dim())]:
                    t.add_(1e-3)
            m0, r0, t0 = _machine_busy(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fut = ck.save(i, {"model": model.state_dict(), "optim": opt.state_dict()})
            fut.captured()
            t1 = time.perf_counter()
            ck.wait()
            t2, r1, m1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF), _machine_busy()
            rows.append((t1 - t0, t2 - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, m1 - m0))
            print(f"save {i}: captured {rows[-1][0]:.3f} s, durable {rows[-1][1]:.3f} s, "
                  f"CPU user {rows[-1][2]:.3f} s, sys {rows[-1][3]:.3f} s, machine {rows[-1][4]:.2f} s", flush=True)
        read = _bytes_read()
    finally:
        if tier is not None:
            tier.remove()
        shutil.rmtree(root, ignore_errors=True)
    first = 2 if args.memory_tier else 1
    steady = rows[first:] or rows
    med = [statistics.median(col) for col in zip(*steady)]
    print(f"{'memory tier: ' if args.memory_tier else ''}median of saves {first}..{len(rows) - 1}: "
          f"captured {med[0]:.3f} s, durable {med[1]:.3f} s, "
          f"CPU user {med[2]:.3f} s, sys {med[3]:.3f} s, machine {med[4]:.2f} s")
    if read is not None and read0 is not None:
        print(f"read by the process per save (whole run, /proc/self/io rchar / {len(rows)} saves): "
              f"{(read - read0) / len(rows) / 1e6:.1f} MB")


def _machine_busy() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat: all but idle and iowait), or 0."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _bytes_read() -> int | None:
    """Bytes this process has read through read()-like calls so far (Linux), else None."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except (OSError, StopIteration, ValueError):
        return None


if __name__ == "__main__":
    main()
