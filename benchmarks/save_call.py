"""What one ``Checkpointer.save()`` call costs the training thread for a state of many tensors.

A transformer and its optimizer have thousands of tensors; pyckpt's Python work per tensor
(encoding the state, checking that the saved layout still holds, the version counters of
incremental saves) is then what the caller waits for, not the bytes. This times the call alone,
in steady state (the layout of the previous save reused), in one process with no process group and
again with a process group up (gloo, world size 1: what every DDP job has, and where the state is
also searched for DTensors), and prints the median per call and per tensor of each, and the CPU
time the whole save took in the process (every thread: the call, the engine's copies, checksums and
writes, and the commit thread's Python work, which holds the GIL the training thread needs).

State: ``--layers`` x Linear(``--width``, ``--width``) + Adam (weight and bias, each with two moments
and a step counter: 8 tensors per layer), every parameter and moment changed before each save as an
optimizer step would. Each save is waited for (``result()``) before the next one, so the call is
timed without the previous save's writers on the cores.

    python benchmarks/save_call.py [--layers 800] [--width 128] [--saves 12] [--dir DIR]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import statistics
import tempfile
import time

import torch
from torch import nn


def _state(layers: int, width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return model, opt


def _time_saves(root: str, model: nn.Module, opt: torch.optim.Optimizer, saves: int) -> list[tuple[float, float]]:
    """(seconds of the ``save()`` call, CPU seconds of the whole save) of each save; the first
    (planned from scratch) is dropped."""
    import pyckpt

    moving = [*model.parameters(), *(v for s in opt.state.values() for v in s.values() if v.dim())]
    ck = pyckpt.Checkpointer(root, keep=2)
    out = []
    try:
        for i in range(saves + 1):
            with torch.no_grad():
                torch._foreach_add_(moving, 1e-3)
            state = {"model": model.state_dict(), "optim": opt.state_dict()}
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fut = ck.save(i, state)
            t1 = time.perf_counter()
            fut.result()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            out.append((t1 - t0, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime))
    finally:
        ck.close()
    return out[1:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=800, help="Linear layers (8 tensors each with Adam)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--saves", type=int, default=12, help="timed saves per row (after one untimed)")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    args = ap.parse_args()
    os.environ["PYCKPT_DISABLE"] = "1"  # the explicit API only: no transparent session in this process
    import torch.distributed as dist

    model, opt = _state(args.layers, args.width)
    ntensors = len(model.state_dict()) + sum(len(s) for s in opt.state.values())
    root = tempfile.mkdtemp(prefix="pyckpt-savecall-", dir=args.dir)
    rows = []
    try:
        rows.append(("no process group", _time_saves(os.path.join(root, "a"), model, opt, args.saves)))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            rows.append(("process group (gloo, world 1)", _time_saves(os.path.join(root, "b"), model, opt, args.saves)))
        finally:
            dist.destroy_process_group()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"save() call, {ntensors} tensors ({args.layers} x Linear({args.width}, {args.width}) + Adam), "
          f"{args.saves} saves per row, medians; torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("| setting | save() ms | min ms | per tensor µs | CPU of the whole save, ms (all threads) |")
    print("|---|---:|---:|---:|---:|")
    for name, saves in rows:
        calls, cpu = [c for c, _ in saves], [u for _, u in saves]
        med = statistics.median(calls)
        print(f"| {name} | {med * 1e3:.2f} | {min(calls) * 1e3:.2f} | {med / ntensors * 1e6:.2f} | "
              f"{statistics.median(cpu) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
