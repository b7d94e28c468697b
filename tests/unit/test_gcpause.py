"""gcpause.paused: no collector pass inside the block; with ``promote``, none right after it either for
what the block kept, and nothing frozen or uncollectable left behind."""
from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest

from pyckpt import gcpause


@pytest.fixture(autouse=True)
def collector_on():
    was = gc.isenabled()
    gc.enable()
    gc.collect()
    yield
    if not was:
        gc.disable()


class _Node:
    pass


def _keep_many(n: int) -> list:
    """What a snapshot keeps until its commit: thousands of small containers."""
    return [{"k": [i]} for i in range(n)]


# Counted in a new interpreter of one thread: another thread's allocations (a Checkpointer an earlier
# test left, a heartbeat) could start a young pass at any moment in this one.
_COUNT = """
import gc, importlib.util, sys
spec = importlib.util.spec_from_file_location("gcpause", sys.argv[1])
gcpause = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gcpause)
promote = sys.argv[2] == "1"
threshold = gc.get_threshold()[0]
gc.collect()
with gcpause.paused(promote=promote):
    assert not gc.isenabled()
    kept = [{"k": [i]} for i in range(5 * threshold)]  # what a snapshot keeps until its commit
    marker = kept[-1]
    passes = gc.get_stats()[0]["collections"]
assert gc.isenabled()
after = [[i] for i in range(threshold // 2)]  # the script's next allocations, under the threshold
print(gc.get_stats()[0]["collections"] - passes, any(o is marker for o in gc.get_objects(generation=2)),
      gc.get_freeze_count())
"""


def _count(promote: bool) -> tuple[int, bool, int]:
    r = subprocess.run([sys.executable, "-c", _COUNT, gcpause.__file__, "1" if promote else "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    passes, oldest, frozen = r.stdout.split()
    return int(passes), oldest == "True", int(frozen)


def test_what_a_promoting_block_keeps_goes_to_the_oldest_generation_without_a_pass():
    passes, oldest, frozen = _count(promote=True)
    assert passes == 0  # before: the young count was past its threshold, so the next allocation ran a pass
    assert oldest
    assert frozen == 0


def test_without_promote_the_next_allocations_start_a_young_pass():
    """The plain block (background threads' parsing, whose objects die inside it) is as it was."""
    passes, oldest, _ = _count(promote=False)
    assert passes >= 1
    assert not oldest


def test_cycles_made_in_a_promoting_block_are_still_collected():
    with gcpause.paused(promote=True):
        a, b = _Node(), _Node()
        a.other, b.other = b, a  # a snapshot's future and its armed state refer to each other
        gone = weakref.ref(a)
    del a, b
    assert gone() is not None  # only a full pass frees a cycle
    gc.collect()
    assert gone() is None  # not left in the permanent generation


def test_garbage_the_script_left_is_freed_not_promoted():
    """A cycle the script dropped just before the snapshot is freed by the young pass the block starts
    with; moved to the oldest generation with the block's objects, it would wait for a full pass."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    with gcpause.paused(promote=True):
        kept = _keep_many(100)
    assert gone() is None
    del kept


def test_objects_the_script_froze_stay_frozen():
    """A script that froze its objects before forking workers (gc.freeze) keeps them frozen: nothing is
    promoted then, since the move is made with gc.unfreeze."""
    held = _keep_many(100)
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with gcpause.paused(promote=True):
            kept = _keep_many(1000)
        assert gc.get_freeze_count() == frozen
        assert gc.isenabled()
    finally:
        gc.unfreeze()
    del held, kept


def test_a_caller_that_disabled_the_collector_keeps_it_disabled():
    gc.disable()
    try:
        with gcpause.paused(promote=True):
            kept = _keep_many(100)
        assert not gc.isenabled()
        assert gc.get_freeze_count() == 0
    finally:
        gc.enable()
    del kept
