"""Checkpoint metrics: one JSON line per save (and per restore) in ``ROOT/metrics.jsonl``.

The commit thread of a ``Checkpointer`` hands a ``SaveTimer`` and the outcome
to ``save_done``. The byte figures agree with what is on disk (``bytes_written``
is the sum of the data files' sizes): each rank computes its own from the part
it wrote (``part_figures``) and rank 0 sums them (``sum_figures``), so a commit
does not parse every part back; where a save has none, they are read back from
the committed files (``data_figures``). Callbacks registered with ``on_checkpoint`` get
the same record (rank 0 only). ``pyckpt stats DIR`` summarises the file.

Record fields (event "save"): ``step``, ``time`` (unix seconds), ``ok``,
``error``, ``path``, ``stall_s`` (time ``save()`` blocked plus the time the
caller was blocked in ``captured()``), ``save_call_s``, ``capture_s`` (from
``save()`` until every tensor was copied to staging), ``durable_s`` (from
``save()`` until the checkpoint was committed), ``bytes_raw``,
``bytes_stored``, ``bytes_written``, ``bytes_skipped``, ``codec_ratio``,
``throughput_mb_s``, ``world_size``, ``monitor`` (the ``keep_best``
metric, when there is one) and ``url`` (object-storage roots: where the
checkpoint was uploaded; ``path`` is the local staging copy). Event "restore": ``step``, ``path``,
``restore_s``. This module never imports torch.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import gcpause, safe_fs

METRICS_FILE = "metrics.jsonl"
FINISHED_FILE = "FINISHED.json"
_MAX_LINE = 1 << 20  # a longer line is not one of ours

# A child of the "pyckpt" logger: a save's own failure stays one line on "pyckpt"; metrics
# trouble is a separate event that users can silence on its own.
log = logging.getLogger("pyckpt.metrics")
_callbacks: list[Callable[[dict], Any]] = []
_lock = threading.Lock()
_append_failed: set[str] = set()  # roots already warned about (a full disk fails every append)


class SaveTimer:
    """Timestamps of one save, taken by the Checkpointer (monotonic clock)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.t0 = time.monotonic()
        self.wall = time.time()
        self.t_return: float | None = None
        self.t_captured: float | None = None
        self.blocked_s = 0.0  # time callers spent inside captured()
        self.monitor: float | None = None
        self.url: str | None = None  # an object-storage root: the uploaded checkpoint's URL
        self.figures: dict[str, Any] | None = None  # sum_figures of the committed parts, when known
        # The training stall, when another save's (storage's copy of a memory-tier snapshot: the memory
        # save stalled training, the copy did not; its record used to say 0 for every save).
        self.stall_s: float | None = None

    def stall(self) -> float:
        """Seconds the caller was held: the ``save()`` call and waits in ``captured()`` so far."""
        t_ret = self.t_return if self.t_return is not None else time.monotonic()
        return t_ret - self.t0 + self.blocked_s

    def returned(self) -> None:
        """``save()`` is about to return to the caller."""
        self.t_return = time.monotonic()

    def captured(self) -> None:
        """Every tensor is in staging (or the save stopped)."""
        if self.t_captured is None:
            self.t_captured = time.monotonic()

    def add_blocked(self, seconds: float) -> None:
        """A caller waited ``seconds`` in ``SaveFuture.captured()``."""
        self.blocked_s += seconds


class Handle:
    """Returned by ``on_checkpoint``; ``remove()`` unregisters the callback."""

    def __init__(self, fn: Callable[[dict], Any]) -> None:
        self.fn = fn

    def remove(self) -> None:
        with _lock:
            if self.fn in _callbacks:
                _callbacks.remove(self.fn)


def on_checkpoint(fn: Callable[[dict], Any]) -> Handle:
    """Call ``fn(record)`` after every checkpoint save (committed or failed) and restore, on rank 0.

    ``record`` is the dict written to ``metrics.jsonl``. It runs on the commit
    thread before the save's future completes, so keep it short (log to
    TensorBoard/W&B); an exception in it is logged and otherwise ignored."""
    if not callable(fn):
        raise TypeError(f"on_checkpoint needs a callable, got {type(fn).__name__}")
    with _lock:
        _callbacks.append(fn)
    return Handle(fn)


def data_figures(ckpt_dir: str) -> dict[str, Any]:
    """Byte figures of a committed checkpoint, read from its part files and the data files' sizes."""
    with open(os.path.join(ckpt_dir, "MANIFEST.json"), "rb") as f:
        manifest = json.loads(f.read(16 << 20))
    shares = []
    for info in manifest["parts"]:
        with open(os.path.join(ckpt_dir, info["file"]), "rb") as f:
            text = f.read()
        with gcpause.paused():  # a big part is tens of thousands of short-lived objects (gcpause.py)
            share = part_figures(json.loads(text))
        if share is None:
            raise ValueError(f"{info['file']} is not a well-formed part")
        # The data files' sizes as they are on disk, not as the part recorded them.
        share["files"] = {rel: os.path.getsize(os.path.join(ckpt_dir, rel)) for rel in share["files"]}
        shares.append(share)
    return sum_figures(shares) if shares else _figures(0, 0, 0, 0, 0)


def _figures(raw: int, stored: int, written: int, skipped: int, world_size: int) -> dict[str, Any]:
    return {"bytes_raw": raw, "bytes_stored": stored, "bytes_written": written, "bytes_skipped": skipped,
            "codec_ratio": round(raw / stored, 4) if stored else 1.0, "world_size": world_size}


def part_figures(part: dict) -> dict[str, Any] | None:
    """One rank's share of ``data_figures``, from the part it is about to commit (in memory, sizes of
    its data files as the part records them), for rank 0's ``sum_figures``; None when ``part`` is
    not a well-formed part (rank 0 then reads the figures from disk)."""
    try:
        raw = stored = skipped = 0
        for ch in part["chunks"]:
            if ch["file"].startswith("../"):
                skipped += ch["raw_len"]
                continue
            raw += ch["raw_len"]
            stored += ch["stored_len"]
        files = {fe["path"]: fe["nbytes"] for fe in part["files"] if not fe["path"].startswith("../")}
    except (KeyError, TypeError, AttributeError):
        return None
    return {"raw": raw, "stored": stored, "skipped": skipped, "files": files}


def sum_figures(shares: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The record's byte figures (as ``data_figures`` gives them) from every rank's ``part_figures``
    (one per part, in rank order); None when a rank has none."""
    if not shares or any(not isinstance(f, dict) for f in shares):
        return None
    files: dict[str, int] = {}
    for f in shares:
        files.update(f["files"])  # a file listed by two parts is one file on disk
    return _figures(sum(f["raw"] for f in shares), sum(f["stored"] for f in shares), sum(files.values()),
                    sum(f["skipped"] for f in shares), len(shares))


def save_record(timer: SaveTimer, path: str | None, error: BaseException | None) -> dict[str, Any]:
    """The "save" record for a finished save (``path`` is the committed directory, or None)."""
    now = time.monotonic()
    t_ret = timer.t_return if timer.t_return is not None else now
    rec: dict[str, Any] = {
        "event": "save", "step": timer.step, "time": round(timer.wall, 3), "ok": error is None,
        "error": None if error is None else f"{type(error).__name__}: {error}", "path": path,
        "stall_s": round(t_ret - timer.t0 + timer.blocked_s if timer.stall_s is None else timer.stall_s, 6),
        "save_call_s": round(t_ret - timer.t0, 6),
        "capture_s": None if timer.t_captured is None else round(timer.t_captured - timer.t0, 6),
        "durable_s": round(now - timer.t0, 6) if error is None else None,
    }
    if timer.monitor is not None:
        rec["monitor"] = timer.monitor
    if timer.url is not None:
        rec["url"] = timer.url
    if path is not None and error is None:
        try:
            # The ranks' own figures where the commit gathered them: no part is parsed back.
            rec.update(timer.figures if timer.figures is not None else data_figures(path))
        except (OSError, ValueError, KeyError, TypeError) as e:
            rec["figures_error"] = f"{type(e).__name__}: {e}"
        if rec.get("durable_s") and "bytes_raw" in rec:
            rec["throughput_mb_s"] = round(rec["bytes_raw"] / rec["durable_s"] / 1e6, 3)
    return rec


def emit(root: str, record: dict[str, Any]) -> None:
    """Append ``record`` to ``root/metrics.jsonl`` and call the ``on_checkpoint`` callbacks.

    Never raises: metrics must not fail a checkpoint."""
    line = (json.dumps(record, allow_nan=False, default=str) + "\n").encode()
    try:
        # One write() of an O_APPEND file: concurrent writers never interleave inside a line.
        fd = safe_fs.open_regular(os.path.join(root, METRICS_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except (OSError, ValueError) as e:
        if root not in _append_failed:
            _append_failed.add(root)
            log.warning("pyckpt: cannot append to %s (metrics lines are lost until it works again): %s",
                        os.path.join(root, METRICS_FILE), getattr(e, "strerror", None) or e)
    else:
        _append_failed.discard(root)
    with _lock:
        fns = list(_callbacks)
    for fn in fns:
        try:
            fn(dict(record))
        except Exception as e:  # a user's logger must not break checkpointing
            log.warning("pyckpt: on_checkpoint callback %r failed: %s: %s", fn, type(e).__name__, e)


def save_done(root: str, timer: SaveTimer, path: str | None, error: BaseException | None) -> dict[str, Any]:
    """Called by the Checkpointer (rank 0) once a save committed or failed; returns the record."""
    rec = save_record(timer, path, error)
    emit(root, rec)
    return rec


def restore_done(root: str, step: int, path: str, seconds: float) -> dict[str, Any]:
    """Called after a Checkpointer restore (rank 0): a "restore" line with the time it took."""
    rec = {"event": "restore", "step": step, "time": round(time.time(), 3), "path": path,
           "restore_s": round(seconds, 6)}
    emit(root, rec)
    return rec


# Figures of save and restore records: non-negative numbers below 2**63 (seconds, bytes, ratios).
_FIGURES = ("time", "stall_s", "save_call_s", "capture_s", "durable_s", "restore_s", "bytes_raw", "bytes_stored",
            "bytes_written", "bytes_skipped", "codec_ratio", "world_size", "throughput_mb_s")


def _sound(rec: dict[str, Any]) -> bool:
    """Whether ``rec`` has the kinds of values pyckpt writes: the file lies in the checkpoint directory,
    and a string where a time goes crashed `pyckpt stats`, an infinite one printed 300 digits."""
    step = rec.get("step")
    if not isinstance(rec.get("event"), str) or ("ok" in rec and not isinstance(rec["ok"], bool)):
        return False
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        return False
    return all(rec.get(key) is None or is_figure(rec[key]) for key in _FIGURES)


def is_figure(v: Any, below: float = 2**63) -> bool:
    """A number pyckpt writes in its records: not a bool, 0 <= v < ``below`` (NaN and inf are not)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0 <= v < below


def read(root: str) -> tuple[list[dict[str, Any]], int]:
    """The records of ``root/metrics.jsonl`` in file order, and the number of unreadable lines.

    Raises OSError when the file cannot be opened or is not a regular file (``safe_fs.open_regular``).
    A line is read up to ``_MAX_LINE`` bytes; the rest of a longer one is skipped in pieces."""
    out, bad = [], 0
    try:
        fd = safe_fs.open_regular(os.path.join(root, METRICS_FILE))
    except FileNotFoundError:
        return out, bad
    with os.fdopen(fd, "rb") as f:
        while raw := f.readline(_MAX_LINE + 1):
            if len(raw) > _MAX_LINE:  # not one of ours: the rest of it skipped without holding it
                while not raw.endswith(b"\n") and (raw := f.readline(1 << 16)):
                    pass
                bad += 1
                continue
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict) or not _sound(rec):
                    raise ValueError("not a record pyckpt writes")
                out.append(rec)
            except (ValueError, UnicodeDecodeError):
                bad += 1  # e.g. a line cut by a crash or a disk-full
    return out, bad


def mark_finished(root: str, step: int | None = None, **info: Any) -> str:
    """Record that the run writing to ``root`` finished normally (``root/FINISHED.json``).

    A relaunch of the same command can then say so instead of silently
    training its tail again (``catalog.is_finished``). Atomic and durable.
    ``root`` may be an object-storage URL (one PUT, atomic there)."""
    from .commit import write_atomic

    body = {"finished": True, "step": step, "time": round(time.time(), 3), **info}
    data = (json.dumps(body, default=str) + "\n").encode()
    if _is_url(root):
        from .remote import reader_root

        reader_root(root).write_small(FINISHED_FILE, data)
        return f"{root.rstrip('/')}/{FINISHED_FILE}"
    path = os.path.join(root, FINISHED_FILE)
    write_atomic(path, data)
    return path


def _is_url(root: Any) -> bool:
    from .remote import is_url

    return is_url(root)


def clear_finished(root: str) -> bool:
    """Remove the finished marker (a new run starts in ``root``); True when there was one."""
    if _is_url(root):
        from .remote import reader_root

        return reader_root(root).delete(FINISHED_FILE)
    try:
        os.unlink(os.path.join(root, FINISHED_FILE))
        return True
    except FileNotFoundError:
        return False


# -- pyckpt stats -------------------------------------------------------------------------
def _dist(values: list[float]) -> dict[str, float] | None:
    vals = sorted(v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool))
    if not vals:
        return None
    return {"mean": sum(vals) / len(vals), "p50": vals[len(vals) // 2],
            "p90": vals[min(len(vals) - 1, int(len(vals) * 0.9))], "max": vals[-1]}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary of metrics records: counts, distributions of the timings, bytes, the last restore."""
    saves = [r for r in records if r.get("event") == "save"]
    ok = [r for r in saves if r.get("ok")]
    restores = [r for r in records if r.get("event") == "restore"]
    out: dict[str, Any] = {
        "saves": len(saves), "committed": len(ok), "failed": len(saves) - len(ok),
        "restores": len(restores),
        "errors": [{"step": r.get("step"), "error": r.get("error")} for r in saves if not r.get("ok")][-5:],
    }
    for key in ("stall_s", "save_call_s", "capture_s", "durable_s", "throughput_mb_s", "codec_ratio"):
        out[key] = _dist([r.get(key) for r in ok])
    out["restore_s"] = _dist([r.get("restore_s") for r in restores])
    out["bytes_written_total"] = sum(r.get("bytes_written") or 0 for r in ok)
    out["bytes_written_last"] = ok[-1].get("bytes_written") if ok else None
    out["bytes_raw_last"] = ok[-1].get("bytes_raw") if ok else None
    return out


def _bar(value: float | None, scale: float, width: int) -> str:
    """A left-aligned bar of eighth-blocks, ``width`` cells for ``scale``."""
    if value is None or scale <= 0:
        return " " * width
    eighths = int(round(max(0.0, min(value / scale, 1.0)) * width * 8))
    full, rest = divmod(eighths, 8)
    return ("█" * full + ("▏▎▍▌▋▊▉"[rest - 1] if rest else "")).ljust(width)


def plot(records: list[dict[str, Any]], rows: int = 30, width: int = 24) -> str:
    """Text plot of stall and durable time per save over time (the last ``rows`` saves)."""
    saves = [r for r in records if r.get("event") == "save"][-rows:]
    if not saves:
        return ""
    stall_max = max((r.get("stall_s") or 0) for r in saves)
    dur_max = max((r.get("durable_s") or 0) for r in saves)
    lines = [f"{'step':>10}  {'stall s':<{width + 9}}  durable s"]
    for r in saves:
        stall, dur = r.get("stall_s"), r.get("durable_s")
        lines.append(f"{r.get('step', '?'):>10}  {_bar(stall, stall_max, width)} {_num(stall):>8}  "
                     + (f"{_bar(dur, dur_max, width)} {_num(dur):>8}" if r.get("ok") else
                        f"FAILED: {str(r.get('error'))[:60]}"))
    return "\n".join(lines)


def _num(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{v:.3f}"
