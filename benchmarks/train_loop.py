"""What frequent checkpoints cost a training loop: pyckpt against torch.save and dcp.async_save.

Every mode trains the same job for the same number of steps in a fresh
subprocess (so no mode inherits another's page cache, staging pool or hooks),
and modes are interleaved over several rounds so machine drift hits all of
them alike. Printed per mode: steps/s and its ratio to no checkpoint, the
median stall per checkpoint, the median time from a checkpoint's start until
it is durable, and the peak RSS.

    python benchmarks/train_loop.py [--job mlp|lora] [--every 10] [--steps 60] [--rounds 3]

Modes:
  none            no checkpoint
  torch.save      torch.save of model+optimizer state_dicts + fsync, on the training thread
  dcp.async_save  torch.distributed.checkpoint.async_save with one DefaultStager reused
                  for every checkpoint (its best configuration); the next checkpoint
                  waits for the previous one's upload
  pyckpt          Checkpointer.save(...) then future.captured() before the next step
  pyckpt-transparent  no code change: PYCKPT_DIR + PYCKPT_EVERY_STEPS, snapshots at the
                  training loader's next fetch, copied lazily during the next forward/backward
  pyckpt-transparent-eager  the same with PYCKPT_LAZY=0 (copied at the snapshot point)
  pyckpt-transparent-shm  lazy, plus the memory tier (PYCKPT_SHM_MB): every snapshot kept in
                  /dev/shm, every --storage-every'th (default: one per 10 steps) also written to disk

Stall: for torch.save / dcp / pyckpt the time the training thread spent inside the
checkpoint calls plus, for the asynchronous ones, the wait before the next optimizer
step until the tensors are staged (dcp's staging_completion, pyckpt's captured()); for the transparent mode, the extra time of the steps that
took a snapshot over the median step of the same run (the snapshot runs inside
the loader fetch, where the script cannot time it). Where CUDA is available the
job runs on the GPU (``--device cuda``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

MODES = ("none", "torch.save", "dcp.async_save", "pyckpt", "pyckpt-transparent", "pyckpt-transparent-eager",
         "pyckpt-transparent-shm")
TRANSPARENT = ("pyckpt-transparent", "pyckpt-transparent-eager", "pyckpt-transparent-shm")


# -- the job -------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable rank-``rank`` update."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.base = nn.Linear(width, width)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, width) * 0.01)
        self.lora_b = nn.Parameter(torch.zeros(width, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t()


def build_job(kind: str, device: str):
    """(model, optimizer, loader): 'mlp' = ~50M-param fp32 MLP + Adam (0.6 GB of state);
    'lora' = a frozen ~50M-param base with rank-8 adapters (only adapters train)."""
    torch.manual_seed(0)
    width, depth = 2048, 12
    if kind == "mlp":
        model = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU())])
        params = list(model.parameters())
    else:
        model = nn.Sequential(*[m for _ in range(depth) for m in (LoRALinear(width, 8), nn.ReLU())])
        params = [p for n, p in model.named_parameters() if "lora" in n]
    model.to(device)
    opt = torch.optim.Adam(params, lr=1e-4)
    data = TensorDataset(torch.randn(4096, width), torch.randn(4096, width))
    loader = DataLoader(data, batch_size=32, shuffle=True)
    return model, opt, loader


def child(args: argparse.Namespace) -> None:
    """Run one mode; print one JSON line of results."""
    mode, device = args.child, args.device
    if mode in TRANSPARENT:
        import pyckpt.activation as activation

        extra = {"lazy": 0} if mode == "pyckpt-transparent-eager" else {}
        if mode == "pyckpt-transparent-shm":
            extra = {"shm_mb": 4096, "storage_every": args.storage_every or max(1, 10 // args.every)}
        activation.enable(args.dir, every_steps=args.every, keep=2, log="quiet", **extra)
    model, opt, loader = build_job(args.job, device)
    loss_fn = torch.nn.MSELoss()
    saver = Saver(mode, args.dir, model, opt)
    step_times, stalls, durable = [], [], []
    step, t_start = 0, None
    t_last = time.perf_counter()  # iterations are timed end to end: the loader fetch (where a transparent
    # snapshot is taken) and the wait before opt.step() both fall inside the step that pays for them
    warm = args.warmup
    while step < args.steps + warm:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            if stalls:
                stalls[-1] += saver.before_step()
            opt.step()
            step += 1
            if device == "cuda":
                torch.cuda.synchronize()
            if step == warm:
                t_start = time.perf_counter()
            if step > warm and mode != "none" and mode not in TRANSPARENT and step % args.every == 0:
                stalls.append(saver.checkpoint(step))
            now = time.perf_counter()
            step_times.append(now - t_last)
            t_last = now
            if step >= args.steps + warm:
                break
    elapsed = time.perf_counter() - t_start
    durable = saver.finish()
    if mode in TRANSPARENT:
        import pyckpt.activation as activation

        # The fetch that snapshots belongs to the step after the triggering one. Stall: that step's
        # time over the median step without a snapshot (with one every step: the driver uses the
        # no-checkpoint mode's median step instead).
        timed = step_times[warm:]
        snap = [(i + warm) % args.every == 0 and i > 0 for i in range(len(timed))]
        quiet = [t for t, s in zip(timed, snap) if not s]
        snap_times = [t for t, s in zip(timed, snap) if s]
        if quiet and args.every > 1:
            med = statistics.median(quiet)
            stalls = [max(0.0, t - med) for t in snap_times]
        activation.disable()
    print(json.dumps({
        "mode": mode, "steps_per_s": args.steps / elapsed, "stalls": stalls, "durable": durable,
        "snap_times": snap_times if mode in TRANSPARENT else [],
        "median_step": statistics.median(step_times[warm:]),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }))


class Saver:
    """One checkpointing method; ``checkpoint(step)`` returns the training thread's stall."""

    def __init__(self, mode: str, directory: str, model, opt) -> None:
        self.mode, self.dir, self.model, self.opt = mode, directory, model, opt
        self.pending = None  # (start time, future-like)
        self.staging = None  # a future the next optimizer step must wait for
        self.durable: list[float] = []
        if mode == "dcp.async_save":
            import torch.distributed as dist
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
            dist.init_process_group("gloo", rank=0, world_size=1)
            gpu = torch.cuda.is_available()
            # Reused stager, staging in the background (waited for before the next optimizer
            # step); pinned/shared memory and non-blocking copies need an accelerator.
            self.stager = DefaultStager(StagingOptions(gpu, gpu, True, gpu))
        elif mode == "pyckpt":
            import pyckpt

            self.ckpt = pyckpt.Checkpointer(directory, keep=2)

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optim": self.opt.state_dict()}

    def before_step(self) -> float:
        """Wait until the last checkpoint no longer reads the tensors; returns the time waited."""
        if self.staging is None:
            return 0.0
        t0 = time.perf_counter()
        if self.mode == "pyckpt":
            self.staging.captured()
        else:
            self.staging.result()
        self.staging = None
        return time.perf_counter() - t0

    def _reap(self, wait: bool) -> None:
        if self.pending is None:
            return
        t0, fut = self.pending
        if wait or fut.done():
            fut.result()
            self.durable.append(time.perf_counter() - t0)
            self.pending = None

    def checkpoint(self, step: int) -> float:
        t0 = time.perf_counter()
        path = os.path.join(self.dir, f"step-{step}")
        if self.mode == "torch.save":
            with open(path + ".pt", "wb") as f:
                torch.save(self.state(), f)
                f.flush()
                os.fsync(f.fileno())
            self.durable.append(time.perf_counter() - t0)
            _prune(self.dir, path + ".pt")
        elif self.mode == "dcp.async_save":
            import torch.distributed.checkpoint as dcp

            self._reap(wait=True)  # DCP allows one upload at a time with a reused stager
            writer = dcp.FileSystemWriter(path, thread_count=4, sync_files=True)
            resp = dcp.async_save(self.state(), storage_writer=writer, async_stager=self.stager)
            if hasattr(resp, "staging_completion"):
                self.staging, fut = resp.staging_completion, resp.upload_completion
            else:
                fut = resp
            self.pending = (t0, fut)
            _prune(self.dir, path)
        elif self.mode == "pyckpt":
            self._reap(wait=False)
            fut = self.ckpt.save(step, self.state())
            self.staging = fut  # captured() before the next optimizer step
            self.pending = (t0, fut)
        stall = time.perf_counter() - t0
        self._reap(wait=False)
        return stall

    def finish(self) -> list[float]:
        self._reap(wait=True)
        if self.mode == "pyckpt":
            self.ckpt.wait()
        return self.durable


def _prune(directory: str, keep_path: str) -> None:
    """Keep two checkpoints, like the others' keep=2."""
    entries = sorted((os.path.join(directory, n) for n in os.listdir(directory)), key=os.path.getmtime)
    for p in entries[:-2]:
        if p != keep_path:
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)


# -- the driver ------------------------------------------------------------------------------
def run_mode(args: argparse.Namespace, mode: str) -> dict:
    work = tempfile.mkdtemp(prefix="pyckpt-trainloop-", dir=args.dir)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--dir", work, "--job", args.job,
           "--every", str(args.every), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device, "--storage-every", str(args.storage_every)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_")}
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    finally:
        subprocess.run(["sync"], check=False)
        from pyckpt import shm_tier  # a killed shm-mode child leaves its memory copy behind

        shutil.rmtree(shm_tier.shm_path(work), ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    if out.returncode != 0:
        raise SystemExit(f"mode {mode} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--job", default="mlp", choices=("mlp", "lora"))
    p.add_argument("--every", type=int, default=10, help="checkpoint every N optimizer steps")
    p.add_argument("--steps", type=int, default=60, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--storage-every", type=int, default=0,
                   help="pyckpt-transparent-shm: write every Nth snapshot to disk (0: one per 10 steps)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        return child(args)
    modes = args.modes.split(",")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for m in modes:
            res = run_mode(args, m)
            results[m].append(res)
            print(f"round {r + 1}/{args.rounds} {m:<20} {res['steps_per_s']:.3f} steps/s", flush=True)
    base = statistics.median(x["steps_per_s"] for x in results.get("none", [])) if "none" in results else None
    print(f"\njob={args.job} device={args.device} every={args.every} steps={args.steps} rounds={args.rounds}")
    print(f"{'mode':<20} {'steps/s':>8} {'ratio':>6} {'stall med':>10} {'durable med':>12} {'peak RSS':>9}")
    base_step = statistics.median(x["median_step"] for x in results["none"]) if "none" in results else None
    for m, runs in results.items():
        sps = statistics.median(x["steps_per_s"] for x in runs)
        stalls = [s for x in runs for s in x["stalls"]]
        if not stalls and base_step is not None:  # transparent, a snapshot every step
            stalls = [max(0.0, t - base_step) for x in runs for t in x["snap_times"]]
        dur = [d for x in runs for d in x["durable"]]
        ratio = f"{sps / base:.3f}" if base else "-"
        print(f"{m:<20} {sps:>8.3f} {ratio:>6} {_fmt(stalls):>10} {_fmt(dur):>12} "
              f"{max(x['peak_rss_gb'] for x in runs):>7.2f} GB")


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.4f} s" if xs else "-"


if __name__ == "__main__":
    main()
