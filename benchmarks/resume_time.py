"""Resume-time benchmark: process start → first training step, from a ~1.5 GB checkpoint.

Compares, for the same unmodified training script (a 125M-parameter fp32 MLP
with Adam, so model + optimizer state is ~1.5 GB):

* plain start (no checkpoint at all): the floor;
* plain start + ``torch.load(weights_only=True)`` + ``load_state_dict`` of
  the same state (what a hand-written resume costs);
* ``PYCKPT_DIR=...`` transparent resume from a pyckpt checkpoint of that
  state (restore + data fast-forward, every checksum verified).

Each is timed from ``Popen`` to the line the script prints when its first
training batch arrives; the best of ``--repeat`` runs is reported, with the
page cache warm (both checkpoints were just written).

    python benchmarks/resume_time.py [--params 125e6] [--repeat 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

SCRIPT = textwrap.dedent('''
    import argparse, sys, torch
    from torch.utils.data import DataLoader, TensorDataset

    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--torch-save")
    ap.add_argument("--torch-load")
    ap.add_argument("--crash", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    width = 2048
    layers = max(1, round(a.params / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    if a.torch_load:
        sd = torch.load(a.torch_load, map_location="cpu", weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
    data = TensorDataset(torch.randn(64, width))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    step = 0
    for (x,) in loader:
        print("first-batch", flush=True)  # every batch: a resumed run's loop variables are restored too
        step += 1
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if step >= a.steps:
            break
    if a.torch_save:
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, a.torch_save)
    print("done", flush=True)
    if a.crash:  # an uncaught exception: the memory tier's copy is kept for the relaunch
        raise RuntimeError("crash on purpose")
''')


def env_without_pyckpt() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_")}


LAST_STDERR = [""]


def time_to_first_batch(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds from starting ``cmd`` to its 'first-batch' line (the process is then stopped)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("first-batch"):
            dt = time.perf_counter() - t0
            p.kill()
            p.wait()
            LAST_STDERR[:] = [p.stderr.read()]
            return dt
    raise RuntimeError(f"{cmd} ended without a first batch:\n{p.stderr.read()[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=125e6)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pyckpt-resume-bench-")
    try:
        script = os.path.join(work, "train.py")
        with open(script, "w") as f:
            f.write(SCRIPT)
        ckdir, pt = os.path.join(work, "ck"), os.path.join(work, "state.pt")
        base = [sys.executable, script, "--params", str(args.params)]
        # Two steps under pyckpt: a snapshot of step 2 is taken at the third fetch, written to
        # PYCKPT_DIR and kept in the memory tier (the run crashes, so the memory copy stays).
        shm_mb = str(max(64, int(args.params * 32 / 2**20)))  # two copies of params + Adam's moments (16 B each)
        env = env_without_pyckpt() | {"PYCKPT_DIR": ckdir, "PYCKPT_EVERY_STEPS": "2", "PYCKPT_SHM_MB": shm_mb}
        crashed = subprocess.run(base + ["--steps", "3", "--torch-save", pt, "--crash"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if "crash on purpose" not in crashed.stderr:
            raise RuntimeError(f"the first run failed:\n{crashed.stderr[-3000:]}")
        nbytes = os.path.getsize(pt)
        print(f"state: {nbytes / 1e9:.2f} GB (torch.save file), {os.cpu_count()} CPUs")
        resume_env = env_without_pyckpt() | {"PYCKPT_DIR": ckdir}
        runs = {
            "plain start, no checkpoint": (base + ["--steps", "1"], env_without_pyckpt()),
            "plain start + torch.load + load_state_dict": (base + ["--steps", "1", "--torch-load", pt],
                                                           env_without_pyckpt()),
            "PYCKPT_DIR transparent resume": (base + ["--steps", "5"], resume_env),
            "PYCKPT_DIR resume from the memory tier": (base + ["--steps", "5"],
                                                      resume_env | {"PYCKPT_SHM_MB": shm_mb}),
        }
        best = {name: min(time_to_first_batch(cmd, e) for _ in range(args.repeat))
                for name, (cmd, e) in runs.items()}
        for name, t in best.items():
            print(f"  {name:<44} {t:6.2f} s to the first training batch")
        floor = best["plain start, no checkpoint"]
        tl = best["plain start + torch.load + load_state_dict"]
        pk = best["PYCKPT_DIR transparent resume"]
        print(f"  restore cost: torch.load {tl - floor:.2f} s, pyckpt {pk - floor:.2f} s")
        print(f"  ratio pyckpt resume / (plain start + torch.load): {pk / tl:.3f}")
        time_to_first_batch(*runs["PYCKPT_DIR resume from the memory tier"])
        if "resuming from the memory tier" not in LAST_STDERR[0]:
            raise RuntimeError(f"the memory-tier run did not resume from memory:\n{LAST_STDERR[0][-3000:]}")
        mem = best["PYCKPT_DIR resume from the memory tier"]
        print(f"  restore cost from the memory tier {mem - floor:.2f} s; ratio to storage "
              f"{(mem - floor) / max(pk - floor, 1e-9):.3f}")
    finally:
        from pyckpt import shm_tier

        shutil.rmtree(shm_tier.shm_path(os.path.join(work, "ck")), ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
