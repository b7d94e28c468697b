"""Opening files of a checkpoint without leaving it (docs/FORMAT.md "Reader requirements").

Every file of a checkpoint is reached by an ``openat``-style walk from the
checkpoint directory: each component is opened relative to the previous one
with ``O_NOFOLLOW``, so a symbolic link anywhere inside the checkpoint (the
directory's own entry, a rank directory, a part, a data file,
``MANIFEST.json``) is refused instead of followed. Files are opened with
``O_NONBLOCK`` (a FIFO planted in a checkpoint never blocks the open) and
must be regular files (``fstat``); their size is taken from that ``fstat``
before anything is allocated. Errors name the file, never its contents.

The path *above* the checkpoint directory is the caller's and is used as
given (``pyckpt.load`` resolves the user's path once, see ``api.resolve``).
"""
from __future__ import annotations

import errno
import os
import stat

from . import layout
from .errors import CorruptCheckpointError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def full_path(ckpt: str, rel: str) -> str:
    """The path used in messages for ``rel`` inside checkpoint ``ckpt``."""
    return os.path.normpath(os.path.join(ckpt, rel))


def _refusal(name: str, dir_fd: int, shown: str, what: str, err: OSError) -> CorruptCheckpointError:
    """A CorruptCheckpointError for a failed open of ``name`` relative to ``dir_fd``."""
    if err.errno == errno.ENOENT:
        return CorruptCheckpointError(f"{what} {shown} is missing", path=shown)
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        return CorruptCheckpointError(
            f"{what} {shown} is a symbolic link: pyckpt does not follow links inside a checkpoint", path=shown)
    if err.errno in (errno.ENOTDIR, errno.ELOOP):
        return CorruptCheckpointError(f"{what} {shown}: a component of the path is not a directory", path=shown)
    return CorruptCheckpointError(f"cannot open {what} {shown}: {err.strerror}", path=shown)


class CheckpointDir:
    """An open checkpoint directory; files inside are opened relative to it. Use as a context manager."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        parent, name = os.path.split(self.path)
        self._parent_path = parent
        try:
            pfd = os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise CorruptCheckpointError(f"cannot open checkpoint directory {self.path}: {e.strerror}",
                                         path=self.path) from None
        self._parent_fd: int | None = pfd
        try:
            self.fd = pfd if not name else self._open_dir(pfd, name, self.path, "checkpoint directory")
        except BaseException:
            os.close(pfd)
            raise

    @staticmethod
    def _open_dir(dir_fd: int, name: str, shown: str, what: str) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            raise _refusal(name, dir_fd, shown, what, e) from None

    def close(self) -> None:
        """Close the directory descriptors (idempotent)."""
        for attr in ("fd", "_parent_fd"):
            fd = getattr(self, attr, None)
            if fd is not None:
                setattr(self, attr, None)
                if attr == "fd" and fd == self._parent_fd:
                    continue
                os.close(fd)

    def __enter__(self) -> "CheckpointDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, rel: str, what: str = "file") -> tuple[int, int]:
        """Open regular file ``rel`` (a validated relative path) for reading: returns (fd, size).

        ``rel`` may start with ``../step-N/`` (a sibling checkpoint of a root,
        docs/FORMAT.md §4) only when this directory is itself a ``step-*``
        entry; every other way out is refused."""
        shown = full_path(self.path, rel)
        comps = rel.split("/")
        base, anchor = self.fd, self.path
        if comps and comps[0] == "..":
            if (len(comps) < 3 or layout.parse_step(os.path.basename(self.path)) is None
                    or layout.parse_step(comps[1]) is None):
                raise CorruptCheckpointError(f"{what} path {rel!r} leaves the checkpoint directory", path=shown)
            base, anchor, comps = self._parent_fd, self._parent_path, comps[1:]
        if any(c in ("", ".", "..") for c in comps) or "\0" in rel:
            raise CorruptCheckpointError(f"{what} path {rel!r} is not a plain relative path", path=shown)
        opened: list[int] = []
        try:
            for k, c in enumerate(comps[:-1]):
                sub = full_path(anchor, "/".join(comps[:k + 1]))
                base = self._open_dir(base, c, sub, f"directory of {what} {shown}:")
                opened.append(base)
            try:
                fd = os.open(comps[-1], _FILE_FLAGS, dir_fd=base)
            except OSError as e:
                raise _refusal(comps[-1], base, shown, what, e) from None
        finally:
            for d in opened:
                os.close(d)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptCheckpointError(f"{what} {shown} is not a regular file", path=shown)
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size

    def size(self, rel: str, what: str = "file") -> int:
        """Size of regular file ``rel`` (opened, checked and closed)."""
        fd, size = self.open(rel, what)
        os.close(fd)
        return size

    def read(self, rel: str, cap: int, what: str = "file") -> bytearray:
        """All bytes of regular file ``rel``, refusing files over ``cap`` bytes before reading."""
        shown = full_path(self.path, rel)
        fd, size = self.open(rel, what)
        try:
            if size > cap:
                raise CorruptCheckpointError(f"{what} {shown} is {size} bytes, over the {cap}-byte cap", path=shown)
            buf = bytearray(size)
            view, got = memoryview(buf), 0
            while got < size:
                n = os.readv(fd, [view[got:]])
                if n == 0:
                    break
                got += n
        except OSError as e:
            raise CorruptCheckpointError(f"cannot read {what} {shown}: {e.strerror}", path=shown) from None
        finally:
            os.close(fd)
        if got != size:
            raise CorruptCheckpointError(f"{what} {shown} shrank while being read ({got} of {size} bytes)",
                                         path=shown)
        return buf


# -- the files pyckpt keeps beside its checkpoints -----------------------------------------------------
NOT_REGULAR = "not a regular file (a FIFO, a device or a symbolic link)"


def open_regular(path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """``os.open`` of a file pyckpt keeps beside its checkpoints (``metrics.jsonl``, ``FINISHED.json``,
    the memory tier's token, a checkpoint's ``pyckpt-monitor.json``); the caller closes the descriptor.

    Never blocks: a FIFO planted there would block a plain ``open()`` until a writer or reader came
    (a relaunch, or a save's commit thread, then waited for ever). A symbolic link is not followed and
    anything but a regular file is refused (a link to ``/dev/zero`` read without end). Raises OSError,
    ``NOT_REGULAR`` in its message for those."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        # ELOOP: a link (O_NOFOLLOW); ENXIO: a FIFO opened for writing that no one reads.
        if e.errno in (errno.ELOOP, errno.ENXIO):
            raise OSError(e.errno, NOT_REGULAR, path) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, NOT_REGULAR, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small(path: str, cap: int) -> bytes:
    """At most ``cap`` bytes of the regular file ``path`` (``open_regular``); FileNotFoundError when absent."""
    fd = open_regular(path)
    try:
        return os.read(fd, cap)
    finally:
        os.close(fd)
