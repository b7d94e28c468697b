"""A real limit on threads for a test's child process (``RLIMIT_NPROC``), shared by the tests of what
pyckpt does when no more threads may start (tests/native/test_engine_errors.py, tests/unit/test_threads.py).

The limit counts every task of the process's real user, and root is exempt from it: ``become_own_user``
gives up root for a user id no other process has, so the count is this process's own threads. Everything
the child needs must be imported before (files under /root are no longer readable after it).
"""
from __future__ import annotations

import contextlib
import os
import resource
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOM = 64  # the hard limit: this many threads above the count, so the soft one can be lifted again


def become_own_user() -> Path:
    """Give up root for a user of this process's own; returns a fresh directory that user may write."""
    work = Path(tempfile.mkdtemp(prefix="pyckpt-nproc-"))
    os.chmod(work, 0o777)  # made as root, written as the new user
    uid = 60000 + os.getpid() % 5000
    os.setgid(uid)
    os.setuid(uid)
    return work


@contextlib.contextmanager
def limit(extra: int) -> Iterator[None]:
    """Inside: at most ``extra`` threads more than this process has once its other Python threads (the
    last saves' commit and pre-check threads) ended. After: lifted again."""
    for t in threading.enumerate():
        if t is not threading.main_thread():
            t.join(30)
    time.sleep(0.2)  # a joined thread's task is released just after
    tasks = len(os.listdir("/proc/self/task"))
    resource.setrlimit(resource.RLIMIT_NPROC, (tasks + extra, tasks + ROOM))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NPROC, (tasks + ROOM, tasks + ROOM))
