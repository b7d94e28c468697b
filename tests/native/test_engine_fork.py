"""An engine inherited by a forked child (a fork-based DataLoader worker, a test worker) has none of
its threads; destroying it there, as a garbage collection in the child does, must not hang."""
from __future__ import annotations

import gc
import os
import time


def test_an_engine_destroyed_in_a_forked_child_does_not_hang_the_child(C):
    engine = C.Engine(8 << 20, 1 << 20, io_threads=2, copy_threads=2)  # held here only: del destroys it
    time.sleep(0.2)  # its workers now sleep on their queue, as between checkpoints
    pid = os.fork()
    if pid == 0:  # the child: drop the inherited engine, then exit with a code the parent checks
        try:
            del engine
            gc.collect()
        finally:
            os._exit(7)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError("the child hung destroying the engine it inherited")
    assert os.waitstatus_to_exitcode(status) == 7
    assert engine.staging_bytes_allocated() == 0  # the parent's engine is untouched
    del engine  # and is destroyed normally here, in its own process
