"""The directory lock: one writer (one Checkpointer, one job) per checkpoint root.

Rank 0 of a Checkpointer holds an exclusive POSIX record lock
(``fcntl.lockf``) on ``ROOT/.pyckpt.lock`` for the Checkpointer's life and
writes its pid, host and start time into the file, so a second writer gets a
``PyckptError`` naming the holder. POSIX locks rather than ``flock``: they
belong to the process and are not inherited by ``fork``, so DataLoader
workers that outlive a killed trainer for a few seconds do not keep the lock;
the kernel drops it when the holder dies (the stale-lock recovery after a
crash, no timeout, no guessing from pids). POSIX locks never conflict inside
one process, so a registry catches a second Checkpointer in the same process.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import stat
import threading
import time
import weakref

from . import gcpause, layout
from .errors import PyckptError

_held: dict[str, tuple[int, "weakref.ref[DirLock]"]] = {}  # realpath(root) -> (pid, lock)
_guard = threading.Lock()


class DirLock:
    """An exclusive lock on checkpoint root ``root``; ``release()`` (or process exit) drops it."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.key = os.path.realpath(root)
        self.path = os.path.join(root, layout.LOCK)
        self._fd: int | None = None
        # The collector paused while _guard is held: a pass run by an allocation in here finalizes a
        # garbage DirLock, whose __del__ takes _guard in this same thread (a deadlock; seen in the suite).
        with gcpause.paused(), _guard:
            prev = _held.get(self.key)
            other = prev[1]() if prev is not None and prev[0] == os.getpid() else None
            if other is not None and other._fd is not None:
                raise PyckptError(f"checkpoint directory {root} is already used by another Checkpointer in this "
                                  f"process (pid {os.getpid()}); close() it first, or use another directory")
            self._acquire()
            _held[self.key] = (os.getpid(), weakref.ref(self))

    def _acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as e:
            raise PyckptError(f"cannot create the lock file {self.path} (is the checkpoint directory "
                              f"writable?): {e.strerror}") from e
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PyckptError(f"{self.path} is not a regular file; remove it")
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise PyckptError(f"cannot lock {self.path}: {e}") from e
                raise PyckptError(f"checkpoint directory {self.root} is in use by {_holder(fd)}; two jobs or "
                                  "Checkpointers cannot share a directory: use another directory, or stop the "
                                  "other one") from None
            info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               **pid_space()}).encode()
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, info + b"\n", 0)
            except OSError:
                pass  # the lock itself is what matters; the holder text is a courtesy
        except BaseException:
            os.close(fd)  # closing drops a POSIX lock we may have taken
            raise
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays: removing it would race with a new holder."""
        with gcpause.paused(), _guard:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            entry = _held.get(self.key)
            if entry is not None and entry[1]() is self:
                del _held[self.key]
            os.close(fd)  # closing the only descriptor of the file drops this process's lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


def _holder(fd: int) -> str:
    """Who holds the lock, from the text its holder wrote (bounded read; never trusted beyond display)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        return f"pid {int(info['pid'])} on host {str(info['host'])[:255]} since {str(info['since'])[:40]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file names no holder)"


def pid_space() -> dict[str, str]:
    """Where this process's pids mean something: this boot of this machine (``boot``; a host name
    may repeat across machines) and its PID namespace (``pidns``; containers share the host's boot)."""
    out = {}
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            out["boot"] = f.read(64).strip()
        out["pidns"] = os.readlink("/proc/self/ns/pid")
    except (OSError, ValueError):
        pass  # not Linux: nothing to compare, so no pid is trusted across processes
    return out


def holder(root: str) -> dict | None:
    """What the lock file of ``root`` says about its holder (bounded read, no link followed), None
    when there is no lock file; ``{}`` when it names nobody readable."""
    with _guard:
        entry = _held.get(os.path.realpath(root))
        own = entry[1]() if entry is not None and entry[0] == os.getpid() else None
        if own is not None and own._fd is not None:
            return _parse(own._fd)
    try:
        fd = os.open(os.path.join(root, layout.LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:  # closing this descriptor drops no lock: this process holds none on root (see above)
        return _parse(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else {}
    except OSError:
        return {}
    finally:
        os.close(fd)


def _parse(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def pids_comparable(info: dict | None) -> bool:
    """Whether a pid written by the holder ``info`` (``holder()``) names the same process here: the
    holder recorded this machine's boot and this PID namespace. A lock file without them (older
    writers, unreadable) proves nothing."""
    if info is None:
        return True  # no lock file: no holder
    mine = pid_space()
    return len(mine) == 2 and all(info.get(k) == v for k, v in mine.items())


@atexit.register
def _release_all() -> None:
    with _guard:
        locks = [ref() for _, ref in _held.values()]
    for lk in locks:
        if lk is not None:
            lk.release()
