"""Launch examples/train_ddp_samples.py as real ranks without torchrun: one process per rank, all in one
process group so that a test can SIGKILL the whole job at once (tests/dist/test_resize_ddp.py,
test_sharded_tier.py)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[2] / "examples" / "train_ddp_samples.py"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_samples(tmp: Path, run: str, world: int, env: dict, stop_at: int = -1,
                   stop_after: Path | None = None) -> str:
    """``world`` ranks of train_ddp_samples.py with environment ``env`` (already cleaned by the caller)
    plus the rendezvous and the script's own settings; returns rank 0's stderr. With ``stop_at``, every
    rank waits after that step until ``stop_after`` exists (a committed checkpoint's manifest), then the
    whole job is SIGKILLed; without it, every rank must exit 0."""
    base = dict(env, SAMPLES_LOG=str(tmp), RUN=run, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                WORLD_SIZE=str(world), STOP_AT=str(stop_at))
    if stop_after is not None:
        base["STOP_AFTER"] = str(stop_after)
    procs: list[subprocess.Popen] = []
    for r in range(world):
        with open(tmp / f"{run}-{r}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, str(SAMPLES)], stdout=subprocess.DEVNULL, stderr=err,
                                          env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                                          process_group=procs[0].pid if procs else 0))  # one group: killed at once
    try:
        deadline = time.monotonic() + 120
        if stop_at >= 0:
            while not all((tmp / f"{run}-{r}.stopped").exists() for r in range(world)):
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                    (tmp / f"{run}-0.err").read_text()[-3000:]
                time.sleep(0.05)
            os.killpg(procs[0].pid, signal.SIGKILL)  # the whole job at once
        for p in procs:
            p.wait(max(deadline - time.monotonic(), 1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    err = (tmp / f"{run}-0.err").read_text()
    if stop_at < 0:
        assert all(p.returncode == 0 for p in procs), err[-3000:]
    return err
