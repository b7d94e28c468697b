"""Starting pyckpt's own Python threads where no more threads may start.

A process at its limit on threads (``ulimit -u``, a container's ``pids.max``; DataLoader workers
and torch's pools count too) gets ``RuntimeError: can't start new thread`` from ``Thread.start``.
Raised from a save, it left that save registered as in flight, so every later save waited
``PYCKPT_STAGING_TIMEOUT_S`` and was skipped; raised from a SIGTERM handler, it reached the
training code. Each caller says instead what happens without the thread (docs/DESIGN.md "A limit
on threads").
"""
from __future__ import annotations

import logging
import threading

LIMIT = "the limit on threads (ulimit -u, the container's pids.max) is reached"


def start(thread: threading.Thread, what: str, instead: str) -> bool:
    """Start ``thread``; where it cannot start, say so in one ``pyckpt:`` line naming ``what`` and
    what happens ``instead``, and return False (the caller then does without it)."""
    try:
        thread.start()
    except RuntimeError as e:
        logging.getLogger("pyckpt").warning("pyckpt: cannot start %s (%s: %s); %s", what, e, LIMIT, instead)
        return False
    return True
