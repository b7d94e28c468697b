"""Durable, atomic publication of a checkpoint, the ``latest`` pointer, retention.

Order (docs/FORMAT.md "Commit protocol"): data files are fsynced by the
engine, parts are written and fsynced by each rank, then after a barrier
rank 0 writes MANIFEST.json (temp name, fsync, rename), fsyncs the directory,
renames ``*.tmp-<token>`` to its final name, fsyncs the root and replaces
``latest``. A crash at any point leaves either the previous state or a
complete new checkpoint; leftovers are only ``.tmp-*`` directories.
"""
from __future__ import annotations

import logging
import os
import shutil
import uuid

from . import layout

log = logging.getLogger("pyckpt")


def fsync_dir(path: str) -> None:
    """fsync a directory so the entries created/renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (no rename; the caller owns atomicity)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` atomically: temp file, fsync, rename, fsync the directory."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        write_durable(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def publish(tmp_dir: str, final_dir: str, manifest: bytes) -> None:
    """Rank 0's commit: manifest last inside the tmp dir, then the directory rename."""
    write_atomic(os.path.join(tmp_dir, layout.MANIFEST), manifest)
    old = None
    if os.path.lexists(final_dir):
        # Saving a step again: move the old one aside (as an in-progress name,
        # so a crash right here leaves it to garbage collection) and replace it.
        old = f"{final_dir}.tmp-{new_token()}"
        os.rename(final_dir, old)
    os.rename(tmp_dir, final_dir)
    fsync_dir(os.path.dirname(os.path.abspath(final_dir)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_latest(root: str, name: str) -> None:
    """Point ``ROOT/latest`` at checkpoint directory ``name``."""
    write_atomic(os.path.join(root, layout.LATEST), (name + "\n").encode())


def read_latest(root: str) -> str | None:
    """The directory name in ``ROOT/latest`` if it names a plausible checkpoint dir, else None."""
    try:
        with open(os.path.join(root, layout.LATEST), "rb") as f:
            raw = f.read(4096)
        name = raw.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if layout.parse_step(name) is None:
        return None  # garbage or a path escaping the root: fall back to scanning
    return name


def apply_retention(root: str, keep: int, protect: set[str] = frozenset()) -> list[str]:
    """Delete committed checkpoints older than the newest ``keep``; returns deleted paths.

    Called only after a new checkpoint committed, so the newest good one
    always survives. Directories without a manifest are left to ``gc_tmp``."""
    committed = [e for e in layout.scan(root) if e.complete and e.step is not None]
    doomed = committed[:-keep] if keep > 0 else []
    deleted = []
    for e in doomed:
        if e.name in protect:
            continue
        # Drop the manifest first: a half-deleted directory then reads as incomplete.
        _unlink_quietly(os.path.join(e.path, layout.MANIFEST))
        shutil.rmtree(e.path, ignore_errors=True)
        deleted.append(e.path)
    return deleted


def gc_tmp(root: str, live_tokens: set[str]) -> list[str]:
    """Remove ``step-*.tmp-<token>`` directories not being written now.

    A token embeds the writer's pid (``<pid>x<random>``); directories whose
    token is live in this process, or whose pid is still running on this
    host, are kept."""
    removed = []
    for e in layout.scan(root):
        token = layout.tmp_token(e.name)
        if token is None or token in live_tokens or _pid_alive(token):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e.path)
    return removed


def new_token() -> str:
    """A tmp-directory token naming this process: ``<pid>x<random hex>``."""
    return f"{os.getpid()}x{uuid.uuid4().hex[:10]}"


def _pid_alive(token: str) -> bool:
    pid_s = token.split("x", 1)[0]
    if not pid_s.isdigit():
        return False
    pid = int(pid_s)
    if pid == os.getpid():
        return False  # ours but not live: a save of ours that failed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def commit_parts(coord, tag: str, tmp_dir: str, final_dir: str, step: int, part: dict | None,
                 error: BaseException | None, root: str | None) -> None:
    """Every rank: write its part, agree that all succeeded, rank 0 publishes.

    Every rank calls this even after a failure, so no rank waits forever; if any
    rank failed nobody commits and rank 0 removes the tmp directory. ``root``
    (when given) gets its ``latest`` pointer updated. Raises on failure."""
    from . import manifest

    info = None
    if error is None:
        try:
            info = _write_part(tmp_dir, coord.rank, manifest.dumps(part))
        except OSError as e:
            error = e
    gathered = coord.all_gather_json({"info": info, "error": None if error is None else str(error)}, f"{tag}/parts")
    failed = [(r, g["error"]) for r, g in enumerate(gathered) if g["info"] is None]
    outcome = None
    if coord.rank == 0:
        outcome = _rank0_publish(tmp_dir, final_dir, step, [g["info"] for g in gathered], failed, root)
    outcome = coord.broadcast_json(outcome, f"{tag}/commit")
    if error is not None:
        raise error
    if not outcome["ok"]:
        from .errors import NativeError

        raise NativeError(f"checkpoint {final_dir} was not committed: {outcome['error']}")


def _write_part(tmp_dir: str, rank: int, raw: bytes) -> dict:
    from .manifest import crc32c

    name = layout.part_name(rank)
    write_durable(os.path.join(tmp_dir, name), raw)
    rank_dir = os.path.join(tmp_dir, os.path.dirname(layout.data_file_name(rank)))
    if os.path.isdir(rank_dir):
        fsync_dir(rank_dir)
    return {"rank": rank, "file": name, "nbytes": len(raw), "crc32c": crc32c(raw)}


def _rank0_publish(tmp_dir: str, final_dir: str, step: int, infos: list, failed: list, root: str | None) -> dict:
    from .manifest import build_manifest, dumps

    if failed:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return {"ok": False, "error": "; ".join(f"rank {r}: {msg}" for r, msg in failed)}
    try:
        fsync_dir(tmp_dir)
        publish(tmp_dir, final_dir, dumps(build_manifest(step, len(infos), infos)))
        if root is not None:
            write_latest(root, os.path.basename(final_dir))
    except OSError as e:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"ok": True, "error": None}


def gc_siblings(final_dir: str) -> list[str]:
    """Remove ``<final_dir>.tmp-<token>`` leftovers of ``pyckpt.save`` calls whose process is gone."""
    parent, base = os.path.split(os.path.abspath(final_dir))
    prefix = f"{base}.tmp-"
    removed = []
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return removed
    for name in names:
        token = name[len(prefix):] if name.startswith(prefix) else None
        if not token or layout.tmp_token(name) != token:
            continue
        if token.split("x", 1)[0] == str(os.getpid()) or _pid_alive(token):
            continue  # this process (maybe another thread) or a live writer
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        removed.append(os.path.join(parent, name))
    return removed
