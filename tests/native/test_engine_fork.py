"""An engine inherited by a forked child (a fork-based DataLoader worker, a test worker) has none of
its threads; destroying it there, as a garbage collection in the child does, must not hang."""
from __future__ import annotations

from native_helpers import run_child

# Run from the session's zygote, a clean process: forked straight from a test worker, the child's
# gc.collect() also finalised whatever earlier tests had left behind there (a DataLoader iterator whose
# worker processes and queue threads the child lacks): a rare hang or SIGSEGV of the suite, not the engine's.
_FORKS_AN_ENGINE = """
    import gc
    from pyckpt import _native
    engine = _native.native().Engine(8 << 20, 1 << 20, io_threads=2, copy_threads=2)  # held here only
    time.sleep(0.2)  # its workers now sleep on their queue, as between checkpoints
    pid = os.fork()
    if pid == 0:  # the child: drop the inherited engine, then exit with a code the parent checks
        try:
            del engine
            gc.collect()
        finally:
            os._exit(7)
    deadline, code = time.monotonic() + 20, None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    out = {"child_exit": code, "parent_staging": engine.staging_bytes_allocated()}
    del engine  # destroyed normally here, in its own process
    print(json.dumps(out))
"""


def test_an_engine_destroyed_in_a_forked_child_does_not_hang_the_child():
    out = run_child(_FORKS_AN_ENGINE, env={"PYCKPT_DISABLE": "1"})
    assert out["child_exit"] is not None, "the child hung destroying the engine it inherited"
    assert out["child_exit"] == 7, out  # not a crash either
    assert out["parent_staging"] == 0  # the parent's engine is untouched
