"""Which checkpoint a relaunched job resumes from, and reading it back.

Resuming has two moments. At the first ``iter()`` of any DataLoader (the
process group exists by then) every rank agrees on the checkpoint and reads
only its small per-rank part: the training loader's position, which decides
the fast-forward. The tensors are read later, at the snapshot point itself,
straight into the live parameters (``into=``), so nothing the script does
while epochs are skipped survives and no second copy of the model is held.

Because the fast-forward is decided before the tensors are read, the chosen
checkpoint's data is verified first (every chunk checksum, ranks sharing the
work): a damaged newest checkpoint is skipped with one line and the next
older sound one is used. A checkpoint written by a different number of ranks
is refused (no resharding yet) with one line naming both sizes, on every rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from . import layout, manifest, reader
from .checkpointer import Checkpointer, Restored, info_for
from .coord import Coordinator
from .errors import CheckpointNotFoundError, PyckptError


@dataclass
class Source:
    """The checkpoint to resume from and this rank's per-rank state in it."""

    checkpointer: Checkpointer
    path: str
    step: int
    rank_state: Any

    def restore(self, into: Any) -> Restored:
        """Read the whole checkpoint; module tensors land in ``into`` in place."""
        return self.checkpointer._restore_path(self.path, into, None, "cpu")


def choose(ckpt: Checkpointer, coord: Coordinator, setting: str) -> Source | None:
    """The checkpoint named by PYCKPT_RESUME (``auto``: the newest sound commit all ranks see; ``never``: none)."""
    if setting == "never":
        return None
    if setting == "auto":
        info = ckpt.latest(verify=True, check=lambda p: check_world_size(p, coord.world_size))
        if info is None:
            return None
        path = info.path
    else:
        path = os.path.abspath(setting)
        if not layout.is_checkpoint_dir(path):
            raise CheckpointNotFoundError(f"PYCKPT_RESUME={setting!r} is not a complete pyckpt checkpoint "
                                          "directory (one holding MANIFEST.json)")
        check_world_size(path, coord.world_size)
    return Source(ckpt, path, info_for(path).step, read_rank_state(path, coord.rank))


def check_world_size(path: str, world_size: int) -> None:
    """Refuse a checkpoint written by another number of ranks (the data split would differ)."""
    saved = manifest.read_manifest(path)["world_size"]
    if saved != world_size:
        raise PyckptError(f"checkpoint {path} was written by {saved} rank(s), this job has {world_size}; resuming "
                          "with a different number of ranks is not supported yet: set PYCKPT_RESUME=never (or use "
                          "a new PYCKPT_DIR) to start over, or use the same number of ranks")


def read_rank_state(path: str, rank: int) -> Any:
    """Only this rank's per-rank state of checkpoint ``path`` (small: positions, RNG)."""
    from ._native import get_engine

    op = reader.open_checkpoint(path)
    return reader.load_section(get_engine(), op, "rank", rank, None, "cpu")
