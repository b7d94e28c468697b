"""SIGKILL in the middle of incremental saves and of the retention that retires referenced data:
every committed checkpoint still loads bitwise (its references resolve), and the next saves of a
relaunch collect the leftovers without breaking a reference (PYCKPT_TEST_CRASH_AT points)."""
import os
import signal
import textwrap

import pytest
import torch

import pyckpt
from pyckpt import incremental, layout, reader
from pyckpt._native import get_engine

CHILD = textwrap.dedent("""
    import os, sys, torch, pyckpt
    sys.path.insert(0, os.path.dirname(sys.argv[2]))
    from test_incremental_crash import state
    root, _, point = sys.argv[1:4]
    os.environ["PYCKPT_TEST_CRASH_AT"] = point
    with pyckpt.Checkpointer(root, keep=2) as ck:
        for s in range(1, 5):
            ck.save(s, state(s)).result(60)
    print("NOCRASH", flush=True)
""")


def state(step: int) -> dict:
    """A frozen base (written by save 1, referenced by every later one) and a changing adapter."""
    g = torch.Generator().manual_seed(0)
    return {"base": torch.randn(600_000, generator=g), "base2": torch.randn(300_000, generator=g),
            "adapter": torch.arange(5000, dtype=torch.float32) + step, "step": step}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


def _check_root(root: str) -> list[int]:
    """Every committed checkpoint loads bitwise and verifies; every retired directory is referenced."""
    steps = []
    for e in layout.committed(root):
        assert _equal(pyckpt.load(e.path), state(e.step)), e.name
        reader.verify(get_engine(), e.path)
        steps.append(e.step)
    refs = incremental.referenced_dirs(root)
    for e in layout.scan(root):
        if not e.complete and layout.parse_step(e.name) is not None:
            assert e.name in refs, f"{e.name}: retired but referenced by no checkpoint"
    return steps


# (crash point, the steps committed when it fires): retention first retires step 1 (referenced by
# every later save) in save 3 and deletes the unreferenced step 2 in save 4.
POINTS = [
    ("save.data.after:3", [2, 1]),
    ("retention.retire.before:1", [3, 2, 1]),
    ("retention.retire.after:1", [3, 2]),
    ("retention.remove.before:1", [4, 3]),
]


@pytest.mark.parametrize("point, committed", POINTS, ids=[p for p, _ in POINTS])
def test_crash_mid_incremental_save_leaves_everything_loadable(tmp_path, zygote, point, committed):
    root = str(tmp_path / "root")
    r = zygote.run(CHILD, [root, __file__, point], timeout=120)  # a real process, torch already imported
    assert r.returncode == -signal.SIGKILL, f"{point}: not reached (rc {r.returncode})\n{r.stdout}\n{r.stderr}"
    assert _check_root(root) == committed
    # A relaunch: its saves collect the crash's leftovers and still reference the frozen base.
    with pyckpt.Checkpointer(root, keep=2) as ck:
        for s in (5, 6):
            path = ck.save(s, state(s)).result(60)
            assert any(f["path"].startswith("../") for f in reader.open_checkpoint(path).parts[0]["files"])
    assert _check_root(root) == [6, 5]
    left = sorted(n for n in os.listdir(root) if n.startswith("step-"))
    assert all(layout.parse_step(n) is not None for n in left), left  # no .tmp-/.del- garbage
