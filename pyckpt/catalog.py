"""What a checkpoint root holds: ``pyckpt.list(dir)``, the finished-run marker, ``keep_best`` selection.

``list`` reports every checkpoint directory (committed or not) with its size
and, unless ``verify=False``, whether it is *sound*: its manifest, parts and
every chunk's checksum verify (the same check as ``pyckpt verify``). A directory
without a manifest is either garbage (an interrupted save, a deletion cut short)
or a checkpoint retention retired whose data files committed checkpoints still
reference (incremental chunks); ``Info.referenced_by`` tells them apart.
"""
from __future__ import annotations

import builtins
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

from . import layout, safe_fs

MONITOR_FILE = "pyckpt-monitor.json"  # inside a step directory: the keep_best metric of that save


@dataclass(frozen=True)
class Info:
    """One checkpoint directory of a root."""

    name: str
    path: str
    step: int | None
    time: float  # commit time (mtime of MANIFEST.json), or the directory's mtime when incomplete
    size: int  # bytes on disk
    complete: bool  # has MANIFEST.json (committed)
    sound: bool | None  # verified (manifest, parts, every checksum); None when not checked
    error: str | None = None  # why it is not sound
    # The other committed checkpoints whose parts reference its data files (incremental chunks). Without
    # a manifest, retention retired it (docs/FORMAT.md §14) but they still read it, so, unlike an
    # interrupted save, it must not be deleted; a committed one cannot be deleted without breaking them
    # either. Empty for garbage, and for committed ones when the caller did not look them up.
    referenced_by: tuple[str, ...] = ()

    @property
    def retired(self) -> bool:
        """No checkpoint any more, but data that committed checkpoints need: keep it."""
        return not self.complete and bool(self.referenced_by)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def disk_usage(path: str) -> int:
    """Bytes of the regular files under ``path`` (symlinks are not followed)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def entries(path: str) -> list[layout.Entry]:
    """The checkpoint directories of a root, or ``path`` itself when it is one checkpoint (or a
    retired one: a ``step-*`` directory that still holds its parts but no manifest)."""
    p = os.path.abspath(os.fspath(path))
    name = os.path.basename(p)
    if layout.is_checkpoint_dir(p):
        return [layout.Entry(name, p, layout.parse_step(name), True)]
    found = layout.scan(p)
    if not found and layout.parse_step(name) is not None and layout.is_real_dir(p) \
            and os.path.isfile(os.path.join(p, layout.part_name(0))):
        # Asked about one retired directory (before deleting it, say): report it rather than "no checkpoints".
        return [layout.Entry(name, p, layout.parse_step(name), False)]
    return found


def referrers(found: builtins.list[layout.Entry], committed: bool = False) -> dict[str, tuple[str, ...]]:
    """For each ``step-*`` directory of ``found`` without a manifest (and with ``committed``, each
    committed one too), the other committed checkpoints of its root (by step) whose parts reference
    its data files; directories nothing references are left out.

    The same reference count garbage collection and retention use (``incremental.referenced_dirs``),
    so what this names is exactly what ``pyckpt gc`` keeps. Without ``committed``, committed parts are
    parsed only when a directory without a manifest exists."""
    candidates = [e for e in found if (committed or not e.complete) and layout.parse_step(e.name) is not None]
    if not candidates:
        return {}
    from .incremental import referrers as referrers_in

    return referrers_in(os.path.dirname(candidates[0].path), {e.name for e in candidates})


def check(path: str) -> str | None:
    """Verify one committed checkpoint fully; None when sound, else the reason."""
    from ._native import get_engine
    from .errors import PyckptError
    from .reader import verify

    try:
        verify(get_engine(), path)
    except PyckptError as e:
        return str(e)
    except OSError as e:  # e.g. a permission error outside the reader's own checks
        return f"{type(e).__name__}: {e}"
    return None


def info_of(e: layout.Entry, verify: bool = True, refs: dict[str, tuple[str, ...]] | None = None) -> Info:
    """The ``Info`` of one scanned directory; ``refs``: ``referrers()`` of the entries it came from."""
    stamp = os.path.join(e.path, layout.MANIFEST) if e.complete else e.path
    try:
        t = os.path.getmtime(stamp)
    except OSError:
        t = math.nan
    by = (refs or {}).get(e.name, ())
    sound: bool | None = None
    error = None
    if verify:
        if e.complete:
            error = check(e.path)
        elif by:  # its data is verified as part of the checkpoints that reference it
            error = f"retired (no MANIFEST.json); its data files are referenced by {', '.join(by)}"
        else:
            error = "incomplete (no MANIFEST.json)"
        sound = error is None
    return Info(e.name, e.path, e.step, t, disk_usage(e.path), e.complete, sound, error, by)


def list(directory: str | os.PathLike, verify: bool = True) -> builtins.list[Info]:
    """Every checkpoint in ``directory`` (a root, or one checkpoint directory), oldest step first.

    ``verify=True`` re-reads every chunk of every committed checkpoint to set
    ``sound`` (costs a full read); ``verify=False`` leaves ``sound`` None.
    Raises ``FileNotFoundError`` when ``directory`` does not exist. An object-storage URL
    (``s3://bucket/run``) lists its checkpoints (``path`` is each one's URL; ``verify`` downloads them)."""
    from .remote import infos, is_url

    if is_url(directory):
        return infos(directory, verify)
    d = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(d):
        raise FileNotFoundError(f"{d} is not a directory")
    found = entries(d)
    refs = referrers(found, committed=True)
    return [info_of(e, verify, refs) for e in found]


def is_finished(root: str | os.PathLike) -> dict[str, Any] | None:
    """The finished-run marker of ``root`` (written by ``metrics.mark_finished``), or None."""
    from .metrics import FINISHED_FILE, is_figure
    from .remote import is_url, reader_root

    try:
        if is_url(root):  # object storage: one small GET
            raw = reader_root(root).read_small(FINISHED_FILE)
            body = json.loads(raw) if raw is not None else None
        else:
            body = json.loads(safe_fs.read_small(os.path.join(os.fspath(root), FINISHED_FILE), 1 << 16))
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict) or body.get("finished") is not True:
        return None
    # Read from the checkpoint directory like the rest of it: a field of the wrong kind is dropped
    # (shown as unknown), not trusted (a time of 1e300 crashed a relaunch's first iter()).
    marker = dict(body)  # other keys (mark_finished's **info) are shown as they are
    for key in ("step", "steps"):
        if marker.get(key) is not None and not (isinstance(marker[key], int) and is_figure(marker[key])):
            del marker[key]
    if marker.get("time") is not None and not is_figure(marker["time"], below=1e11):  # (1e11 s: year 5138)
        del marker["time"]
    if marker.get("last_checkpoint_ok") is not None and not isinstance(marker["last_checkpoint_ok"], bool):
        del marker["last_checkpoint_ok"]
    script = marker.get("script")  # a file name only: it is printed, and compared with the running script's
    if script is not None and not (isinstance(script, str) and script.endswith(".py") and len(script) <= 255
                                   and script.isprintable() and "/" not in script):
        del marker["script"]
    return marker


# -- keep_best -------------------------------------------------------------------------
def write_monitor(ckpt_dir: str, value: float) -> None:
    """Store the monitored metric of a save inside its (not yet committed) directory."""
    from .commit import write_durable

    write_durable(os.path.join(ckpt_dir, MONITOR_FILE), json.dumps({"value": value}).encode())


def read_monitor(ckpt_dir: str) -> float | None:
    """The stored metric of a checkpoint, or None (none stored, unreadable, not a finite number)."""
    try:
        value = json.loads(safe_fs.read_small(os.path.join(ckpt_dir, MONITOR_FILE), 4096)).get("value")
    except (OSError, ValueError, AttributeError):
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)
    except OverflowError:  # an integer past float's range
        return None


def select_best(values: dict[str, float | None], k: int, mode: str = "min") -> set[str]:
    """The names of the ``k`` best values (``mode`` "min": lowest is best, "max": highest).

    Names without a value are never selected; ties keep the later name
    (checkpoint names sort by step), so the newer of two equal scores wins."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if k <= 0:
        return set()
    scored = [(v, n) for n, v in values.items() if v is not None]
    sign = 1.0 if mode == "min" else -1.0
    scored.sort(key=lambda vn: vn[1], reverse=True)  # later names first among equal values (stable sort)
    scored.sort(key=lambda vn: sign * vn[0])
    return {n for _, n in scored[:k]}


def best_names(root: str, k: int, mode: str = "min") -> set[str]:
    """Names of the ``k`` committed checkpoints of ``root`` with the best stored metric."""
    values = {e.name: read_monitor(e.path) for e in layout.scan(root) if e.complete}
    return select_best(values, k, mode)


def check_best(keep_best: int, monitor: Any, mode: str) -> None:
    """Validate ``Checkpointer(keep_best=, monitor=, mode=)``; raises ValueError / TypeError."""
    if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
        raise ValueError(f"keep_best must be an integer >= 0, got {keep_best!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' (lower is better) or 'max', got {mode!r}")
    if keep_best and not callable(monitor):
        raise TypeError("keep_best needs monitor=, a function returning the metric to rank checkpoints by "
                        "(e.g. monitor=lambda: val_loss)")
    if monitor is not None and not callable(monitor):
        raise TypeError(f"monitor must be callable, got {type(monitor).__name__}")


def monitor_value(monitor: Any) -> float | None:
    """``monitor()`` as a finite float, or None with one ``pyckpt:`` warning (the save goes on)."""
    import logging

    if monitor is None:
        return None
    try:
        value = monitor()
        value = float(value.item() if hasattr(value, "item") else value)
    except Exception as e:  # a broken metric must not cost the checkpoint
        logging.getLogger("pyckpt").warning("pyckpt: monitor() failed (%s: %s); this checkpoint is kept "
                                            "only as one of the newest", type(e).__name__, e)
        return None
    if not math.isfinite(value):
        logging.getLogger("pyckpt").warning("pyckpt: monitor() returned %r; this checkpoint is kept only as "
                                            "one of the newest", value)
        return None
    return value
