"""Names and places inside a checkpoint root (docs/FORMAT.md "Directory layout").

Nothing here follows a symbolic link: a ``step-*`` entry that is a link is
not a checkpoint (never loaded, never deleted through), so nothing outside
the root is ever read or removed because of a name inside it.
"""
from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass

MANIFEST = "MANIFEST.json"
LATEST = "latest"
LOCK = ".pyckpt.lock"
_STEP_RE = re.compile(r"^step-(\d{9,})$")
MAX_STEP = (1 << 63) - 1  # a step is a signed 64-bit integer in the manifest (docs/FORMAT.md)
_TMP_RE = re.compile(r"^(step-\d{9,}|.+)\.tmp-([A-Za-z0-9_-]+)$")
_DEL_RE = re.compile(r"^(.+)\.del-([A-Za-z0-9_-]+)$")
_SEQ_PEEK_BYTES = 16 << 20  # the manifest size cap of docs/FORMAT.md


def step_dir_name(step: int) -> str:
    """``step-000001200`` (9 digits, more when the step needs them)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:09d}"


def tmp_dir_name(final_name: str, token: str) -> str:
    """The in-progress name of a checkpoint directory."""
    return f"{final_name}.tmp-{token}"


def del_name(final_name: str, token: str) -> str:
    """The name a checkpoint is renamed to right before it is deleted (garbage from then on)."""
    return f"{final_name}.del-{token}"


def part_name(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def data_file_name(rank: int, index: int = 0) -> str:
    """Data file path relative to the checkpoint directory."""
    return f"rank-{rank:05d}/data-{index:03d}.bin"


def parse_step(name: str) -> int | None:
    """The step of a committed-checkpoint directory name, else None."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def tmp_token(name: str) -> str | None:
    """The token of an in-progress directory name, else None."""
    m = _TMP_RE.match(name)
    return m.group(2) if m else None


def del_token(name: str) -> str | None:
    """The token of a being-deleted name (``<name>.del-<token>``), else None."""
    m = _DEL_RE.match(name)
    return m.group(2) if m else None


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def is_real_dir(path: str) -> bool:
    """A directory that is not a symbolic link."""
    st = _lstat(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def is_checkpoint_dir(path: str) -> bool:
    """True when ``path`` is a directory holding a regular ``MANIFEST.json`` (not a link).

    ``path`` itself may be a link the caller named (``pyckpt.load("best")``);
    entries found inside a root are checked with ``is_real_dir`` as well."""
    st = _lstat(os.path.join(path, MANIFEST))
    return os.path.isdir(path) and st is not None and stat.S_ISREG(st.st_mode)


@dataclass(frozen=True)
class Entry:
    """One directory found in a root: a committed-looking step or an in-progress one.

    ``seq`` is the commit sequence number from the manifest (None for
    in-progress directories and for manifests written before sequence numbers
    existed); ``mtime`` the manifest's (or, when incomplete, the directory's)
    modification time."""

    name: str
    path: str
    step: int | None
    complete: bool
    seq: int | None = None
    mtime: float = 0.0


def scan(root: str) -> list[Entry]:
    """Every ``step-*`` directory in ``root`` (committed and in progress), by step then name.

    Symbolic links are left out (see ``links``)."""
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for name in names:
        path = os.path.join(root, name)
        step = parse_step(name)
        if step is not None and is_real_dir(path):
            out.append(_entry(name, path, step))
        elif tmp_token(name) is not None and name.startswith("step-") and is_real_dir(path):
            out.append(Entry(name, path, parse_step(name.split(".tmp-")[0]), False, None, _mtime(path)))
    return sorted(out, key=lambda e: (e.step if e.step is not None else -1, e.name))


def links(root: str) -> list[str]:
    """``step-*`` names in ``root`` that are symbolic links (never checkpoints)."""
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if parse_step(n) is not None and os.path.islink(os.path.join(root, n)))


def committed(root: str) -> list[Entry]:
    """Committed checkpoints of ``root`` in commit order, newest first.

    Order: the manifest's commit sequence number ``seq`` (highest newest);
    manifests without one (older writers, ``pyckpt.save``) count as older
    than every sequenced one and are ordered by manifest modification time.
    Step numbers do not decide (a new run may restart at step 0)."""
    done = [e for e in scan(root) if e.complete]
    return sorted(done, key=lambda e: (e.seq is not None, e.seq or 0, e.mtime, e.name), reverse=True)


def _entry(name: str, path: str, step: int) -> Entry:
    mpath = os.path.join(path, MANIFEST)
    st = _lstat(mpath)
    if st is None or not stat.S_ISREG(st.st_mode):
        return Entry(name, path, step, False, None, _mtime(path))
    return Entry(name, path, step, True, read_seq(mpath), st.st_mtime)


def _mtime(path: str) -> float:
    st = _lstat(path)
    return st.st_mtime if st is not None else 0.0


def read_seq(manifest_path: str) -> int | None:
    """The ``seq`` of a manifest, or None (absent, unreadable, not a regular file, malformed).

    Only orders candidates; the manifest is validated again before anything is loaded."""
    try:
        fd = os.open(manifest_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _SEQ_PEEK_BYTES:
            return None
        chunks, left = [], st.st_size
        while left > 0:
            b = os.read(fd, min(left, 1 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        obj = json.loads(b"".join(chunks).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    finally:
        os.close(fd)
    seq = obj.get("seq") if isinstance(obj, dict) else None
    return seq if type(seq) is int and seq >= 0 else None
