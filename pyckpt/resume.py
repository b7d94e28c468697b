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
older sound one is used. When checkpoints were committed but none is sound,
the resume stops with an error (``CorruptCheckpointError``) instead of
training from scratch; with no committed checkpoint at all it starts over.

A checkpoint written by another number of ranks (N) resumes on this job's M
ranks when its state is replicated (DDP or one process) or FSDP2-sharded
(DTensors, re-cut at load by ``sharded``): every rank reads the replicated
tree; new rank r takes the per-rank part (RNG streams, module
buffers, registered objects, loader position) of saved rank ``r % N``, so the
RNG streams of saved ranks M..N-1 are dropped (one line says so); the
interrupted epoch's rest is re-split by global sample count
(``reshard_data``); FSDP2 shards are re-cut at load and ZeRO-1 state is re-split
(``sharded``). Per-rank state of other kinds, loaders other than
DistributedSampler + BatchSampler, and checkpoints without a DataLoader
position are refused with one line naming both sizes, on every rank.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from . import layout, manifest, reader, reshard_data
from .activation import _say as say
from .checkpointer import Checkpointer, Restored, info_for
from .coord import Coordinator
from .errors import CheckpointNotFoundError, CorruptCheckpointError, PyckptError


@dataclass
class Source:
    """The checkpoint to resume from and this rank's per-rank state in it."""

    checkpointer: Checkpointer
    path: str
    step: int
    rank_state: Any
    src_rank: int = -1  # the saved rank whose per-rank part this rank takes (-1: its own)

    def restore(self, into: Any) -> Restored:
        """Read the whole checkpoint; module tensors land in ``into`` in place."""
        if self.src_rank < 0:  # this rank's own section was read by choose(): not read twice
            return self.checkpointer._restore_path(self.path, into, None, "cpu", self.rank_state)
        from . import metrics
        from ._native import get_engine

        t0 = time.monotonic()
        op = reader.open_checkpoint(self.path)
        state = reader.load_section(get_engine(), op, "replicated", 0, into, "cpu")
        rs = self.rank_state  # saved rank src_rank's, read by choose() (without its loop state)
        if self.checkpointer.coord.rank == 0:
            metrics.restore_done(self.checkpointer.directory, op.step, self.path, time.monotonic() - t0)
        return Restored(state, rs, op.step, self.path)


def choose(ckpt: Checkpointer, coord: Coordinator, setting: str) -> Source | None:
    """The checkpoint named by PYCKPT_RESUME (``auto``: the newest sound commit all ranks see; ``never``: none).

    ``auto`` returns None only when no rank sees a committed checkpoint; when some exist but none is
    sound it raises ``CorruptCheckpointError`` on every rank, naming them."""
    if setting != "auto" and (own := _own_launch(ckpt, coord, setting)) is not None:
        return own
    if setting != "auto" and coord.rank == 0 and ckpt.remote is None:
        from . import shm_tier
        shm_tier.discard(ckpt.directory)  # the run this one forks from: an auto relaunch must not take it
    if setting == "never":
        ckpt._start_over()
        return None
    with reader.reusing():  # verifying, then reading the rank state, opens the chosen checkpoint twice
        return _choose(ckpt, coord, setting)


def launch_id() -> str | None:
    """This launch of the job, the same in every restart of its workers (recorded in each transparent
    snapshot's ``rank_state["pyckpt"]["launch"]``): ``PYCKPT_LAUNCH_ID``, which pyckpt-run sets anew at
    each invocation; else torchrun's run id; None in a process no launcher started."""
    from . import knobs

    if (given := knobs.get("PYCKPT_LAUNCH_ID")):
        return given
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return f"torchrun:{run_id}" if run_id else None


def _own_launch(ckpt: Checkpointer, coord: Coordinator, setting: str) -> Source | None:
    """With PYCKPT_RESUME ``never`` or a directory: the newest checkpoint when this launch wrote it,
    else None (the setting applies). The elastic agent restarts failed workers with the environment
    they started with, so without this every restart trained from scratch again (or went back to
    the directory), dropping what the launch had trained and checkpointed since.

    A launch is told apart by ``launch_id``: under pyckpt-run any start may be a restart (its id is
    new at each invocation); under plain torchrun only a counted restart is one, because a multi-node
    job's ``--rdzv-id`` is its run id and repeats from one launch to the next. Agreed by every rank: a
    node that restarted its workers for a membership change counts no restart, and a replacement
    node has a new pyckpt-run id."""
    from . import knobs

    mine = launch_id()
    maybe = mine is not None and (knobs.get("PYCKPT_LAUNCH_ID") is not None
                                  or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"))
    if coord.world_size > 1:
        maybe = any(coord.all_gather_json(maybe, "resume/restart"))
    if not maybe:
        return None
    # Cheap first (no chunk read): the newest commit's launch, and the memory tier's newest copy's.
    own = mine is not None and mine in _newest_launches(ckpt, coord)
    if coord.world_size > 1:
        own = any(coord.all_gather_json(own, "resume/own"))
    if not own:
        return None
    try:
        with reader.reusing():
            src = _choose(ckpt, coord, "auto")
    except PyckptError:  # none of it loads (said per checkpoint): the setting decides, as at the start
        src = None
    own = src is not None and _launch_of(src.rank_state) == mine
    if coord.world_size > 1:
        own = any(coord.all_gather_json(own, "resume/own-chosen"))
    if not own:
        return None
    if coord.rank == 0:
        say(f"restart of this launch: resuming from its own newest checkpoint {src.path} "
            f"(PYCKPT_RESUME={setting} applies to the launch's first start)")
    return src


def _newest_launches(ckpt: Checkpointer, coord: Coordinator) -> set:
    """The launches recorded in this rank's part of storage's newest commit and of the memory tier's
    newest copy (unreadable ones: none)."""
    from . import commit, shm_tier

    paths = []
    if ckpt.remote is None and (name := commit.read_latest(ckpt.directory)) is not None:
        paths.append(os.path.join(ckpt.directory, name))
    tier = shm_tier.tier_for(ckpt, coord)
    if tier is not None and (name := commit.read_latest(tier.path)) is not None:
        paths.append(os.path.join(tier.path, name))
    found = set()
    for path in paths:
        try:
            if coord.rank < manifest.read_manifest(path)["world_size"]:
                found.add(_launch_of(read_rank_state(path, coord.rank)))
        except (PyckptError, OSError, KeyError, TypeError):  # damaged or foreign: not this launch's
            continue
    return found


def _launch_of(rank_state: Any) -> Any:
    meta = rank_state.get("pyckpt") if isinstance(rank_state, dict) else None
    return meta.get("launch") if isinstance(meta, dict) else None


def _choose(ckpt: Checkpointer, coord: Coordinator, setting: str) -> Source | None:
    if setting == "auto":
        from . import shm_tier  # a sound memory-tier copy at least as new as storage's: storage is not read
        if (src := shm_tier.choose(ckpt, coord)) is not None:
            return src
        info = ckpt.latest(verify=True)
        if info is None:
            # A memory-tier copy refused as damaged counts too (every rank knows it: the refusal is agreed).
            unsound = committed_anywhere(ckpt, coord) + shm_tier.refused(ckpt)
            if unsound:  # committed progress exists but none of it loads: never start over silently
                raise CorruptCheckpointError(all_damaged_message(unsound), path=unsound[0])
            return None
        path = info.path
    else:
        path = os.path.abspath(setting)
        if not layout.is_checkpoint_dir(path):
            raise CheckpointNotFoundError(f"PYCKPT_RESUME={setting!r} is not a complete pyckpt checkpoint "
                                          "directory (one holding MANIFEST.json)")
    return source_for(ckpt, path, coord)


def source_for(ckpt: Checkpointer, path: str, coord: Coordinator) -> Source:
    """The Source of chosen checkpoint ``path`` (of ``ckpt``: storage's, or the memory tier's); on
    another number of ranks checked (``check_resizable``) and said in one line."""
    saved = manifest.read_manifest(path)["world_size"]
    if saved == coord.world_size:
        return Source(ckpt, path, info_for(path).step, read_rank_state(path, coord.rank))
    src = coord.rank % saved
    rank_state = read_rank_state(path, src)
    check_resizable(path, saved, coord.world_size, rank_state)
    for pos in [rank_state["loader"], *(rank_state["loader"].get("others") or [])]:  # zipped loaders too
        pos["from_world"] = saved  # reshard_data remaps the interrupted epoch
        # The settings kept on the loader's parts (pipeline_attrs.py) may be rank-specific too (a
        # DistributedSampler subclass's rank and num_replicas): not put back either.
        pos.pop("attrs", None)
        if isinstance(pos.get("epoch_rng"), dict):
            pos["epoch_rng"].pop("attrs", None)
    # The script's own variables (loop state) are per rank and may hold rank-specific values (its
    # `rank`, a per-rank file name): taking another rank's would be wrong, so they are not restored.
    rank_state.pop("loop", None)
    rank_state.pop("script_objects", None)  # the modules and objects the loop state refers to
    if coord.rank == 0:
        say(resize_line(path, saved, coord.world_size))
    return Source(ckpt, path, info_for(path).step, rank_state, src)


def committed_anywhere(ckpt: Checkpointer, coord: Coordinator) -> list[str]:
    """The committed checkpoints (paths, or URLs on object storage) that any rank sees, newest first;
    the same list on every rank, so every rank takes the same decision from it."""
    if ckpt.remote is not None:
        mine = [ckpt.remote.url_of(e.name) for e in ckpt.remote.committed()]
    else:
        mine = [e.path for e in layout.committed(ckpt.directory)]
    if coord.world_size == 1:
        return mine
    # A commit some rank cannot see is no more usable than a damaged one: the union counts.
    out: list[str] = []
    for theirs in coord.all_gather_json(mine, "resume/committed"):
        out.extend(p for p in theirs if p not in out)
    return out


def all_damaged_message(paths: list[str], shown: int = 4) -> str:
    """Why a resume stops when committed checkpoints exist but none is sound, with the ways out."""
    names = ", ".join(paths[:shown]) + (f" and {len(paths) - shown} more" if len(paths) > shown else "")
    return (f"every committed checkpoint is damaged ({names}; `pyckpt verify` names the damaged file and "
            "chunk), so there is nothing to resume and training does not start over on its own. "
            "PYCKPT_RESUME=never trains from scratch, PYCKPT_RESUME=<checkpoint dir> continues from a sound "
            "copy, or use another PYCKPT_DIR")


def check_resizable(path: str, saved: int, world_size: int, rank_state: Any) -> None:
    """Refuse a world-size change that cannot be resumed correctly (raises ``PyckptError``)."""
    from . import sharded

    meta = (rank_state or {}).get("pyckpt") or {}
    why = sharded.resize_problem(rank_state)  # FSDP2 DTensors are re-cut at load; ZeRO-1 state is re-split
    if why is not None:
        pass
    elif not meta.get("replicated", False) or "objects" in (rank_state or {}):
        why = ("its model/optimizer state is per rank or sharded (not DDP-replicated), which cannot be "
               "re-cut for another number of ranks")
    elif (rank_state or {}).get("loader") is None:
        why = "it holds no DataLoader position (a loop no DataLoader drives), so there is no data position to re-split"
    else:
        for pos in [rank_state["loader"], *(rank_state["loader"].get("others") or [])]:
            sig = list(pos.get("sig") or [])
            if reshard_data.remappable(sig):
                continue
            why = (f"its training loader uses {sig[3] if len(sig) > 3 else '?'} / {sig[4] if len(sig) > 4 else '?'}; "
                   f"only {reshard_data.SAMPLER} with a plain {reshard_data.BATCH_SAMPLER} can have its data "
                   "position re-split")
            break
    if why is not None:
        raise PyckptError(f"checkpoint {path} was written by {saved} rank(s), this job has {world_size}: {why}; "
                          "set PYCKPT_RESUME=never (or use a new PYCKPT_DIR) to start over, or use "
                          f"{saved} rank(s)")


def resize_line(path: str, saved: int, world_size: int) -> str:
    """The one line said at a resume on another number of ranks."""
    takes = ", ".join(f"{r}<-{r % saved}" for r in range(min(world_size, 8)))
    more = ", ..." if world_size > 8 else ""
    dropped = (f"; the RNG streams of saved rank(s) {world_size}..{saved - 1} are dropped" if saved > world_size
               else "")
    return (f"resuming {path} (written by {saved} rank(s)) on {world_size} rank(s): each rank takes the RNG streams "
            f"and other per-rank state of saved rank (rank % {saved}) [{takes}{more}]{dropped}; the rest of the "
            "interrupted epoch is re-split by global sample count; results are not bitwise those of an "
            f"uninterrupted {saved}-rank run (another reduction order); the script's own variables (loop state, "
            "with the modules no optimizer owns, such as an EMA copy, the model's train()/eval() flags, its "
            "layers' attributes and the settings kept on the dataset, sampler and collate_fn) are not restored: "
            "they may be rank-specific")


def read_rank_state(path: str, rank: int) -> Any:
    """Only rank ``rank``'s per-rank state of checkpoint ``path`` (small: positions, RNG)."""
    from ._native import get_engine

    op = reader.open_checkpoint(path)
    return reader.load_section(get_engine(), op, "rank", rank, None, "cpu")
