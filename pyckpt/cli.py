"""The ``pyckpt`` command: inspect and verify checkpoints.

    pyckpt ls DIR        list the checkpoints in a root (complete or not)
    pyckpt verify PATH   re-read every chunk and check every checksum

Each verb is a small function registered in ``_VERBS`` so new verbs slot in.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable, Sequence

from . import layout
from .errors import PyckptError


def _du(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_ls(args: argparse.Namespace) -> int:
    root = args.dir
    if not os.path.isdir(root):
        print(f"pyckpt ls: {root} is not a directory", file=sys.stderr)
        return 2
    entries = layout.scan(root)
    if not entries:
        print(f"no checkpoints in {root}")
        return 0
    print(f"{'STEP':>12}  {'TIME (UTC)':<19}  {'SIZE':>10}  {'STATUS':<10}  NAME")
    for e in entries:
        stamp = os.path.join(e.path, layout.MANIFEST) if e.complete else e.path
        t = datetime.datetime.fromtimestamp(os.path.getmtime(stamp), datetime.timezone.utc)
        step = "?" if e.step is None else str(e.step)
        status = "complete" if e.complete else "incomplete"
        print(f"{step:>12}  {t:%Y-%m-%d %H:%M:%S}  {_human(_du(e.path)):>10}  {status:<10}  {e.name}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ._native import get_engine
    from .api import resolve
    from .reader import verify

    try:
        path = resolve(args.path, newest_committed=True)
        op = verify(get_engine(), path)
    except PyckptError as e:
        where = getattr(e, "path", None)
        chunk = getattr(e, "chunk", None)
        detail = f" (file {where}" + (f", chunk {chunk}" if chunk is not None else "") + ")" if where else ""
        print(f"pyckpt verify: FAILED{detail}: {e}", file=sys.stderr)
        return 1
    nchunks = sum(len(p["chunks"]) for p in op.parts)
    print(f"{path}: OK (step {op.step}, {len(op.parts)} rank part(s), {nchunks} chunk(s) verified)")
    return 0


_VERBS: dict[str, tuple[Callable[[argparse.Namespace], int], str, str]] = {
    "ls": (cmd_ls, "list checkpoints in a root directory",
           "List every checkpoint directory in DIR with its step, commit time, size on disk and whether it\n"
           "is complete (has MANIFEST.json) or incomplete (an interrupted or in-progress save)."),
    "verify": (cmd_verify, "check a checkpoint's integrity (every chunk, every checksum)",
               "Validate the manifest and rank parts of PATH and re-read every data chunk, checking its\n"
               "CRC32C. PATH is a checkpoint directory or a root (then its newest committed checkpoint).\n"
               "Exit status 0 when sound, 1 when damaged (the file and chunk are named), 2 on usage errors."),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyckpt", description="Inspect and verify pyckpt checkpoints.")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, (fn, short, long) in _VERBS.items():
        sp = sub.add_parser(name, help=short, description=long, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "ls":
            sp.add_argument("dir", metavar="DIR", help="a checkpoint root (e.g. the Checkpointer directory)")
        else:
            sp.add_argument("path", metavar="PATH", help="a checkpoint directory or a checkpoint root")
        sp.set_defaults(func=fn)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
