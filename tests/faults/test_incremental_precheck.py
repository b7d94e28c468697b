"""The on-disk check of referenced chunks (tests/faults/test_incremental_rot.py) must not stall the
training thread: a commit's chunks are read back by a background pre-check, and a restore's reads
count as the check, so the save call itself reads nothing from disk (pyckpt/incremental.py)."""
from __future__ import annotations

import json
import os
import threading

import pytest
import torch

import pyckpt
from pyckpt import reader
from pyckpt._native import get_engine

N = 1 << 18  # 1 MiB of float32: one chunk each with PYCKPT_CHUNK_MB=1
FIRST = "../step-000000001/rank-00000/data-000.bin"


def _state(step: int) -> dict:
    """``frozen`` never changes (a frozen base), ``t`` at every step."""
    return {"frozen": torch.randn(N, generator=torch.Generator().manual_seed(0)), "t": torch.full((N,), float(step))}


def _files(ckpt_dir: str) -> set[str]:
    with open(os.path.join(ckpt_dir, "rank-00000.json"), "rb") as f:
        return {c["file"] for c in json.loads(f.read())["chunks"]}


@pytest.fixture
def disk_reads(monkeypatch):
    """Bytes read back with ``os.preadv`` (the on-disk check's read), per thread id."""
    counts: dict[int, int] = {}
    real = os.preadv

    def preadv(fd, buffers, offset, *flags):
        n = real(fd, buffers, offset, *flags)
        me = threading.get_ident()
        counts[me] = counts.get(me, 0) + max(n, 0)
        return n

    monkeypatch.setattr(os, "preadv", preadv)
    return counts


def _save_reads(ck: pyckpt.Checkpointer, step: int, reads: dict[int, int]) -> tuple[str, int]:
    """Save ``step``; the committed path and the bytes the save call read on this (the training) thread."""
    me = threading.get_ident()
    before = reads.get(me, 0)
    fut = ck.save(step, _state(step))
    during = reads.get(me, 0) - before
    return fut.result(60), during


def _precheck_done() -> None:
    for t in threading.enumerate():
        if t.name == "pyckpt-precheck":
            t.join(60)


def test_the_save_after_a_commit_reads_nothing_on_the_training_thread(ckpt_root, knob_env, disk_reads):
    knob_env(PYCKPT_CHUNK_MB=1)
    me = threading.get_ident()
    with pyckpt.Checkpointer(ckpt_root, keep=5) as ck:
        ck.save(1, _state(1)).result(60)
        _precheck_done()
        background = sum(n for t, n in disk_reads.items() if t != me)
        path, during = _save_reads(ck, 2, disk_reads)
        assert FIRST in _files(path)  # the frozen chunk is referenced, not written again
        assert during == 0
        # The check still happened: step 1's chunks (frozen and t, both candidates) were read off-thread.
        assert background >= 2 * 4 * N
    reader.verify(get_engine(), path)


@pytest.mark.parametrize("how", ["restore", "latest_verify"])
def test_the_first_save_after_a_resume_reads_nothing_the_resume_checked(ckpt_root, knob_env, disk_reads, how):
    knob_env(PYCKPT_CHUNK_MB=1)
    with pyckpt.Checkpointer(ckpt_root, keep=5) as ck:
        for s in (1, 2):
            ck.save(s, _state(s)).result(60)
        _precheck_done()
    with pyckpt.Checkpointer(ckpt_root, keep=5) as ck:  # a relaunched process
        if how == "restore":
            assert ck.restore().step == 2
        else:
            assert ck.latest(verify=True).step == 2
        path, during = _save_reads(ck, 3, disk_reads)
        assert FIRST in _files(path)
        assert during == 0
    reader.verify(get_engine(), path)


_EXIT_SCRIPT = r'''
import atexit, sys, threading
# Registered before pyckpt is imported, so it runs after pyckpt's own exit handler (atexit is LIFO).
atexit.register(lambda: print("ALIVE", [t.name for t in threading.enumerate() if t.name == "pyckpt-precheck"],
                              flush=True))
import torch, pyckpt
ck = pyckpt.Checkpointer(sys.argv[1], keep=3)
ck.save(1, {"frozen": torch.ones(64 << 20)}).result(60)  # 256 MiB: its read-back outlasts the script
print("RUNNING", [t.name for t in threading.enumerate() if t.name == "pyckpt-precheck"], flush=True)
'''


def test_a_precheck_still_running_at_exit_is_stopped_and_joined_before_the_interpreter_finalizes(tmp_path):
    # A daemon thread inside the native CRC (GIL released) when the interpreter finalizes is ended by
    # pthread_exit as it takes the GIL back, an unwind through a noexcept guard: "terminate called without
    # an active exception", the relaunched job aborted (-6) at its very end.
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path / "ck")], capture_output=True, text=True,
                       timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_")})
    assert r.returncode == 0, r.stderr
    assert "RUNNING ['pyckpt-precheck']" in r.stdout  # the case: the read-back is still going at the end
    assert "ALIVE []" in r.stdout, r.stdout
