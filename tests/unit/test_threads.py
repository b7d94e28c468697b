"""pyckpt's own threads where no more threads may start (``ulimit -u``, a container's ``pids.max``).

A real limit, not a patched ``Thread.start``: a child process gives up root for a user of its own
and sets ``RLIMIT_NPROC`` (which counts that user's threads) to the threads it has, plus one or none.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import contextlib, json, logging, os, shutil, tempfile
from pathlib import Path
import torch
from pyckpt import Checkpointer, knobs, shm_tier
from pyckpt.coord import LocalCoordinator
from thread_limit import become_own_user, limit

said = []
logging.getLogger("pyckpt").addHandler(type("H", (logging.Handler,), {"emit": lambda h, r: said.append(r.getMessage())})())
state = {"w": torch.arange(1 << 20, dtype=torch.float32), "b": torch.ones(4)}

def outcome(fn):  # what fn returned (a checkpoint's name), or what it raised
    try:
        r = fn()
        return [os.path.basename(r) if isinstance(r, str) else r]
    except Exception as e:
        return [f"{type(e).__name__}: {e}"]

def scenario(root, limited):
    out = {}
    ck = Checkpointer(root / "ck", keep=5)
    ck.save(1, state).result(60)
    ck.save(2, state).result(60)  # incremental: a baseline whose chunks a pre-check reads back
    with limit(0) if limited else contextlib.nullcontext():
        out["precheck"] = outcome(lambda: ck._baseline.precheck(ck.directory))
    with limit(1) if limited else contextlib.nullcontext():  # the commit thread, not the engine's capture thread
        out["one"] = outcome(lambda: ck.save(3, state).result(60))
    with limit(0) if limited else contextlib.nullcontext():  # not one thread
        out["none"] = outcome(lambda: ck.save(4, state).result(60))
    out["after"] = outcome(lambda: ck.save(5, state).result(60))
    r = ck.restore(5)
    out["restored"] = torch.equal(r.state["w"], state["w"]) and torch.equal(r.state["b"], state["b"])
    ck.close()
    with knobs.override(PYCKPT_SHM_MB=64):  # the memory tier, and storage's copy of it
        ck2 = Checkpointer(root / "ck2")
        tier = shm_tier.tier_for(ck2, LocalCoordinator())
        try:
            tier.publish(tier.save(10, state, {}), ck2, 10).result(60)
            with limit(0) if limited else contextlib.nullcontext():
                out["published"] = outcome(lambda: tier.publish(tier.save(20, state, {}), ck2, 20).result(60))
            out["published_after"] = outcome(lambda: tier.publish(tier.save(30, state, {}), ck2, 30).result(60))
            out["published_equal"] = torch.equal(ck2.restore(30).state["w"], state["w"])
        finally:
            shm_tier._TIERS.pop(ck2.directory, None)
            tier.remove()
            ck2.close()
    return out

warm = Path(tempfile.mkdtemp(prefix="pyckpt-nproc-"))
scenario(warm, False)  # every module this needs is imported while its files can still be read
shutil.rmtree(warm)
said.clear()
work = become_own_user()
out = scenario(work, True)
out["said"] = said
shutil.rmtree(work, ignore_errors=True)
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: RLIMIT_NPROC is set for a user of this test's own")
def test_saves_go_on_when_no_thread_can_start_and_recover_at_once_when_threads_can():
    """A save whose commit thread could not start raised, and left the save registered as in flight:
    every later save waited PYCKPT_STAGING_TIMEOUT_S and was skipped, for the rest of the job. Now
    its commit runs on the calling thread instead (one line says so) and the save fails alone when
    the engine cannot start its capture thread either; the pre-check and the memory tier's copy to
    storage do without their threads too; and the next save, once threads can start, commits
    without waiting."""
    env = dict(os.environ, PYCKPT_STAGING_TIMEOUT_S="30", OMP_NUM_THREADS="1")
    env.pop("PYCKPT_DIR", None)
    child = f"import sys\nsys.path.insert(0, {TESTS!r})  # thread_limit\n" + _CHILD
    r = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    cannot_capture = "OSError: cannot start the capture thread of this save"
    for key in ("one", "none", "published"):  # the save fails alone
        assert out[key][0].startswith(cannot_capture), (key, out)
    assert out["precheck"][0] is None, out
    for key, step in (("after", 5), ("published_after", 30)):  # no "previous checkpoint still being written"
        assert out[key][0] == f"step-{step:09d}", (key, out)
    assert out["restored"] and out["published_equal"], out
    lines = "\n".join(out["said"])
    for what in ("the commit thread of step 4", "the pre-check of the chunks the next save may reference",
                 "the commit thread of step 20", "the copy of step 20 to storage"):
        assert f"pyckpt: cannot start {what} (can't start new thread: the limit on threads" in lines, (what, lines)
    assert "it commits on this thread instead" in lines and "that save checks them itself" in lines, lines
