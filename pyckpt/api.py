"""``pyckpt.save`` / ``pyckpt.load``: synchronous one-shot checkpoints.

``save(state, path)`` writes the checkpoint directory ``path`` atomically:
everything goes to ``path.tmp-<token>`` first, is fsynced, and the directory
is renamed into place after its MANIFEST.json is durable (an existing
checkpoint at ``path`` is exchanged atomically with the new one, so ``path``
always holds a complete checkpoint).
"""
from __future__ import annotations

import os
from typing import Any

from . import activation, commit, knobs, layout, reader, writer
from ._native import CODEC_IDS, require_codec
from .coord import Coordinator, LocalCoordinator
from .errors import CheckpointNotFoundError, PyckptError


def save(state: Any, path: str | os.PathLike, *, compress: str = "none", step: int = 0,
         coordinator: Coordinator | None = None) -> str:
    """Write ``state`` (nested dicts/lists/tuples of tensors and plain values) to directory ``path``.

    ``path`` must not exist or must be a pyckpt checkpoint (which is replaced
    atomically). Raises ``UnsupportedStateError`` before writing anything when
    a value cannot be stored. Returns the absolute path. With several ranks
    pass ``coordinator=StoreCoordinator()`` and call it on every rank."""
    activation.explicit_api_used("pyckpt.save")  # a bare `import pyckpt` must not resume behind it
    knobs.check_local_path(path)
    from ._native import get_engine
    from .checkpointer import check_step

    step = check_step(step)
    if compress not in CODEC_IDS:
        raise ValueError(f"compress must be one of {sorted(CODEC_IDS)}, got {compress!r}")
    require_codec(compress)
    coord = coordinator if coordinator is not None else LocalCoordinator()
    engine = get_engine()
    plan = writer.prepare(state, None, coord.rank, coord.world_size, engine.chunk_bytes())
    final = os.path.abspath(os.fspath(path))
    _check_replaceable(final)
    held, refusal = _claim_root(final) if coord.rank == 0 else (None, None)
    try:
        # Rank 0 decides for every rank, before anything is written.
        got = coord.broadcast_json({"token": commit.new_token(), "refused": refusal}, "api-save")
        if got["refused"] is not None:
            raise PyckptError(got["refused"])
        token = got["token"]
        commit.gc_siblings(final)  # leftovers of saves to this path that were killed
        tmp = f"{final}.tmp-{token}"
        os.makedirs(tmp, exist_ok=True)
        try:
            part, err = writer.collect(writer.start(engine, plan, tmp, compress), plan, tmp)
        except Exception as e:  # the job could not start (e.g. the data file cannot be created)
            part, err = None, e
        commit.commit_parts(coord, f"api-save/{token}", tmp, final, step, part, err, None)
    finally:
        if held is not None:
            held.release()
    return final


def _claim_root(final: str) -> tuple[Any, str | None]:
    """For a save to ``final`` inside a Checkpointer root (a ``step-*`` entry): (the root's directory
    lock, held until the save is over; None where the root has no lock file) or (None, why the save
    is refused): another writer holds the root, or committed checkpoints read ``final``'s data files."""
    from .lock import DirLock

    root, name = os.path.split(final)
    if layout.parse_step(name) is None:
        return None, None
    held = None
    if os.path.lexists(os.path.join(root, layout.LOCK)):
        try:
            held = DirLock(root)
        except PyckptError as e:  # a job writes there: its commits and retention would race with ours
            return None, f"refusing to save {final}: {e}"
    why = commit.replace_refusal(root, final)
    if why is not None:
        if held is not None:
            held.release()
        return None, f"refusing to save {final}: {why}; save to another path"
    return held, None


def _check_replaceable(final: str) -> None:
    if os.path.islink(final):
        raise PyckptError(f"refusing to replace {final}: it is a symbolic link")
    if os.path.lexists(final) and not layout.is_checkpoint_dir(final):
        if not (os.path.isdir(final) and not os.listdir(final)):
            raise PyckptError(f"refusing to replace {final}: it exists and is not a pyckpt checkpoint")
        os.rmdir(final)  # an empty directory is just a place to save into
    os.makedirs(os.path.dirname(final) or ".", exist_ok=True)


def resolve(path: str | os.PathLike, newest_committed: bool = False) -> str:
    """A checkpoint directory for ``path``: itself, or the latest checkpoint of a Checkpointer root.

    The caller's path is resolved once here (it may be a link the user made,
    e.g. ``best -> runs/a/step-000000900``), except that a ``step-*`` entry
    that is itself a symbolic link is refused: inside a checkpoint root
    nothing is ever followed (docs/FORMAT.md "Reader requirements").
    With ``newest_committed`` a root resolves to its newest committed directory
    even if that one is damaged (``pyckpt verify`` wants to report it).

    Raises ``CheckpointNotFoundError`` when ``path`` is no checkpoint and no
    root holding a committed one; ``CorruptCheckpointError`` naming them when a
    root holds committed checkpoints of which none validates (a caller must
    not take lost progress for "nothing saved yet")."""
    p = os.path.abspath(os.fspath(path))
    if layout.parse_step(os.path.basename(p)) is not None and os.path.islink(p):
        return p  # not resolved: the reader refuses it (CorruptCheckpointError naming it)
    p = os.path.realpath(p)
    if os.path.lexists(os.path.join(p, layout.MANIFEST)):
        return p  # a checkpoint directory (a manifest that is not a regular file is reported by the reader)
    if not os.path.isdir(p):
        raise CheckpointNotFoundError(f"{p} is neither a checkpoint nor a checkpoint root")
    if newest_committed:
        committed = layout.committed(p)
        if committed:
            return committed[0].path
    else:
        from .checkpointer import iter_valid, unloadable_error

        why: dict[str, str] = {}
        info = next(iter_valid(p, on_damaged=lambda q, exc: why.setdefault(os.path.basename(q), str(exc))), None)
        if info is not None:
            return info.path
        committed = [e.path for e in layout.committed(p)]
        if committed:
            raise unloadable_error(p, committed, why)
    raise CheckpointNotFoundError(f"no complete checkpoint in {p}")


def load(path: str | os.PathLike, into: Any = None, map_location: Any = None, *, strict: bool = True) -> Any:
    """Load the state saved at ``path`` (a checkpoint directory or a Checkpointer root: its latest).

    ``into``: a structure parallel to the saved one whose tensors receive the
    values in place (returned as the same objects). Every target is checked
    before anything is written: same shape, same dtype (no casts), not a meta
    tensor; with ``strict`` (the default) every saved tensor must have a
    target and every target a saved tensor. All problems are listed in one
    ``IntoMismatchError`` and no target is touched. ``strict=False`` loads
    saved tensors without a target as new tensors, leaves targets without a
    saved tensor unchanged, and names both in one ``pyckpt:`` log line.
    A chunk's bytes reach a target only after its checksum passed.
    ``map_location``: None keeps each tensor's saved device (a CUDA-saved
    tensor then needs CUDA: pass ``map_location="cpu"`` on CPU-only
    machines), a device / str for every new tensor, or torch.load's dict
    ``{saved device: device}`` (``{"cuda:1": "cuda:0"}``; a saved device it
    does not name is kept); targets in ``into`` keep their device.

    A root whose committed checkpoints all fail validation raises
    ``CorruptCheckpointError`` naming them; ``CheckpointNotFoundError`` means
    there is no checkpoint at ``path`` at all. A damaged newest checkpoint is
    not skipped here (``Checkpointer.load`` falls back past it)."""
    from ._native import get_engine

    op = reader.open_checkpoint(resolve(path))
    return reader.load_section(get_engine(), op, "replicated", 0, into, map_location, strict=strict)
