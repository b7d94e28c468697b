"""Names and places inside a checkpoint root (docs/FORMAT.md "Directory layout")."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

MANIFEST = "MANIFEST.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d{9,})$")
_TMP_RE = re.compile(r"^(step-\d{9,}|.+)\.tmp-([A-Za-z0-9_-]+)$")


def step_dir_name(step: int) -> str:
    """``step-000001200`` (9 digits, more when the step needs them)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:09d}"


def tmp_dir_name(final_name: str, token: str) -> str:
    """The in-progress name of a checkpoint directory."""
    return f"{final_name}.tmp-{token}"


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


def is_checkpoint_dir(path: str) -> bool:
    """True when ``path`` holds a committed checkpoint (its manifest exists)."""
    return os.path.isfile(os.path.join(path, MANIFEST))


@dataclass(frozen=True)
class Entry:
    """One directory found in a root: a committed-looking step or an in-progress one."""

    name: str
    path: str
    step: int | None
    complete: bool


def scan(root: str) -> list[Entry]:
    """Every ``step-*`` directory in ``root`` (committed and in progress), by step then name."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        path = os.path.join(root, name)
        step = parse_step(name)
        if step is not None and os.path.isdir(path):
            out.append(Entry(name, path, step, is_checkpoint_dir(path)))
        elif tmp_token(name) is not None and name.startswith("step-") and os.path.isdir(path):
            out.append(Entry(name, path, parse_step(name.split(".tmp-")[0]), False))
    return sorted(out, key=lambda e: (e.step if e.step is not None else -1, e.name))
