"""Which checkpoint a relaunched job resumes from, and reading it back.

Resuming has two moments. At the first ``iter()`` of any DataLoader (the
process group exists by then) every rank agrees on the checkpoint and reads
only its small per-rank part: the training loader's position, which decides
the fast-forward. The tensors are read later, at the snapshot point itself,
straight into the live parameters (``into=``), so nothing the script does
while epochs are skipped survives and no second copy of the model is held.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from . import layout, reader
from .checkpointer import Checkpointer, Restored, info_for
from .coord import Coordinator
from .errors import CheckpointNotFoundError


@dataclass
class Source:
    """The checkpoint to resume from and this rank's per-rank state in it."""

    checkpointer: Checkpointer
    path: str
    step: int
    rank_state: Any

    def restore(self, into: Any) -> Restored:
        """Read the whole checkpoint; module tensors land in ``into`` in place."""
        return self.checkpointer.restore(self.step, into=into, map_location="cpu")


def choose(ckpt: Checkpointer, coord: Coordinator, setting: str) -> Source | None:
    """The checkpoint named by PYCKPT_RESUME (``auto``: newest complete for all ranks; ``never``: none)."""
    if setting == "never":
        return None
    if setting == "auto":
        info = ckpt.latest()
        if info is None:
            return None
        source_ckpt, path, step = ckpt, info.path, info.step
    else:
        path = os.path.abspath(setting)
        if not layout.is_checkpoint_dir(path):
            raise CheckpointNotFoundError(f"PYCKPT_RESUME={setting!r} is not a complete pyckpt checkpoint "
                                          "directory (one holding MANIFEST.json)")
        parent = os.path.dirname(path)
        source_ckpt = ckpt if parent == ckpt.directory else Checkpointer(parent, keep=ckpt.keep, coordinator=coord)
        step = info_for(path).step
    return Source(source_ckpt, path, step, read_rank_state(path, coord.rank))


def read_rank_state(path: str, rank: int) -> Any:
    """Only this rank's per-rank state of checkpoint ``path`` (small: positions, RNG)."""
    from ._native import get_engine

    op = reader.open_checkpoint(path)
    return reader.load_section(get_engine(), op, "rank", rank, None, "cpu")
