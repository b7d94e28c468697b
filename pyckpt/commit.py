"""Durable, atomic publication of a checkpoint, the ``latest`` pointer, retention, garbage collection.

Order (docs/FORMAT.md "Commit protocol"): data files are fsynced by the
engine, parts are written and fsynced by each rank, then after a barrier
rank 0 writes MANIFEST.json (temp name, fsync, rename), fsyncs the directory,
renames ``*.tmp-<token>`` to its final name (atomically exchanging it with an
existing checkpoint of that name), fsyncs the root and replaces ``latest``.
The rename is the commit point: before it the previous state is untouched,
after it the new checkpoint is complete. Deleting anything starts with a
rename to a garbage name (``*.del-<token>``); every leftover of a crash
carries such a name and is collected before the next save.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import signal
import stat
import uuid
from typing import Callable

from . import layout

log = logging.getLogger("pyckpt")

# Every place a test can crash the writer (PYCKPT_TEST_CRASH_AT=<name>[:<n>]): before and after each
# file operation of save, commit, retention and garbage collection.
_OPS = ("gc.remove", "save.mkdir", "save.data", "commit.part", "commit.manifest_tmp", "commit.manifest_rename",
        "commit.dir_rename", "commit.exchange", "commit.old_remove", "commit.latest_tmp", "commit.latest_rename",
        "retention.rename", "retention.remove")
CRASH_POINTS: tuple[str, ...] = tuple(f"{op}.{when}" for op in _OPS for when in ("before", "after"))
# Reached only when retention retires a checkpoint that incremental chunks still reference.
INCREMENTAL_CRASH_POINTS: tuple[str, ...] = ("retention.retire.before", "retention.retire.after")
_crash_hits: dict[str, int] = {}


def _crash_point(name: str) -> None:
    """Test hook: SIGKILL this process at the n-th time ``name`` is reached (PYCKPT_TEST_CRASH_AT)."""
    spec = os.environ.get("PYCKPT_TEST_CRASH_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    if _crash_hits[name] == (int(nth) if nth.isdigit() else 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: str) -> None:
    """fsync a directory so the entries created/renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (no rename; the caller owns atomicity)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None  # name the file in the one-line report
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, point: str | None = None) -> None:
    """Replace ``path`` atomically: temp file, fsync, rename, fsync the directory.

    The temp name carries this process's token, so garbage collection can
    tell a dead writer's leftover from a live one. ``point`` names the crash
    points around the two steps (``<point>_tmp`` and ``<point>_rename``)."""
    tmp = f"{path}.tmp-{new_token()}"
    try:
        if point:
            _crash_point(f"{point}_tmp.before")
        write_durable(tmp, data)
        if point:
            _crash_point(f"{point}_tmp.after")
            _crash_point(f"{point}_rename.before")
        os.replace(tmp, path)
        if point:
            _crash_point(f"{point}_rename.after")
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- atomic exchange ----------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None


def exchange(a: str, b: str) -> bool:
    """Atomically swap the entries ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``).

    False when the system or file system does not support it (the caller
    then falls back to two renames); other failures raise OSError."""
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (AttributeError, OSError):
            _renameat2 = False  # glibc < 2.28 or not Linux
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def remove_tree(path: str, point: str | None = None) -> bool:
    """Delete ``path`` without following symbolic links: a link (or file) is unlinked itself, a
    directory is removed with everything in it (links inside are removed, never followed).
    Returns True when nothing is left; failures leave a garbage name for the next collection."""
    if point:
        _crash_point(f"{point}.before")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)  # fd-based on Linux: safe against links inside and swapped components
        else:
            os.unlink(path)
    except OSError as e:
        log.debug("pyckpt: could not remove %s (collected later): %s", path, e)
        return False
    if point:
        _crash_point(f"{point}.after")
    return True


def publish(tmp_dir: str, final_dir: str, manifest: bytes) -> str | None:
    """Rank 0's commit: manifest last inside the tmp dir, then the directory rename (the commit point).

    An existing ``final_dir`` (re-saving a path) is swapped out atomically, so
    some complete checkpoint has that name at every moment; the old one then
    lies under ``tmp_dir``'s name and is returned for the caller to delete
    (garbage collection takes it after a crash). Raises OSError when nothing
    was committed; everything after the rename is left to the caller."""
    write_atomic(os.path.join(tmp_dir, layout.MANIFEST), manifest, point="commit.manifest")
    if os.path.lexists(final_dir):
        _crash_point("commit.exchange.before")
        if exchange(tmp_dir, final_dir):
            _crash_point("commit.exchange.after")
            return tmp_dir
        # No RENAME_EXCHANGE here (docs/FORMAT.md): move the old one aside first. A crash between
        # the two renames leaves this name empty; the old checkpoint then survives only as garbage.
        old = f"{final_dir}.tmp-{new_token()}"
        os.rename(final_dir, old)
        os.rename(tmp_dir, final_dir)
        _crash_point("commit.exchange.after")
        return old
    _crash_point("commit.dir_rename.before")
    os.rename(tmp_dir, final_dir)
    _crash_point("commit.dir_rename.after")
    return None


def write_latest(root: str, name: str) -> None:
    """Point ``ROOT/latest`` at checkpoint directory ``name``."""
    write_atomic(os.path.join(root, layout.LATEST), (name + "\n").encode(), point="commit.latest")


def read_latest(root: str) -> str | None:
    """The directory name in ``ROOT/latest`` if it names a plausible checkpoint dir, else None.

    Opened without following links and without blocking (a FIFO planted as
    ``latest`` must not hang a reader), regular files only."""
    try:
        fd = os.open(os.path.join(root, layout.LATEST), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        name = os.read(fd, 4096).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)
    if layout.parse_step(name) is None:
        return None  # garbage or a path escaping the root: fall back to scanning
    return name


def next_seq(root: str) -> int:
    """The commit sequence number of the next commit in ``root``: 1 + the highest committed one."""
    seqs = [e.seq for e in layout.committed(root) if e.seq is not None]
    return max(seqs, default=0) + 1


def apply_retention(root: str, keep: int, protect: set[str] = frozenset(),
                    salvage: Callable[[str], None] | None = None) -> list[str]:
    """Delete committed checkpoints older than the ``keep`` newest commits; returns deleted paths.

    Order is commit order (``layout.committed``), not step number. The newest
    commit, whatever ``latest`` names, and ``protect`` are never deleted.
    Each victim is first renamed to a garbage name (``step-S.del-<token>``),
    so a crash mid-delete leaves garbage, never a half checkpoint under a
    checkpoint's name. A victim whose data files a kept checkpoint references
    (incremental chunks) is deleted logically only: its ``MANIFEST.json`` is
    removed (it stops being a checkpoint) and its data stays until no
    committed checkpoint references it (``sweep_retired``). Failures are
    logged, never raised. ``salvage(garbage path)`` may move files out of an unreferenced victim
    before it is deleted (the memory tier reuses their pages)."""
    order = layout.committed(root)
    deleted: list[str] = []
    if keep < 1 or len(order) <= keep:
        return deleted
    spared = {e.name for e in order[:keep]} | set(protect)
    pointer = read_latest(root)
    if pointer is not None:
        spared.add(pointer)
    victims = [e for e in order[keep:] if e.name not in spared]
    if not victims:
        return deleted
    from .incremental import referenced_dirs

    refs = referenced_dirs(root, [e.name for e in order if e.name not in {v.name for v in victims}])
    for e in victims:
        if e.name in refs:
            if retire(e.path):
                deleted.append(e.path)
            continue
        garbage = os.path.join(root, layout.del_name(e.name, new_token()))
        try:
            _crash_point("retention.rename.before")
            os.rename(e.path, garbage)
            _crash_point("retention.rename.after")
        except OSError as exc:
            log.warning("pyckpt: retention could not remove %s: %s", e.path, exc)
            continue
        if salvage is not None:
            salvage(garbage)
        remove_tree(garbage, "retention.remove")
        deleted.append(e.path)
    sweep_retired(root, only_retired=True)  # data whose last reference went with these victims
    return deleted


def retire(path: str) -> bool:
    """Delete checkpoint ``path`` logically: remove its manifest (atomic; it is no checkpoint from
    then on) and keep its data files for the checkpoints that reference them."""
    try:
        _crash_point("retention.retire.before")
        os.unlink(os.path.join(path, layout.MANIFEST))
        fsync_dir(path)
        _crash_point("retention.retire.after")
    except OSError as exc:
        log.warning("pyckpt: retention could not retire %s: %s", path, exc)
        return False
    return True


def sweep_retired(root: str, only_retired: bool = False) -> list[str]:
    """Remove retired step directories (no manifest: deleted logically, data kept for references)
    that no committed checkpoint references any more (garbage collection, under the directory
    lock). ``only_retired``: just directories that still hold a part (retired ones), not
    other manifest-less directories (retention's sweep)."""
    retired = [e for e in layout.scan(root) if not e.complete and layout.parse_step(e.name) is not None
               and (not only_retired or os.path.isfile(os.path.join(e.path, layout.part_name(0))))]
    if not retired:
        return []
    from .incremental import referenced_dirs

    refs = referenced_dirs(root)
    removed = []
    for e in retired:
        if e.name in refs:
            continue
        garbage = os.path.join(root, layout.del_name(e.name, new_token()))
        try:
            os.rename(e.path, garbage)
        except OSError:
            continue
        if remove_tree(garbage, "gc.remove"):
            removed.append(e.path)
    return removed


def _garbage_token(name: str) -> str | None:
    """The token of a leftover name in a root (``step-*.tmp-*``, ``step-*.del-*``, ``latest.tmp-*``)."""
    token = layout.tmp_token(name) or layout.del_token(name)
    if token is None:
        return None
    base = name.rsplit(".tmp-" if ".tmp-" in name else ".del-", 1)[0]
    if layout.parse_step(base) is None and base != layout.LATEST:
        return None  # not a name pyckpt makes: leave the user's files alone
    return token


def gc_tmp(root: str, live_tokens: set[str], locked: bool = False) -> list[str]:
    """Remove leftovers in ``root``: ``step-*.tmp-*`` (interrupted saves, replaced checkpoints),
    ``step-*.del-*`` (interrupted deletions), ``latest.tmp-*``, ``MANIFEST.json.tmp-*`` inside
    committed checkpoints and, with ``locked``, ``step-*`` directories without a manifest.

    Tokens in ``live_tokens`` are kept. ``locked``: the caller holds the
    directory lock, so no other writer can be active and every other leftover
    is garbage; otherwise a leftover whose token names a process still
    running on this host is kept, and nothing at all is removed when the lock
    file names a holder whose pids are not this process's to check (another
    machine or PID namespace, or unknown). Links are removed, never followed."""
    removed = []
    if not locked:
        from . import lock

        if not lock.pids_comparable(lock.holder(root)):
            # Its in-progress save's token names a pid of another pid space: a pid that looks dead
            # here may be the live holder. The holder collects its own leftovers at its next save.
            return removed
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        token = _garbage_token(name)
        if token is None or token in live_tokens or (not locked and _pid_alive(token)):
            continue
        path = os.path.join(root, name)
        if remove_tree(path, "gc.remove"):
            removed.append(path)
    if locked:
        # ``step-*`` directories without a manifest: retired checkpoints whose data a committed
        # checkpoint no longer references, or ones half-deleted by older pyckpt versions (which
        # removed MANIFEST.json first). The lock rules out a live writer.
        removed += sweep_retired(root)
    for e in layout.committed(root):
        try:
            inner = os.listdir(e.path)
        except OSError:
            continue
        for name in inner:
            token = layout.tmp_token(name) if name.startswith(layout.MANIFEST + ".tmp-") else None
            if token is None or token in live_tokens or (not locked and _pid_alive(token)):
                continue
            if remove_tree(os.path.join(e.path, name), "gc.remove"):
                removed.append(os.path.join(e.path, name))
    return removed


def new_token() -> str:
    """A token naming this process: ``<pid>x<random hex>``."""
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
                 error: BaseException | None, root: str | None, raw: bytes | None = None) -> dict | None:
    """Every rank: write its part, agree that all succeeded, rank 0 publishes.

    Every rank calls this even after a failure, so no rank waits forever; if any
    rank failed nobody commits and rank 0 removes the tmp directory. ``root``
    (when given) gets a commit sequence number and its ``latest`` pointer
    updated. ``raw``: the part's bytes when the caller has them (``writer.encode_part``),
    else ``manifest.dumps(part)``. Raises on failure. Returns, on rank 0, the
    checkpoint's byte figures (``metrics.sum_figures`` of every rank's part, sent
    with the commit message so nobody parses the parts back), else None."""
    from . import manifest, metrics

    info = figures = None
    if error is None:
        try:
            info = _write_part(tmp_dir, coord.rank, manifest.dumps(part) if raw is None else raw)
            figures = metrics.part_figures(part)
        except OSError as e:
            error = e
    # "figures" stays out of "info": the infos become the manifest's "parts" entries.
    gathered = coord.all_gather_json({"info": info, "error": None if error is None else str(error),
                                      "figures": figures}, f"{tag}/parts")
    failed = [(r, g["error"]) for r, g in enumerate(gathered) if g["info"] is None]
    outcome = None
    if coord.rank == 0:
        outcome = _rank0_publish(tmp_dir, final_dir, step, [g["info"] for g in gathered], failed, root)
    try:
        outcome = coord.broadcast_json(outcome, f"{tag}/commit")
    except Exception as e:
        if coord.rank != 0 or not outcome["ok"]:
            raise
        # Every part was in and rank 0 has published: the checkpoint is complete and stays, whoever
        # is gone now (a preempted rank that exited after its vote). Calling it failed would be false.
        log.warning("pyckpt: checkpoint %s committed, but not every rank heard so: %s", final_dir, e)
    if error is not None:
        raise error
    if not outcome["ok"]:
        from .errors import NativeError

        raise NativeError(f"checkpoint {final_dir} was not committed: {outcome['error']}")
    from .incremental import remember_part

    remember_part(final_dir, info, part)
    return metrics.sum_figures([g.get("figures") for g in gathered]) if coord.rank == 0 else None


def _write_part(tmp_dir: str, rank: int, raw: bytes) -> dict:
    from .manifest import crc32c

    name = layout.part_name(rank)
    _crash_point("commit.part.before")
    write_durable(os.path.join(tmp_dir, name), raw)
    rank_dir = os.path.join(tmp_dir, os.path.dirname(layout.data_file_name(rank)))
    if os.path.isdir(rank_dir):
        fsync_dir(rank_dir)
    _crash_point("commit.part.after")
    return {"rank": rank, "file": name, "nbytes": len(raw), "crc32c": crc32c(raw)}


def _read_by_others(root: str, final_dir: str) -> list[str]:
    """The committed checkpoints of ``root`` other than ``final_dir`` whose parts reference its files,
    newest first (parsed only when a save is about to replace an existing directory: a re-save)."""
    from .incremental import referrers

    name = os.path.basename(os.path.normpath(final_dir))
    return list(referrers(root, {name}).get(name, ()))[::-1]


def replace_refusal(root: str, final_dir: str) -> str | None:
    """Why ``final_dir`` (an entry of ``root``) must not be replaced, or None: committed checkpoints
    of ``root`` read chunks from its data files (docs/FORMAT.md §7 step 6)."""
    held = _read_by_others(root, final_dir) if os.path.lexists(final_dir) else []
    if not held:
        return None
    return (f"{final_dir} exists and committed checkpoints ({', '.join(held[:3])}{' ...' if len(held) > 3 else ''}) "
            "read chunks from its data files (incremental saves); replacing it would damage them")


def _rank0_publish(tmp_dir: str, final_dir: str, step: int, infos: list, failed: list, root: str | None) -> dict:
    from .manifest import build_manifest, seal

    if failed:
        remove_tree(tmp_dir)
        return {"ok": False, "error": "; ".join(f"rank {r}: {msg}" for r, msg in failed)}
    why = replace_refusal(root, final_dir) if root is not None else None
    if why is not None:
        remove_tree(tmp_dir)
        return {"ok": False, "error": (
            f"{why}. A run started over (PYCKPT_RESUME=never) next to an earlier run's checkpoints should use "
            "a new directory")}
    absent = [i["rank"] for i in infos if not _part_here(tmp_dir, i)]
    if absent:  # the ranks wrote into different directories, or onto file systems they do not share
        remove_tree(tmp_dir)
        ranks = ", ".join(map(str, absent))
        who = f"file of rank {ranks} is" if len(absent) == 1 else f"files of ranks {ranks} are"
        return {"ok": False, "error": (f"the part {who} not in {tmp_dir} as rank 0 sees it: every rank must save "
                                       "into the same directory, on a file system all ranks share")}
    try:
        fsync_dir(tmp_dir)
        seq = next_seq(root) if root is not None else None
        old = publish(tmp_dir, final_dir, seal(build_manifest(step, len(infos), infos, seq=seq)))
    except OSError as e:
        remove_tree(tmp_dir)
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    # Committed: from here on a failure is a warning, never a failed save. Readers find the
    # newest commit by scanning, so a stale `latest` costs nothing but a hint.
    parent = os.path.dirname(os.path.abspath(final_dir))
    try:
        fsync_dir(parent)
    except OSError as e:
        log.warning("pyckpt: checkpoint %s committed, but fsync of %s failed: %s", final_dir, parent, e)
    if old is not None:
        remove_tree(old, "commit.old_remove")
    if root is not None:
        try:
            write_latest(root, os.path.basename(final_dir))
        except OSError as e:
            log.warning("pyckpt: checkpoint %s committed, but the 'latest' pointer was not updated "
                        "(readers find it by scanning): %s", final_dir, e)
    return {"ok": True, "error": None}


def _part_here(tmp_dir: str, info: dict) -> bool:
    """Whether the part file a rank announced (``_write_part``) is in ``tmp_dir`` with its size."""
    try:
        return os.stat(os.path.join(tmp_dir, info["file"])).st_size == info["nbytes"]
    except OSError:
        return False


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
        if remove_tree(os.path.join(parent, name)):
            removed.append(os.path.join(parent, name))
    return removed
