"""What background checkpoint writes take from a job that keeps every core busy.

A steady load stands in for training: 512x512 fp32 matmuls on all of torch's intra-op threads,
counted for ``--seconds``. Beside it a thread changes a state of ``--mb`` MB (4 MiB tensors, as an
optimizer step would) and checkpoints it, waits until it is durable, sleeps ``--pause`` s and starts
again. Modes, each in a fresh process, interleaved over ``--rounds``:

- ``none``: the thread changes the state and sleeps, no checkpoint (the reference);
- ``raw``: the state's bytes written to one file with plain ``write`` + ``fsync`` (what the disk
  alone costs, one thread);
- ``torch.save``: ``torch.save`` of the state + ``fsync``;
- ``pyckpt``: ``pyckpt.Checkpointer.save`` (keep=2, defaults otherwise), waited until committed.

Prints per mode the load's rate (median over rounds), its ratio to ``none``, checkpoints per run and
the load time lost per checkpoint, ``(1 - ratio) * seconds / checkpoints``: on a machine whose cores
all train, that is what one checkpoint costs the job, copy, checksums, writes and commit, and how
its threads crowd the job's (a parallel matmul waits for its slowest thread).

    python benchmarks/interference.py [--mb 100] [--seconds 20] [--pause 0.3] [--rounds 3]
                                      [--modes none,raw,torch.save,pyckpt]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MODES = ("none", "raw", "torch.save", "pyckpt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=100, help="state size in MB (4 MiB tensors)")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long the load runs per mode and round")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between a checkpoint's end and the next")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, from: " + ", ".join(MODES))
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown or "none" not in modes:
        ap.error(f"--modes: unknown {unknown}" if unknown else "--modes must include none (the reference)")
    runs: dict[str, list[tuple[float, int]]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for m in modes:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", m, "--mb", str(args.mb),
                   "--seconds", str(args.seconds), "--pause", str(args.pause)]
            if args.dir:
                cmd += ["--dir", args.dir]
            env = dict(os.environ, PYCKPT_DISABLE="1")  # Checkpointer only: no transparent session
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout.split()
            rate, saves = float(out[-2]), int(out[-1])
            runs[m].append((rate, saves))
            print(f"round {r} {m}: {rate:.1f} matmuls/s, {saves} checkpoints", flush=True)
    ref = statistics.median(rate for rate, _ in runs["none"])
    print(f"\n{args.mb} MB state, load {args.seconds:g} s per run, pause {args.pause:g} s, {args.rounds} rounds, "
          f"torch threads {_threads()}, {os.cpu_count()} CPUs\n")
    print("| mode | load (matmuls/s) | ratio to none | checkpoints per run | load lost per checkpoint |")
    print("|---|---:|---:|---:|---:|")
    for m in modes:
        rate = statistics.median(x for x, _ in runs[m])
        saves = statistics.median(n for _, n in runs[m])
        lost = f"{(1 - rate / ref) * args.seconds / saves:.3f} s" if m != "none" and saves else ""
        print(f"| {m} | {rate:.1f} | {rate / ref:.3f} | {saves:g} | {lost} |")


def _threads() -> int:
    import torch
    return torch.get_num_threads()


def _child(args: argparse.Namespace) -> None:
    import torch
    state = {f"t{i}": torch.randn(1 << 20) for i in range(max(1, args.mb * 10**6 // (4 << 20)))}
    root = tempfile.mkdtemp(prefix="pyckpt-interference-", dir=args.dir)
    save = _saver(args.child, root, state)
    stop, saves, failed = threading.Event(), [0], []

    def loop() -> None:
        try:
            while not stop.is_set():
                with torch.no_grad():
                    for t in state.values():
                        t.add_(1e-3)
                if save is not None:
                    save(saves[0])
                    saves[0] += 1
                stop.wait(args.pause)
        except BaseException as e:  # reported by the parent's check=True, not lost in a thread
            failed.append(e)

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    th = threading.Thread(target=loop, name="checkpoints")
    th.start()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.seconds:
        for _ in range(50):
            a @ b
        n += 50
    rate = n / (time.perf_counter() - t0)
    stop.set()
    th.join()
    shutil.rmtree(root, ignore_errors=True)
    if failed:
        raise failed[0]
    print(rate, saves[0])


def _saver(mode: str, root: str, state: dict):
    """A function that writes checkpoint ``i`` of ``state`` durably, or None for ``none``."""
    import torch
    if mode == "none":
        return None
    if mode == "raw":
        def raw(i: int) -> None:
            path = os.path.join(root, f"raw-{i % 2}.bin")
            with open(path, "wb") as f:
                for t in state.values():
                    f.write(t.numpy().data)
                f.flush()
                os.fsync(f.fileno())
        return raw
    if mode == "torch.save":
        def tsave(i: int) -> None:
            path = os.path.join(root, f"ckpt-{i % 2}.pt")
            with open(path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        return tsave
    import pyckpt
    ck = pyckpt.Checkpointer(root, keep=2)
    return lambda i: ck.save(i, state).result(120)


if __name__ == "__main__":
    main()
