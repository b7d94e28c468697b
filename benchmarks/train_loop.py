"""What frequent checkpoints cost a training loop: pyckpt against torch.save and dcp.async_save.

Every mode trains the same job for the same number of steps in a fresh
subprocess (so no mode inherits another's page cache, staging pool or hooks),
and modes are interleaved over several rounds so machine drift hits all of
them alike. Printed per mode: steps/s and its ratio to no checkpoint, the
median stall per checkpoint, the median time from a checkpoint's start until
it is durable, and the peak RSS.

    python benchmarks/train_loop.py [--job mlp|lora] [--every 10] [--steps 60] [--rounds 3] [--restore-rounds 2]

    python benchmarks/train_loop.py --paired [--window 40] [--pairs 8] [--every 10]

``--paired`` measures the explicit modes (torch.save, dcp.async_save, pyckpt, pyckpt-memory, floor-memcpy)
another way: one process trains the job and, for each mode in turn, runs a window of ``--window`` steps
without checkpoints next to one with them (which comes first alternates, the modes' order rotates every
round); each ratio is taken within its pair, so the machine's drift between processes and over minutes,
which is larger than the effect on a shared 2-vCPU box, cancels, and all modes meet the same process. A checkpoint window ends
when its last checkpoint is durable, which charges it at most one write's tail more than a loop would pay.

It ends with one Markdown table to paste (docs/PERFORMANCE.md): per mode steps/s, the ratio to no
checkpoint, the stall per checkpoint and, for the transparent modes, its two parts measured inside
pyckpt (the snapshot call at the consistent point; the next optimizer step's wait for the copy); then
the restore table (``measure_restore``: storage with a cold page cache, storage warm, the memory tier)
and a line checking the issue's goals.

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
  pyckpt-memory   (--paired only) the memory tier of pyckpt-transparent-shm driven through its own
                  objects (shm_tier.Tier) from the explicit loop: every checkpoint kept in /dev/shm,
                  every --storage-every'th (default: one per 10 steps) copied from it to disk;
                  captured() before the next step
  floor-memcpy    not a checkpoint: the least any consistent host-memory snapshot must do here,
                  one copy of every state byte into a preallocated buffer on a background
                  thread, waited for before the next optimizer step; no hashing, no disk. Its
                  ratio bounds what any method (pyckpt's included) can reach on this machine

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
import threading
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import _page_cache  # benchmarks/_page_cache.py (the script's folder is on sys.path)

MODES = ("none", "torch.save", "dcp.async_save", "pyckpt", "pyckpt-transparent", "pyckpt-transparent-eager",
         "pyckpt-transparent-shm", "floor-memcpy")
PAIRED_ONLY = ("pyckpt-memory",)  # --paired: the memory tier driven in-process (no transparent activation)
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


def build_job(kind: str, device: str, width: int = 2048, depth: int = 12, batch: int = 32):
    """(model, optimizer, loader): 'mlp' = fp32 MLP + Adam, by default ~50M parameters (0.6 GB of
    state); 'lora' = a frozen base of that size with rank-8 adapters (only adapters train).
    ``width``/``depth``/``batch`` size the job for a GPU, whose step must take long enough to hide a
    copy of the state (the default is sized for the 2-core CPU)."""
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU())])
        params = list(model.parameters())
    else:
        model = nn.Sequential(*[m for _ in range(depth) for m in (LoRALinear(width, 8), nn.ReLU())])
        params = [p for n, p in model.named_parameters() if "lora" in n]
    model.to(device)
    opt = torch.optim.Adam(params, lr=1e-4)
    if batch <= 256:
        data = TensorDataset(torch.randn(4096, width), torch.randn(4096, width))
        return model, opt, DataLoader(data, batch_size=batch, shuffle=True)
    # Large batches come whole from the dataset (one index per batch, not one per sample, which
    # would cost the host more than a GPU step), from pinned memory when the job runs on a GPU.
    data = TensorDataset(torch.randn(4, batch, width), torch.randn(4, batch, width))
    return model, opt, DataLoader(data, batch_size=None, shuffle=True, pin_memory=device == "cuda")


def child(args: argparse.Namespace) -> None:
    """Run one mode; print one JSON line of results."""
    mode, device = args.child, args.device
    if mode in TRANSPARENT:
        import pyckpt.activation as activation

        extra = {"lazy": 0} if mode == "pyckpt-transparent-eager" else {}
        if mode == "pyckpt-transparent-shm":
            extra = {"shm_mb": 4096, "storage_every": args.storage_every or max(1, 10 // args.every)}
        inside = _time_inside()  # before enable(): it binds the pre-step hook
        activation.enable(args.dir, every_steps=args.every, keep=2, log="quiet", **extra)
    model, opt, loader = build_job(args.job, device, args.width, args.depth, args.batch)
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
            if device == "cuda":  # the training stream only: not the checkpoint's copies
                torch.cuda.current_stream().synchronize()
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
        point, wait = inside()
    print(json.dumps({
        "point": point if mode in TRANSPARENT else [], "wait": wait if mode in TRANSPARENT else [],
        "mode": mode, "steps_per_s": args.steps / elapsed, "stalls": stalls, "durable": durable,
        "snap_times": snap_times if mode in TRANSPARENT else [],
        "median_step": statistics.median(step_times[warm:]),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }))


def paired_child(args: argparse.Namespace) -> None:
    """``--paired``: one process trains the job and, for each mode in turn (order rotated every round),
    runs a window of ``--window`` steps without checkpoints next to one with a checkpoint every
    ``--every`` steps (which comes first alternates), so every ratio compares neighbouring windows of
    the same process. A checkpoint window ends only when its last checkpoint is durable (pessimistic by
    at most that one write's tail). Prints one JSON line: per mode, each pair's seconds without and with."""
    modes, device = args.child.split(":", 1)[1].split(","), args.device
    model, opt, loader = build_job(args.job, device, args.width, args.depth, args.batch)
    loss_fn = torch.nn.MSELoss()
    storage_every = args.storage_every or max(1, 10 // args.every)
    savers = {}
    for m in modes:
        os.makedirs(os.path.join(args.dir, m), exist_ok=True)
        savers[m] = Saver(m, os.path.join(args.dir, m), model, opt, storage_every)
    batches = iter(())
    step, pairs = 0, {m: [] for m in modes}
    parts: dict[str, list[list[float]]] = {}
    steps: dict[str | None, list[list[tuple[float, str]]]] = {}  # per mode (None: no checkpoint), per window

    def run(n: int, saver: Saver | None) -> float:
        """Train n steps; returns the seconds. With a saver, adds to parts[saver.mode] where the
        training thread waited: in save(), for capture before an optimizer step, for durability at the end."""
        nonlocal batches, step
        t0 = time.perf_counter()
        waiting = False
        waited = [0.0, 0.0, 0.0]  # save() call, capture wait, end-of-window durable wait
        times: list[tuple[float, str]] = []  # per step: seconds less the waits above, Saver.in_flight()
        for i in range(n):
            t_step, w_before = time.perf_counter(), waited[0] + waited[1]
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            if waiting:
                waited[1] += saver.before_step()
                waiting = False
            opt.step()
            step += 1
            if device == "cuda":  # the training stream only: not the checkpoint's copies
                torch.cuda.current_stream().synchronize()
            if saver is not None and i % args.every == 0:
                waited[0] += saver.checkpoint(step)
                waiting = True
            times.append((time.perf_counter() - t_step - (waited[0] + waited[1] - w_before),
                          saver.in_flight() if saver is not None else ""))
        steps.setdefault(saver.mode if saver is not None else None, []).append(times)
        if saver is not None:
            waited[1] += saver.before_step()
            t_end = time.perf_counter()
            saver.finish()  # durable before the window ends: its writes are not left to the next one
            waited[2] = time.perf_counter() - t_end
            parts.setdefault(saver.mode, []).append(waited)
        return time.perf_counter() - t0

    run(args.warmup, None)
    for m in modes:
        run(args.window, savers[m])  # first checkpoints (staging allocation, first fingerprints) not counted
    for k in range(args.pairs):
        for m in modes[k % len(modes):] + modes[:k % len(modes)]:
            if k % 2 == 0:
                off, on = run(args.window, None), run(args.window, savers[m])
            else:
                on, off = run(args.window, savers[m]), run(args.window, None)
            pairs[m].append((off, on))
    # The measured windows' waits only: the first window per mode (allocation, first fingerprints) is not counted.
    parts = {m: w[1:] for m, w in parts.items()}
    # Per checkpoint window, how much longer its steps took than a step of the windows without
    # (their median), apart from the waits: split by what of a checkpoint ran in the background at
    # the step's end (its write, the check of the last commit, nothing).
    plain = statistics.median(t for w in steps[None][1:] for t, _ in w)  # the warm-up window left out
    for m in modes:
        for j, w in enumerate(steps.get(m, [])[1:]):
            for label in ("write", "check", ""):
                ts = [t - plain for t, b in w if b == label]
                parts[m][j] += [sum(ts), len(ts)]
    print(json.dumps({"pairs": pairs, "parts": parts, "checkpoints_per_window": -(-args.window // args.every),
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def measure_paired(args: argparse.Namespace, modes: list[str]) -> str:
    """Run ``paired_child`` once for all explicit modes; one Markdown table of per-pair ratios."""
    lines = [f"paired windows: job={args.job} ({args.width}x{args.depth}, batch {args.batch}) device={args.device} "
             f"every={args.every} window={args.window} "
             f"steps pairs={args.pairs} (one process, modes in rotation; ratio = window without / window "
             f"with checkpoints next to it, median over pairs); {settings_line()}", "",
             "| mode | ratio to none (median) | ratio, quartiles | extra seconds per checkpoint (median) | "
             "window without (median) |", "|---|---:|---:|---:|---:|"]
    res = run_mode(args, "paired:" + ",".join(modes))
    for m in modes:
        ratios = sorted(off / on for off, on in res["pairs"][m])
        extra = [(on - off) / res["checkpoints_per_window"] for off, on in res["pairs"][m]]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        lines.append(f"| {m} | {statistics.median(ratios):.3f} | {q[0]:.3f}–{q[2]:.3f} | "
                     f"{statistics.median(extra):.4f} s | "
                     f"{statistics.median(o for o, _ in res['pairs'][m]):.3f} s |")
    lines += ["", "Where the extra time goes (median over the checkpoint windows, seconds per checkpoint; "
              "'rest' = extra time minus these waits: slower steps, split by what of the checkpoint ran in the background "
              "at each step's end (medians per column: they need not add up)):", "",
              "| mode | save() call | wait for capture | wait for durable at window end | rest | "
              "of which: steps while writing (steps) | while checking the last commit (steps) | other steps |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    n = res["checkpoints_per_window"]
    for m in modes:
        waits = res.get("parts", {}).get(m, [])
        if not waits:
            continue
        extra = statistics.median((on - off) / n for off, on in res["pairs"][m])
        med = [statistics.median(w[j] for w in waits) / n for j in range(9)]
        lines.append(f"| {m} | {med[0]:.4f} s | {med[1]:.4f} s | {med[2]:.4f} s | {extra - sum(med[:3]):.4f} s | "
                     f"{med[3]:.4f} s ({med[4]:.1f}) | {med[5]:.4f} s ({med[6]:.1f}) | {med[7]:.4f} s |")
    return "\n".join(lines)


def restore_child(args: argparse.Namespace) -> None:
    """Restore measurement. ``restore-setup``: train 5 steps with the memory tier on, snapshots at steps 2
    and 4 (storage copied from the tier), wait for both copies, then die without cleanup (``os._exit``,
    as a crash would) so both stay. ``restore-shm`` / ``restore-storage``: relaunch the same script with
    the tier on / off; the transparent resume (choose + verify, then read into the live model at the
    first fetch) is timed inside pyckpt's own calls. Decisions come from the environment: the resume
    puts this script's locals back (args included) as they were in the setup run."""
    import pyckpt.activation as activation
    from pyckpt import resume

    for owner, name in ((resume, "choose"), (resume.Source, "restore")):
        _timed(owner, name)
    setup = os.environ["TL_RESTORE"] == "setup"
    extra = {"shm_mb": 4096, "storage_every": 1} if os.environ["TL_RESTORE"] in ("setup", "shm") else {}
    activation.enable(args.dir, every_steps=2 if setup else 10**6, keep=2, log="quiet", **extra)
    model, opt, loader = build_job(args.job, args.device, args.width, args.depth, args.batch)
    loss_fn = torch.nn.MSELoss()
    n = 0
    for x, y in loader:
        if os.environ["TL_RESTORE"] != "setup":
            break  # the first fetch is the snapshot point: the state is restored by now
        x, y = x.to(args.device), y.to(args.device)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        n += 1
        if n == 5:
            break
    if os.environ["TL_RESTORE"] == "setup":
        activation._SESSION.flush()
    else:
        mod = sys.modules["pyckpt.resume"]  # (kept there: this frame's locals are the setup run's now)
        took, src = mod._tl_took, getattr(mod, "_tl_source", None)
        print(json.dumps({"seconds": sum(took.values()), "parts": took, "source": src}), flush=True)
    sys.stdout.flush()
    os._exit(0)  # no exit handlers: the memory copy stays, as after a crash


def _timed(owner, name: str) -> None:
    """Wrap ``owner.name`` so its total run time lands in ``pyckpt.resume._tl_took[name]`` (and the chosen
    checkpoint's path in ``_tl_source``)."""
    orig = getattr(owner, name)
    took = sys.modules["pyckpt.resume"].__dict__.setdefault("_tl_took", {})

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            out = orig(*a, **k)
        finally:
            took[name] = took.get(name, 0.0) + time.perf_counter() - t0
        if name == "choose" and out is not None:
            sys.modules["pyckpt.resume"]._tl_source = out.path
        return out

    setattr(owner, name, wrapper)


def _read_all(root: str) -> None:
    """Warm start: read every file under ``root`` once, so the page cache holds it."""
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb", buffering=0) as f:
                while f.read(16 << 20):
                    pass


def measure_restore(args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds to resume the job's state from storage (cold and warm page cache) and from the memory
    tier, each in a fresh process, interleaved over ``--restore-rounds``."""
    from pyckpt import shm_tier

    work = tempfile.mkdtemp(prefix="pyckpt-restore-", dir=args.dir)
    out: dict[str, list[float]] = {"storage-cold": [], "storage-warm": [], "memory-tier": []}
    try:
        _restore_run(args, work, "setup")
        for _ in range(args.restore_rounds):
            for kind in ("storage-cold", "storage-warm", "memory-tier"):
                if kind == "storage-cold":
                    _page_cache.drop(work)
                elif kind == "storage-warm":
                    _read_all(work)
                res = _restore_run(args, work, "shm" if kind == "memory-tier" else "storage")
                where = res["source"] or ""
                if where.startswith(shm_tier.SHM_ROOT) != (kind == "memory-tier"):
                    raise SystemExit(f"restore {kind} resumed from {where!r}")
                out[kind].append(res["seconds"])
                for part, sec in res["parts"].items():  # choose (+ verify) and restore (read into the model)
                    out.setdefault(f"{kind}: {part}", []).append(sec)
    finally:
        shutil.rmtree(shm_tier.shm_path(work), ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return out


def _restore_run(args: argparse.Namespace, work: str, what: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "restore", "--dir", work, "--job", args.job,
           "--device", args.device, *_size_args(args)]
    env = _child_env()
    env["TL_RESTORE"] = what
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if r.returncode != 0:
        raise SystemExit(f"restore {what} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1]) if what != "setup" else {}


def _time_inside():
    """Time, inside pyckpt, the two parts of a transparent snapshot's stall: the snapshot call at the
    consistent point, and the next optimizer step's wait for the copy (its pre-step hook). Returns a
    function giving (point seconds per snapshot, wait seconds per snapshot), the first snapshot dropped."""
    import pyckpt.lazy as lazy
    import pyckpt.transparent as transparent

    point, wait, after = [], [], [False]
    snap, before = transparent.Session._snapshot, lazy.Lazy.before_step

    def _snapshot(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return snap(self, *a, **k)
        finally:
            point.append(time.perf_counter() - t0)
            after[0] = True

    def before_step(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return before(self, *a, **k)
        finally:
            if after[0]:
                wait.append(time.perf_counter() - t0)
                after[0] = False

    transparent.Session._snapshot, lazy.Lazy.before_step = _snapshot, before_step
    return lambda: (point[1:], wait[1:])


class Saver:
    """One checkpointing method; ``checkpoint(step)`` returns the training thread's stall."""

    def __init__(self, mode: str, directory: str, model, opt, storage_every: int = 1) -> None:
        self.mode, self.dir, self.model, self.opt = mode, directory, model, opt
        # pyckpt's staging pool and memory tier hold the whole state (parameters + two Adam moments),
        # so a large GPU job's capture is not throttled by the disk: the defaults, or more.
        state_mib = 3 * sum(p.numel() * p.element_size() for p in model.parameters()) >> 20
        os.environ["PYCKPT_STAGING_MB"] = str(max(1024, state_mib * 5 // 4))
        self.pending = None  # (start time, future-like, [the time it was done], its watcher): _track
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
        elif mode == "pyckpt-memory":
            os.environ["PYCKPT_SHM_MB"] = str(max(4096, state_mib * 5 // 2))  # the tier holds two copies at a time
            import pyckpt
            from pyckpt import shm_tier

            self.ckpt = pyckpt.Checkpointer(directory, keep=2)
            self.tier = shm_tier.tier_for(self.ckpt, self.ckpt.coord)
            if self.tier is None:
                raise SystemExit("pyckpt benchmark: the memory tier is off here (see the pyckpt: line above)")
            self.tier.every = storage_every
            self.snapshots = 0
        elif mode == "floor-memcpy":
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(1)
            self.buffers: list[torch.Tensor] | None = None

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optim": self.opt.state_dict()}

    def before_step(self) -> float:
        """Wait until the last checkpoint no longer reads the tensors; returns the time waited."""
        if self.staging is None:
            return 0.0
        t0 = time.perf_counter()
        if self.mode in ("pyckpt", "pyckpt-memory"):
            self.staging.captured()
        else:
            self.staging.result()
        self.staging = None
        return time.perf_counter() - t0

    def in_flight(self) -> str:
        """What of the last checkpoint still runs in the background: "write" (not durable yet),
        "check" (pyckpt's read-back check of the last commit, which later saves reference), or ""."""
        if self.pending is not None and not self.pending[2]:
            return "write"
        if self.mode.startswith("pyckpt"):
            from pyckpt import incremental
            if incremental._RUNNING:  # pre-checks not finished (a private set: this is a benchmark)
                return "check"
        return ""

    def _reap(self, wait: bool) -> None:
        if self.pending is None:
            return
        t0, fut, done_at, watcher = self.pending
        if wait or done_at:
            watcher.join()
            fut.result()
            self.durable.append(done_at[0] - t0)
            self.pending = None

    def _track(self, t0: float, fut) -> None:
        """Make ``fut`` the pending checkpoint, timed when it is done, not when ``_reap`` next looks:
        that is at the next checkpoint, and a write done early counted as the whole interval."""
        done_at: list[float] = []

        def watch() -> None:
            try:
                fut.result()
            except BaseException:  # noqa: BLE001 (raised again by _reap)
                pass
            done_at.append(time.perf_counter())

        watcher = threading.Thread(target=watch, name="durable-watch", daemon=True)
        watcher.start()
        self.pending = (t0, fut, done_at, watcher)

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
            self._track(t0, fut)
            _prune(self.dir, path)
        elif self.mode == "floor-memcpy":
            live = [t for t in _tensors(self.state()) if t.numel()]
            if self.buffers is None:  # preallocated once, like a staging pool
                self.buffers = [torch.empty_like(t, device="cpu").pin_memory() if t.is_cuda
                                else torch.empty_like(t) for t in live]

            def copy_all() -> None:
                for dst, src in zip(self.buffers, live):
                    dst.copy_(src, non_blocking=src.is_cuda)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()

            fut = self.pool.submit(copy_all)
            self.staging = fut  # the next optimizer step waits for the copy; nothing becomes durable
        elif self.mode == "pyckpt":
            # save() waits for the previous checkpoint to commit (one in flight), so waiting here
            # costs the stall nothing and records its durable time; a checkpoint still in flight
            # used to be dropped from the figures, leaving only those faster than the interval.
            self._reap(wait=True)
            fut = self.ckpt.save(step, self.state())
            self.staging = fut  # captured() before the next optimizer step
            self._track(t0, fut)
        elif self.mode == "pyckpt-memory":
            self.snapshots += 1
            fut = self.tier.save(step, self.state(), None)
            if self.tier.storage_due(self.snapshots):
                stored = self.tier.publish(fut, self.ckpt, step)
                if stored is None:
                    raise SystemExit("pyckpt benchmark: storage cannot be copied from the memory tier here")
                self._reap(wait=False)
                if self.pending is None:
                    self._track(t0, stored)
            self.staging = fut
        stall = time.perf_counter() - t0
        self._reap(wait=False)
        return stall

    def finish(self) -> list[float]:
        self._reap(wait=True)
        if self.mode == "pyckpt":
            self.ckpt.wait()
        elif self.mode == "pyckpt-memory":
            self.tier.ckpt.wait()
            if self.tier.publication is not None:
                self.tier.publication.wait()
        return self.durable


def _tensors(tree) -> list[torch.Tensor]:
    # Not pyckpt.tree.flatten: importing pyckpt would switch it on in this no-pyckpt mode.
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def _prune(directory: str, keep_path: str) -> None:
    """Keep two checkpoints, like the others' keep=2."""
    entries = sorted((os.path.join(directory, n) for n in os.listdir(directory)), key=os.path.getmtime)
    for p in entries[:-2]:
        if p != keep_path:
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)


# -- the driver ------------------------------------------------------------------------------
# How pyckpt saves: these settings reach every mode's process. Every other PYCKPT_* variable is
# dropped (PYCKPT_DIR and the other activation settings would turn the transparent layer on in the
# explicit modes, or make a transparent mode resume); ``main`` names both kinds.
TUNING = ("PYCKPT_INCREMENTAL", "PYCKPT_INCREMENTAL_VERIFY", "PYCKPT_STAGING_MB", "PYCKPT_CHUNK_MB",
          "PYCKPT_IO_THREADS", "PYCKPT_COPY_THREADS", "PYCKPT_IO_NICE", "PYCKPT_STAGING_TIMEOUT_S")


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_") or k in TUNING}


def settings_line() -> str:
    """The pyckpt settings every mode runs with, for the output (a figure depends on them)."""
    passed = [f"{k}={os.environ[k]}" for k in TUNING if k in os.environ]
    return "pyckpt settings: " + (" ".join(passed) if passed else "defaults")


def _size_args(args: argparse.Namespace) -> list[str]:
    return ["--width", str(args.width), "--depth", str(args.depth), "--batch", str(args.batch)]


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    work = tempfile.mkdtemp(prefix="pyckpt-trainloop-", dir=args.dir)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--dir", work, "--job", args.job,
           "--every", str(args.every), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device, "--storage-every", str(args.storage_every),
           "--window", str(args.window), "--pairs", str(args.pairs), *_size_args(args)]
    env = _child_env()
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    finally:
        subprocess.run(["sync"], check=False)
        from pyckpt import shm_tier  # a killed shm-mode child leaves its memory copy behind

        for d in [work] + [os.path.join(work, m) for m in MODES + PAIRED_ONLY]:
            shutil.rmtree(shm_tier.shm_path(d), ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    if out.returncode != 0:
        raise SystemExit(f"mode {mode} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--job", default="mlp", choices=("mlp", "lora"))
    p.add_argument("--width", type=int, default=2048, help="layer width (default 2048)")
    p.add_argument("--depth", type=int, default=12, help="layers (default 12: with width 2048, 0.6 GB of state)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
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
    p.add_argument("--restore-rounds", type=int, default=2,
                   help="rounds of the restore measurement (storage cold, storage warm, memory tier); 0: skip")
    p.add_argument("--paired", action="store_true",
                   help="instead of one process per mode and round: per explicit mode (torch.save, dcp.async_save, "
                        "pyckpt, floor-memcpy) one process alternating windows without and with checkpoints, "
                        "so machine drift cancels within each pair")
    p.add_argument("--window", type=int, default=40, help="--paired: steps per window")
    p.add_argument("--pairs", type=int, default=8, help="--paired: window pairs per mode")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.paired and args.pairs < 1:
        p.error("--pairs must be at least 1: each mode's figures are medians over its pairs")
    if args.child == "restore":
        return restore_child(args)
    if args.child and args.child.startswith("paired:"):
        return paired_child(args)
    if args.child:
        return child(args)
    modes = args.modes.split(",")
    dropped = sorted(k for k in os.environ if k.startswith("PYCKPT_") and k not in TUNING)
    if dropped:
        print(f"pyckpt benchmark: {', '.join(dropped)} not passed to the modes (only {', '.join(TUNING)} are)",
              file=sys.stderr)
    print(settings_line(), flush=True)
    if not args.paired and any(m in PAIRED_ONLY for m in modes):
        p.error(f"{', '.join(PAIRED_ONLY)}: --paired only")
    if args.paired:
        explicit = [m for m in modes if m not in TRANSPARENT and m != "none"]
        if any(m in TRANSPARENT for m in modes):
            print("pyckpt benchmark: --paired measures the explicit modes only; transparent modes skipped",
                  file=sys.stderr)
        print(measure_paired(args, explicit))
        return
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for m in modes:
            res = run_mode(args, m)
            results[m].append(res)
            print(f"round {r + 1}/{args.rounds} {m:<20} {res['steps_per_s']:.3f} steps/s", flush=True)
    restore = measure_restore(args) if args.restore_rounds > 0 else None
    print(summary(args, results, restore))


def summary(args: argparse.Namespace, results: dict[str, list[dict]], restore: dict | None) -> str:
    """One Markdown table (modes as rows, medians over rounds, ratios to no checkpoint), the restore
    table when measured, and the issue's goals checked against them: paste as is."""
    base = statistics.median(x["steps_per_s"] for x in results["none"]) if "none" in results else None
    base_step = statistics.median(x["median_step"] for x in results["none"]) if "none" in results else None
    lines = [f"job={args.job} ({args.width}x{args.depth}, batch {args.batch}) device={args.device} "
             f"every={args.every} steps={args.steps} rounds={args.rounds}; {settings_line()}",
             "", "| mode | steps/s | ratio to none | stall per checkpoint (median) | of it: snapshot point | "
             "of it: wait before the next step | start → durable (median) | peak RSS |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ratios, stall_of = {}, {}
    for m, runs in results.items():
        sps = statistics.median(x["steps_per_s"] for x in runs)
        stalls = [s for x in runs for s in x["stalls"]]
        if not stalls and base_step is not None:  # transparent, a snapshot every step
            stalls = [max(0.0, t - base_step) for x in runs for t in x["snap_times"]]
        ratios[m] = sps / base if base else None
        stall_of[m] = statistics.median(stalls) if stalls else None
        lines.append(f"| {m} | {sps:.3f} | {'-' if not base else f'{sps / base:.3f}'} | {_fmt(stalls)} | "
                     f"{_fmt([v for x in runs for v in x.get('point', [])])} | "
                     f"{_fmt([v for x in runs for v in x.get('wait', [])])} | "
                     f"{_fmt([d for x in runs for d in x['durable']])} | "
                     f"{max(x['peak_rss_gb'] for x in runs):.2f} GB |")
    if restore is not None:
        med = {k: statistics.median(v) for k, v in restore.items()}
        parts = {k: v for k, v in med.items() if ": " in k}
        med = {k: v for k, v in med.items() if ": " not in k}
        lines += ["", f"Restore of the job's state ({args.restore_rounds} rounds, fresh process each; choose + "
                  "verify + read into the live model, timed inside pyckpt):", "",
                  "| restore from | seconds (median) | memory tier / this |", "|---|---:|---:|"]
        for k, v in med.items():
            split = ", ".join(f"{p.split(': ')[1]} {x:.3f}" for p, x in parts.items() if p.startswith(k + ": "))
            lines.append(f"| {k} ({split}) | {v:.3f} | {med['memory-tier'] / v:.2f} |")
    goal = 0.95 if args.every >= 10 else 0.85 if args.every == 1 else None
    best = next((m for m in ("pyckpt-transparent", "pyckpt") if ratios.get(m) is not None), None)
    if goal is not None and best is not None:
        lines += ["", f"goals (issue 9): {best} ratio {ratios[best]:.3f} (goal >= {goal})"
                  + (f", stall {stall_of[best]:.4f} s (goal <= 0.02 s)" if args.every >= 10 and stall_of[best]
                     is not None else "")
                  + (f"; memory-tier restore / storage cold {med['memory-tier'] / med['storage-cold']:.2f}, "
                     f"warm {med['memory-tier'] / med['storage-warm']:.2f} (goal <= 0.5)" if restore else "")
                  + (f"; floor (one background memcpy of the state, no disk) {ratios['floor-memcpy']:.3f}, "
                     f"stall {stall_of['floor-memcpy']:.4f} s" if ratios.get("floor-memcpy") is not None
                     and stall_of.get("floor-memcpy") is not None else "")]
    return "\n".join(lines)


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.4f} s" if xs else "-"


if __name__ == "__main__":
    main()
