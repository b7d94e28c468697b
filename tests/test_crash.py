"""Crash safety: a saving process SIGKILLed at random moments never leaves a
checkpoint that `latest()` returns but that cannot load, and the previous
checkpoint always survives bitwise."""
import os
import random
import signal
import textwrap
import time

import pytest
import torch

import pyckpt
from pyckpt import layout

N = 5_000_000  # float32 + int64 parts: ~30 MB per checkpoint

CHILD = textwrap.dedent("""
    import sys, torch, pyckpt
    root, N = sys.argv[1], int(sys.argv[2])
    def state(step):
        return {"a": torch.arange(N, dtype=torch.float32) + step, "b": torch.full((N // 4,), step, dtype=torch.int64),
                "step": step}
    ck = pyckpt.Checkpointer(root, keep=2, compress=sys.argv[3])
    info = ck.latest()
    step = info.step + 1 if info else 1
    print("READY", flush=True)
    while True:
        ck.save(step, state(step)).result()
        print("COMMITTED", step, flush=True)
        step += 1
""")


def expected(step):
    return torch.arange(N, dtype=torch.float32) + step, torch.full((N // 4,), step, dtype=torch.int64)


def check_loads(path):
    out = pyckpt.load(path)
    a, b = expected(out["step"])
    assert torch.equal(out["a"], a) and torch.equal(out["b"], b), path
    return out["step"]


@pytest.mark.slow
def test_sigkill_during_saves_never_breaks_latest(tmp_path, zygote):
    root = str(tmp_path / "root")
    rng = random.Random(1234)
    env = dict(zygote.env, PYCKPT_CHUNK_MB="1", PYCKPT_TEST_WRITE_DELAY_MS="5")
    last_committed = 0
    for trial in range(20):
        compress = "zstd" if trial % 3 == 2 else "none"
        child = zygote.start(CHILD, [root, N, compress], env=env)  # a real process, torch already imported
        child.wait_for_line("READY", 60)
        time.sleep(rng.uniform(0.0, 0.8))  # a save takes ~0.1-0.2 s: kills land all over several
        child.kill()
        assert child.wait(60) == -signal.SIGKILL
        out = child.stdout
        # Whole lines only: the kill may cut the last one short (seen once in a full run: a "COMMITTED"
        # line without its step, and the test failed on parsing it).
        for line in out.splitlines(keepends=True):
            if line.startswith("COMMITTED") and line.endswith("\n"):
                last_committed = int(line.split()[1])
        with pyckpt.Checkpointer(root, keep=2) as ck:  # the killed child's directory lock is gone
            info = ck.latest()
        if last_committed == 0 and info is None:
            continue  # killed before the very first checkpoint committed
        assert info is not None and info.step >= last_committed
        assert check_loads(info.path) == info.step
        # The checkpoint the process last reported as committed is still there and intact, unless
        # retention removed it, which it may do only after `keep` newer ones were committed (a
        # newer save can commit after its process printed its last line but before the kill).
        committed = sorted(s for s in map(layout.parse_step, os.listdir(root)) if s is not None)
        if last_committed in committed:
            assert check_loads(os.path.join(root, f"step-{last_committed:09d}")) == last_committed
        else:
            newer = [s for s in committed if s > last_committed]
            assert len(newer) >= 2, (last_committed, committed)
            assert [check_loads(os.path.join(root, f"step-{s:09d}")) for s in newer] == newer
    assert last_committed >= 3  # the trials really did progress through many saves
