"""The ``pyckpt`` command (also ``python -m pyckpt``): look at, check, convert and tidy checkpoints.

    pyckpt ls DIR                 list the checkpoints in a root (or one checkpoint)
    pyckpt verify PATH            re-read every chunk and check every checksum
    pyckpt inspect PATH           the tree of saved state: keys, dtypes, shapes, bytes, ranks
    pyckpt export PATH --to F OUT write a torch.save or safetensors file
    pyckpt import FILE OUT        make a checkpoint from a torch.save or safetensors file
    pyckpt diff A B               which tensors differ, and by how much
    pyckpt gc DIR                 remove leftovers of interrupted saves and deletions
    pyckpt stats DIR              summarise DIR/metrics.jsonl

Exit status: 0 success, 1 the checkpoint is damaged / the operation failed
(``diff``: the states differ), 2 usage errors and paths that do not exist.
Each verb is a function registered in ``_VERBS`` with its help text.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from . import __version__, layout
from .errors import CheckpointNotFoundError, PyckptError

NOT_FOUND, FAILED = 2, 1
USAGE = 2


def _human(n: float) -> str:
    from .inspection import human

    return human(n)


def _err(verb: str, msg: str) -> None:
    print(f"pyckpt {verb}: {msg}", file=sys.stderr)


def _int_in(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse type for an integer from ``least`` to ``most``: anything else is a usage error
    (exit 2) before the verb reads or writes anything."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least or (most is not None and value > most):
            bound = f"from {least} to {most}" if most is not None else f"{least} or more"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {bound}")
        return value

    return parse


def _print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=1, default=str, allow_nan=True)
    sys.stdout.write("\n")


def _progress_for(args: argparse.Namespace) -> Callable[..., Iterable]:
    """A wrapper that shows a tqdm bar on stderr for work lasting over ``--progress-delay`` s.

    Shown only when stderr is a terminal (``--progress auto``), so logs and
    pipes never get bar characters; without tqdm there is simply no bar."""
    mode = getattr(args, "progress", "auto")
    delay = getattr(args, "progress_delay", 2.0)

    def wrap(it: Iterable, desc: str = "", unit: str = "it", total: int | None = None) -> Iterable:
        if mode == "never" or (mode == "auto" and not sys.stderr.isatty()):
            return it
        try:
            from tqdm import tqdm
        except ImportError:
            if mode == "always":
                _err(args.verb, "no progress bar: pip install tqdm (or pip install 'pyckpt[cli]')")
            return it
        return tqdm(it, desc=desc, unit=unit, total=total, delay=delay, file=sys.stderr, leave=False,
                    dynamic_ncols=True)

    return wrap


def _byte_bar(args: argparse.Namespace, total: int | None, desc: str) -> Any:
    """A tqdm bar counting ``total`` bytes, under the same rules as ``_progress_for``; None when not shown."""
    mode = getattr(args, "progress", "auto")
    if mode == "never" or (mode == "auto" and not sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # Updated once per slice / download batch (tens of MiB), so every update may redraw.
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, mininterval=0,
                delay=getattr(args, "progress_delay", 2.0), file=sys.stderr, leave=False, dynamic_ncols=True)


_VERIFY_SLICE_BYTES = 64 << 20  # bar updates about this often; verify_chunks batches within a slice


def _verify_with_bar(args: argparse.Namespace, path: str) -> Any:
    """``reader.verify`` of ``path`` with a byte progress bar: the chunks are checked in slices of about
    64 MiB through ``verify_chunks``; a damaged slice is re-checked as its whole part, so the error names
    the chunk by its index in the part, exactly as ``reader.verify`` does."""
    from ._native import get_engine
    from .errors import CorruptCheckpointError
    from .reader import Opened, open_checkpoint, verify_chunks

    engine = get_engine()
    op = open_checkpoint(path)
    slices: list[tuple[int, int, int, int]] = []  # (part, first chunk, end chunk, raw bytes)
    for pi, part in enumerate(op.parts):
        first, size = 0, 0
        for ci, ch in enumerate(part["chunks"]):
            size += ch["raw_len"]
            if size >= _VERIFY_SLICE_BYTES or ci == len(part["chunks"]) - 1:
                slices.append((pi, first, ci + 1, size))
                first, size = ci + 1, 0
    bar = _byte_bar(args, sum(s[3] for s in slices), "verify")
    try:
        for pi, a, b, nbytes in slices:
            view = Opened(op.path, op.manifest, [dict(p, chunks=p["chunks"][a:b]) if i == pi else dict(p, chunks=[])
                                                 for i, p in enumerate(op.parts)])
            try:
                verify_chunks(engine, view, [pi])
            except CorruptCheckpointError:
                verify_chunks(engine, op, [pi])  # raises with the chunk's own index
                raise
            if bar is not None:
                bar.update(nbytes)
    finally:
        if bar is not None:
            bar.close()
    return op


def _time(t: float) -> str:
    if t != t:  # NaN: vanished while listing
        return "?".ljust(19)
    return f"{datetime.datetime.fromtimestamp(t, datetime.timezone.utc):%Y-%m-%d %H:%M:%S}"


def _resolve_or_err(args: argparse.Namespace) -> str | None:
    """The newest committed checkpoint ``args.path`` names, or None after saying why there is none.

    An object-storage URL (``s3://bucket/run`` or ``.../step-N``) is downloaded first (pyckpt/remote.py);
    the local copy is then read and checked like any checkpoint."""
    from .api import resolve

    try:
        return _local(args.path, args) if _is_url(args.path) else resolve(args.path, newest_committed=True)
    except CheckpointNotFoundError as e:
        _err(args.verb, f"{e}{_retired_hint(args.path)}")
        return None


def _is_url(path: str) -> bool:
    from .remote import is_url

    return is_url(path)


def _local(path: str, args: argparse.Namespace) -> str:
    """``path`` itself, or for a URL the local copy of the checkpoint it names, downloaded with a byte
    progress bar (raises PyckptError)."""
    if not _is_url(path):
        return path
    from .remote import resolve_local

    bar = _byte_bar(args, None, "download")
    try:
        return resolve_local(path, progress=bar.update if bar is not None else None)
    except (OSError, ValueError) as e:  # network, credentials: not a damaged checkpoint
        raise PyckptError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    finally:
        if bar is not None:
            bar.close()


# -- ls ---------------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> int:
    from . import catalog

    root = args.dir
    if _is_url(root):
        try:
            infos = catalog.list(root, verify=args.verify)
        except (PyckptError, OSError, ValueError) as e:
            _err("ls", f"cannot list {root}: {e}")
            return FAILED
    elif not os.path.isdir(root):
        _err("ls", f"{root} is not a directory")
        return NOT_FOUND
    else:
        found = catalog.entries(root)
        refs = catalog.referrers(found, committed=True)
        infos = [catalog.info_of(e, verify=args.verify, refs=refs)
                 for e in _progress_for(args)(found, "verify", "ckpt")]
    tier = None if _is_url(root) else _tier_copy(root)
    if args.json:
        _print_json({"dir": root if _is_url(root) else os.path.abspath(root), "finished": catalog.is_finished(root),
                     "checkpoints": [i.to_dict() for i in infos],
                     "memory_tier": None if tier is None else {"path": tier[0], "step": tier[1]}})
        return 0
    if not infos:
        print(f"no checkpoints in {root}")
        if tier is not None:  # a crashed run's only snapshots (PYCKPT_STORAGE_EVERY): say they exist
            print(_tier_line(root, tier, infos))
        _print_finished(root)  # a relaunch would stop at once: say why, even with nothing to list
        return 0
    print(f"{'STEP':>12}  {'TIME (UTC)':<19}  {'SIZE':>10}  {'STATUS':<10}  NAME")
    for i in infos:
        step = "?" if i.step is None else str(i.step)
        # A retired directory has no manifest either, but "incomplete" means "safe to delete": it is not.
        status = ("referenced" if i.retired else "incomplete") if not i.complete else (
            "complete" if i.sound is None else "sound" if i.sound else "DAMAGED")
        note = f"  (data referenced by {', '.join(i.referenced_by)})" if i.retired else \
            f"  (its data is also read by {', '.join(i.referenced_by)})" if i.complete and i.referenced_by else ""
        print(f"{step:>12}  {_time(i.time)}  {_human(i.size):>10}  {status:<10}  {i.name}{note}")
    if tier is not None:
        print(_tier_line(root, tier, infos))
    for i in infos:
        if i.complete and i.sound is False:
            _err("ls", f"{i.name} is damaged: {i.error}")
    if any(i.retired for i in infos):
        print(_RETIRED_NOTE, file=sys.stderr)
    if not args.verify and any(i.complete for i in infos):
        # "complete" only means committed: say that the data was not read, so nobody mistakes it for sound.
        print("pyckpt ls: complete = committed (manifest present); data not read: `pyckpt ls --verify` checks "
              "every checksum", file=sys.stderr)
    _print_finished(root)
    return FAILED if any(i.complete and i.sound is False for i in infos) else 0


def _print_finished(root: str) -> None:
    """The finished-run marker's line, when the run that wrote ``root`` finished normally."""
    from . import catalog

    marker = catalog.is_finished(root)
    if marker is not None:
        at = ("at step ?" if "step" not in marker else "with no checkpoint" if marker["step"] is None
              else f"at step {marker['step']}")
        when = f"{_time(marker['time'])} UTC" if marker.get("time") is not None else "time unknown"
        print(f"run finished {at} ({when})")


_RETIRED_NOTE = ("pyckpt ls: referenced = retired by retention (no MANIFEST.json, not loadable), but the "
                 "checkpoints named read chunks from its data files: do not delete it; it is removed by the "
                 "next save or `pyckpt gc` once no committed checkpoint references it")


def _tier_copy(root: str) -> tuple[str, int] | None:
    """The memory-tier copy of ``root`` on this machine, if any (shm_tier.held_copy)."""
    try:
        from .shm_tier import held_copy
        return held_copy(root)
    except (OSError, ImportError):
        return None


def _tier_line(root: str, tier: tuple[str, int], infos: list) -> str:
    newest = max((i.step for i in infos if i.complete and i.step is not None), default=None)
    if newest is None or tier[1] > newest:
        return (f"memory tier: {tier[0]} holds step {tier[1]}, newer than any checkpoint listed: a relaunch "
                "on this machine resumes from it (a reboot or clearing /dev/shm loses it)")
    return f"memory tier: {tier[0]} holds step {tier[1]}"


def _retired_hint(path: str) -> str:
    """`` (...)`` naming the checkpoints that reference ``path`` when it is a retired directory, else ""."""
    from . import catalog

    try:
        by = catalog.referrers(catalog.entries(path)).get(os.path.basename(os.path.abspath(path)))
    except OSError:
        return ""
    return f" ({path} is a retired checkpoint: its data files are kept because {', '.join(by)} reference them)" \
        if by else ""


# -- verify -----------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    try:
        path = _resolve_or_err(args)  # a URL is downloaded here; what it holds is checked then and below
        if path is None:
            return NOT_FOUND
        op = _verify_with_bar(args, path)
    except PyckptError as e:
        path = args.path if _is_url(args.path) else path
        where = getattr(e, "path", None)
        chunk = getattr(e, "chunk", None)
        detail = f" (file {where}" + (f", chunk {chunk}" if chunk is not None else "") + ")" if where else ""
        if args.json:
            _print_json({"path": path, "ok": False, "error": str(e), "file": where, "chunk": chunk})
        _err("verify", f"FAILED{detail}: {e}")
        return FAILED
    nchunks = sum(len(p["chunks"]) for p in op.parts)
    if _is_url(args.path):  # name what the user gave, with the step directory that was checked
        path = args.path if layout.parse_step(args.path.rstrip("/").rsplit("/", 1)[-1]) else \
            f"{args.path.rstrip('/')}/{os.path.basename(path)}"
    if args.json:
        _print_json({"path": path, "ok": True, "step": op.step, "parts": len(op.parts), "chunks": nchunks})
    else:
        print(f"{path}: OK (step {op.step}, {len(op.parts)} rank part(s), {nchunks} chunk(s) verified)")
    return 0


# -- inspect ----------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import render, summarize, to_json

    path = _resolve_or_err(args)
    if path is None:
        return NOT_FOUND
    try:
        s = summarize(path)
    except PyckptError as e:
        _err("inspect", f"cannot read {path}: {e}")
        return FAILED
    if args.json:
        _print_json(to_json(s))
    else:
        print(render(s, max_leaves=args.max_leaves))
    return 0


# -- export / import --------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from .export import check_out, export

    try:
        check_out(args.out, args.to)  # here too: before _local, which downloads an object-storage checkpoint
    except ValueError as e:
        _err("export", str(e))
        return USAGE
    try:
        done = export(_local(args.path, args), args.to, args.out, rank=args.rank, progress=_progress_for(args))
    except CheckpointNotFoundError as e:
        _err("export", str(e))
        return NOT_FOUND
    except (PyckptError, OSError) as e:
        _err("export", str(e))
        return FAILED
    if args.json:
        _print_json({"files": done.files, "tensors": done.tensors, "step": done.step, "format": args.to,
                     "numpy_keys": done.numpy_keys})
    else:
        extra = f" + JSON sidecar {done.files[1]}" if len(done.files) > 1 else ""
        print(f"exported step {done.step} ({done.tensors} tensor(s)) to {done.files[0]}{extra}")
    if done.numpy_keys:  # the file is the state as saved, but torch.load's default refuses NumPy values
        print(f"pyckpt: {done.files[0]} holds {len(done.numpy_keys)} NumPy value(s) ({done.numpy_keys[0]!r}"
              f"{', ...' if len(done.numpy_keys) > 1 else ''}), which torch.load(weights_only=True) refuses: "
              "load it with weights_only=False, or export with --to safetensors (which keeps them, no pickle)",
              file=sys.stderr)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .export import import_file

    if not os.path.isfile(args.file):
        _err("import", f"{args.file} is not a file")
        return NOT_FOUND
    try:
        path = import_file(args.file, args.out, step=args.step, compress=args.compress)
    except (PyckptError, OSError) as e:
        _err("import", str(e))
        return FAILED
    if args.json:
        _print_json({"path": path, "source": os.path.abspath(args.file)})
    else:
        print(f"imported {args.file} into {path}")
    return 0


# -- diff -------------------------------------------------------------------------------
def cmd_diff(args: argparse.Namespace) -> int:
    from .export import load_state
    from .inspection import diff_states

    try:
        a, step_a = load_state(_local(args.a, args), args.rank)
        b, step_b = load_state(_local(args.b, args), args.rank)
    except CheckpointNotFoundError as e:
        _err("diff", str(e))
        return NOT_FOUND
    except PyckptError as e:
        _err("diff", str(e))
        return NOT_FOUND if "no rank_state" in str(e) else FAILED
    d = diff_states(a, b, _progress_for(args))
    if args.json:
        _print_json({"a": os.path.abspath(args.a), "b": os.path.abspath(args.b), "step_a": step_a,
                     "step_b": step_b, **d})
        return 0 if d["identical"] else FAILED
    print(f"a: {args.a} (step {step_a})\nb: {args.b} (step {step_b})")
    for c in d["changed"]:
        if c["why"]:
            print(f"changed    {c['key']}: {c['why']}")
        else:
            mad = c["max_abs_diff"]
            mad_s = "n/a" if mad is None else (f"{mad:.6g}" if isinstance(mad, float) else str(mad))
            print(f"changed    {c['key']}  {c['dtype']} {c['shape']}  {c['differing']} of {c['numel']} "
                  f"element(s) differ, max |a-b| = {mad_s}")
    for v in d["values_changed"]:
        print(f"changed    {v['key']}: {v['a']!r} -> {v['b']!r}")
    for k in d["only_in_a"]:
        print(f"only in a  {k}")
    for k in d["only_in_b"]:
        print(f"only in b  {k}")
    nchanged = len(d["changed"]) + len(d["values_changed"])
    print(f"{'identical' if d['identical'] else 'different'}: {nchanged} changed, {len(d['only_in_a'])} only "
          f"in a, {len(d['only_in_b'])} only in b, {d['same']} unchanged")
    return 0 if d["identical"] else FAILED


# -- gc ---------------------------------------------------------------------------------
def cmd_gc(args: argparse.Namespace) -> int:
    from . import catalog, commit

    root = args.dir
    if _is_url(root):
        _err("gc", f"{root}: object-storage roots hold no leftovers to collect here: the next upload deletes "
                   "interrupted ones (docs/OPERATIONS.md \"Object storage\")")
        return NOT_FOUND
    if not os.path.isdir(root):
        _err("gc", f"{root} is not a directory")
        return NOT_FOUND
    held, note = _try_lock(root)
    try:
        # With the lock, gc_tmp also removes step directories without MANIFEST.json (half-deleted
        # ones, retired ones no checkpoint references any more) and keeps retired ones whose data
        # a committed checkpoint still references (incremental chunks, docs/FORMAT.md §14).
        removed = commit.gc_tmp(root, set(), locked=held is not None)
        # Say what was kept on purpose: it has no manifest, so it looks like a leftover to be deleted by hand.
        kept = catalog.referrers(layout.scan(root))
    finally:
        if held is not None:
            held.release()
    if args.json:
        _print_json({"dir": os.path.abspath(root), "removed": removed, "locked": held is not None, "note": note,
                     "kept_referenced": {name: list(by) for name, by in sorted(kept.items())}})
        return 0
    if note:
        _err("gc", note)
    for p in removed:
        print(f"removed {p}")
    for name, by in sorted(kept.items()):
        print(f"kept {os.path.join(root, name)}: retired, but its data files are referenced by {', '.join(by)}")
    print(f"{len(removed)} leftover(s) removed from {root}")
    return 0


def _try_lock(root: str) -> tuple[Any, str | None]:
    """The directory lock when no writer holds it (then every leftover is garbage), else (None, why)."""
    try:
        from .lock import DirLock
    except ImportError:
        return None, None
    from .lock import holder, pids_comparable

    try:
        return DirLock(root), None
    except PyckptError as e:
        if not pids_comparable(holder(root)):
            return None, (f"{e}; that holder runs in another PID namespace or machine (or did not say where), "
                          "so no pid here proves a leftover's writer gone: nothing is removed (the job collects "
                          "leftovers itself at its next save)")
        return None, (f"{e}; only leftovers of writers that are no longer running are removed")


# -- stats ------------------------------------------------------------------------------
def cmd_stats(args: argparse.Namespace) -> int:
    from . import metrics

    root = args.dir
    if _is_url(root):
        from .remote import staging_dir

        _err("stats", f"{root}: the metrics of an object-storage root stay in the writer's local staging "
                      f"directory: pyckpt stats {staging_dir(root)}")
        return NOT_FOUND
    if not os.path.isdir(root):
        _err("stats", f"{root} is not a directory")
        return NOT_FOUND
    try:
        records, bad = metrics.read(root)
    except OSError as e:
        _err("stats", f"cannot read {os.path.join(root, metrics.METRICS_FILE)}: {e.strerror or e}")
        return 1
    if not records:
        what = f"{bad} unreadable line(s) and no record" if bad else "no metrics"
        _err("stats", f"{what} in {os.path.join(root, metrics.METRICS_FILE)} (written by Checkpointer "
                      "saves and transparent mode)")
        return NOT_FOUND
    s = metrics.summarize(records)
    if args.json:
        _print_json({"dir": os.path.abspath(root), "unreadable_lines": bad, **s})
        return 0
    print(f"{os.path.join(root, metrics.METRICS_FILE)}: {s['saves']} save(s) ({s['committed']} committed, "
          f"{s['failed']} failed), {s['restores']} restore(s)" + (f", {bad} unreadable line(s)" if bad else ""))
    print(f"{'':14}{'mean':>10}{'p50':>10}{'p90':>10}{'max':>10}")
    for key, label in (("stall_s", "stall s"), ("capture_s", "capture s"), ("durable_s", "durable s"),
                       ("throughput_mb_s", "MB/s"), ("codec_ratio", "codec ratio"), ("restore_s", "restore s")):
        d = s[key]
        if d is not None:
            print(f"{label:<14}" + "".join(f"{d[q]:>10.3f}" for q in ("mean", "p50", "p90", "max")))
    if s["bytes_written_last"] is not None:
        print(f"written: {_human(s['bytes_written_total'])} in all, {_human(s['bytes_written_last'])} by the last "
              f"save ({_human(s['bytes_raw_last'] or 0)} of state)")
    for e in s["errors"]:
        print(f"failed at step {e['step']}: {e['error']}")
    graph = metrics.plot(records, rows=args.rows)
    if graph:
        print(graph)
    return 0


# -- the parser -------------------------------------------------------------------------
def _add_ls(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("dir", metavar="DIR", help="a checkpoint root (the Checkpointer / PYCKPT_DIR directory) or "
                                               "one checkpoint directory")
    sp.add_argument("--verify", action="store_true",
                    help="also re-read every chunk and check its checksum (status sound / DAMAGED; exit 1 if any "
                         "is damaged)")


def _add_path(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("path", metavar="PATH", help="a checkpoint directory, or a root (then its newest committed "
                                                 "checkpoint)")


def _add_inspect(sp: argparse.ArgumentParser) -> None:
    _add_path(sp)
    sp.add_argument("--max-leaves", type=_int_in(0), default=2000, metavar="N",
                    help="print at most N leaves in the text tree (default 2000; --json lists all)")


def _add_export(sp: argparse.ArgumentParser) -> None:
    _add_path(sp)
    sp.add_argument("--to", required=True, choices=("torch", "safetensors"), help="output format")
    sp.add_argument("out", metavar="OUT", help="the file to write (replaced atomically if it exists)")
    sp.add_argument("--rank", type=_int_in(0), default=None, metavar="R",
                    help="export rank R's per-rank state (rank_state) instead of the replicated state")


def _add_import(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("file", metavar="FILE", help="a torch.save file (read with weights_only=True) or a "
                                                 "safetensors file (its FILE.pyckpt.json sidecar is applied)")
    sp.add_argument("out", metavar="OUT", help="the checkpoint directory to create (with --step: a checkpoint "
                                               "root that gets step-N and latest)")
    sp.add_argument("--step", type=_int_in(0, layout.MAX_STEP), default=None, metavar="N",
                    help="save as step N of the root OUT (0 to 2**63-1)")
    sp.add_argument("--compress", choices=("none", "zstd"), default="none", help="chunk codec (default none)")


def _add_diff(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("a", metavar="A", help="a checkpoint directory or root")
    sp.add_argument("b", metavar="B", help="a checkpoint directory or root")
    sp.add_argument("--rank", type=_int_in(0), default=None, metavar="R",
                    help="compare rank R's per-rank state instead of the replicated state")


def _add_dir(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("dir", metavar="DIR", help="a checkpoint root")


def _add_stats(sp: argparse.ArgumentParser) -> None:
    _add_dir(sp)
    sp.add_argument("--rows", type=_int_in(1), default=30, metavar="N", help="plot the last N saves (default 30)")


_VERBS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], str, str]] = {
    "ls": (cmd_ls, _add_ls, "list checkpoints in a root directory",
           "List every checkpoint directory in DIR with its step, commit time, size on disk and whether it\n"
           "is complete (has MANIFEST.json) or incomplete (an interrupted or in-progress save). A directory\n"
           "that is referenced was retired by retention but newer checkpoints (named on its row) read its\n"
           "data files: never delete it by hand. A complete checkpoint whose row names newer ones holds\n"
           "chunks they read (unchanged memory is written once): deleting it by hand breaks them too.\n"
           "DIR may also be a single checkpoint directory. --verify\n"
           "checks every checksum (a full read)."),
    "verify": (cmd_verify, _add_path, "check a checkpoint's integrity (every chunk, every checksum)",
               "Validate the manifest and rank parts of PATH and re-read every data chunk, checking its\n"
               "CRC32C. PATH is a checkpoint directory or a root (then its newest committed checkpoint).\n"
               "Exit status 0 when sound, 1 when damaged (the file and chunk are named), 2 when PATH does\n"
               "not exist or holds no committed checkpoint."),
    "inspect": (cmd_inspect, _add_inspect, "show the tree of saved state (keys, dtypes, shapes, bytes, ranks)",
                "Print what PATH holds without reading tensor data: step, world size, writer, bytes raw and\n"
                "stored (codec ratio), and for the replicated state and each rank's rank_state every key\n"
                "path with its dtype, shape, bytes, codec ratio, the rank whose part holds it and the device\n"
                "it was saved from; other values (loop position, RNG, settings) with their value."),
    "export": (cmd_export, _add_export, "write a checkpoint as a torch.save or safetensors file",
               "Load PATH onto the CPU and write it to OUT.\n"
               "  --to torch        torch.save of the state; torch.load(OUT, weights_only=True) reads it.\n"
               "  --to safetensors  one tensor per leaf named by key path (model/fc.weight); what safetensors\n"
               "                    cannot hold (non-tensor values, nesting, other dtypes) goes to the JSON\n"
               "                    sidecar OUT.pyckpt.json, which `pyckpt import` applies.\n"
               "Needs the safetensors package for --to safetensors (pip install safetensors)."),
    "import": (cmd_import, _add_import, "make a checkpoint from a torch.save or safetensors file",
               "Read FILE and save it as a pyckpt checkpoint at OUT. torch files are read with\n"
               "torch.load(weights_only=True): a file holding other objects is refused (exit 1), because\n"
               "unpickling them would run code from the file. safetensors files need the safetensors package."),
    "diff": (cmd_diff, _add_diff, "compare two checkpoints tensor by tensor",
             "Load A and B onto the CPU and list the tensors that changed (elements differing, max |a-b|),\n"
             "other values that changed, and keys present in only one of them. Bitwise: NaN equals the\n"
             "same NaN. Exit status 0 when identical, 1 when different, 2 when A or B does not exist."),
    "gc": (cmd_gc, _add_dir, "remove leftovers of interrupted saves and deletions",
           "Remove what crashed or killed writers left in DIR: step-*.tmp-* directories (interrupted saves),\n"
           "step-*.del-* (interrupted deletions), latest.tmp-* and MANIFEST.json.tmp-* files. When no job\n"
           "holds DIR's lock, step directories without MANIFEST.json (half deleted) go too, except retired\n"
           "ones whose data files a committed checkpoint still references (listed as kept); while a job\n"
           "runs, only leftovers of processes that are no longer running are removed, and none when the\n"
           "job runs in another PID namespace or on another machine. Committed checkpoints are never touched."),
    "stats": (cmd_stats, _add_stats, "summarise DIR/metrics.jsonl (stall, duration, bytes, throughput)",
              "Read the per-checkpoint metrics lines of DIR/metrics.jsonl and print the number of saves,\n"
              "failures and restores, mean/p50/p90/max of stall, capture and durable time, throughput,\n"
              "codec ratio, bytes written, and a text plot of stall and durable time of the last saves."),
}

_JSON_VERBS = ("ls", "verify", "inspect", "export", "import", "diff", "gc", "stats")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyckpt", description="Look at, check, convert and tidy pyckpt checkpoints.",
                                epilog="Exit status: 0 success, 1 damaged / failed / different, 2 usage error or "
                                       "path not found. `pyckpt VERB --help` describes each verb.")
    p.add_argument("--version", action="version", version=f"pyckpt {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, (fn, add, short, long) in _VERBS.items():
        sp = sub.add_parser(name, help=short, description=long, formatter_class=argparse.RawDescriptionHelpFormatter)
        add(sp)
        if name in _JSON_VERBS:
            sp.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of text")
        sp.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                        help="progress bar on stderr for work over 2 s: auto = only when stderr is a terminal")
        sp.add_argument("--progress-delay", type=float, default=2.0, help=argparse.SUPPRESS)
        sp.set_defaults(func=fn)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _err(args.verb, "interrupted")
        return 130
    except BrokenPipeError:  # `pyckpt inspect ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
