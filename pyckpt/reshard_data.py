"""The data position of a DDP job resumed on another number of ranks.

A ``DistributedSampler`` epoch is one global list ``G`` (the seeded
permutation, cut to ``total_size`` when ``drop_last``; its padding, which only
repeats samples from the start, is left out) dealt round-robin: global
position ``p`` goes to rank ``p % N``. After ``b`` batches of ``B`` on every
rank the trained samples are exactly the prefix ``G[:b*B*N]``, so a position
is one number, the global samples consumed, whatever the world size.

A run on ``M`` ranks resumes the interrupted epoch by splitting the rest
``G[P:]`` into steps: step ``j`` takes the next slice of ``G`` and cuts it
across the ranks (rank order), every rank getting the same number of batches
(DDP needs it: each step is one all-reduce on every rank). Batches are full
(``B``) except at the end of the epoch, where the last step (or the last few,
when fewer samples than ranks are left for it) shares the rest evenly, so
that no sample is trained twice and none is skipped.
Only when that is impossible (fewer samples left than ranks, ``batch_size``
1 and a remainder, or ``DataLoader(drop_last=True)``, which trains full
batches only) are samples repeated (the sampler pads) or left out (it drops),
and one line says how many. The split, ``Remap``, is stored in the position
of every snapshot taken during that epoch, so a second interruption resumes
it exactly (same world size) or splits its rest again (another one). Later
epochs use the normal sampler.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

SAMPLER, BATCH_SAMPLER = "DistributedSampler", "BatchSampler"  # the types a remap understands (qualnames)


def remappable(sig: list) -> bool:
    """Whether a loader with signature ``sig`` (loader_state.signature) can be remapped."""
    return len(sig) > 4 and sig[3] == SAMPLER and sig[4] == BATCH_SAMPLER


def num_samples(n: int, world: int, drop_last: bool) -> int:
    """Samples per rank of a ``DistributedSampler`` over ``n`` samples (as torch computes it)."""
    if drop_last and n % world:
        return math.ceil((n - world) / world)
    return math.ceil(n / world)


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int, world0: int, drop_last: bool) -> list[int]:
    """``G``: the epoch's global sample list on ``world0`` ranks, without padding."""
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        perm = torch.randperm(n, generator=g).tolist()
    else:
        perm = list(range(n))
    return perm[:epoch_length(n, world0, drop_last)]


def epoch_length(n: int, world0: int, drop_last: bool) -> int:
    """len(G): the samples one epoch trains on ``world0`` ranks, padding left out."""
    return min(n, num_samples(n, world0, drop_last) * world0)


@dataclass
class Remap:
    """The rest of one epoch split across ``world`` ranks; JSON-able (stored in positions)."""

    n: int
    shuffle: bool
    seed: int
    epoch: int  # the sampler's epoch (set_epoch)
    world0: int  # world size that defines G (the run that started the epoch)
    sampler_drop_last: bool
    start: int  # samples of G consumed when this split was made
    world: int
    batch_size: int
    loader_drop_last: bool
    batch0: int  # the loop's batch count in this epoch when the split starts

    def order(self) -> list[int]:
        return epoch_order(self.n, self.shuffle, self.seed, self.epoch, self.world0, self.sampler_drop_last)

    def total(self) -> int:
        """len(G), without drawing the permutation."""
        return epoch_length(self.n, self.world0, self.sampler_drop_last)

    def sizes(self) -> tuple[list[list[int]], int]:
        """Batch sizes per step and rank, and the samples added (> 0, repeats) or left out (< 0)."""
        rest = max(self.total() - self.start, 0)
        return split_sizes(rest, self.world, self.batch_size, self.loader_drop_last, self.sampler_drop_last)

    def batches(self, rank: int) -> list[list[int]]:
        """Rank ``rank``'s index batches for the rest of the epoch."""
        g = self.order()
        rest = g[self.start:]
        sizes, adjust = self.sizes()
        if adjust > 0:  # pad as DistributedSampler does: repeat from the epoch's start
            rest = rest + (g * math.ceil(adjust / max(len(g), 1)))[:adjust]
        out, at = [], 0
        for step in sizes:
            lo = at + sum(step[:rank])
            out.append(rest[lo:lo + step[rank]])
            at += sum(step)
        return out

    def consumed(self, batch: int) -> int:
        """Samples of G consumed once the loop has taken ``batch`` batches of this epoch."""
        sizes, _ = self.sizes()
        return self.start + sum(sum(s) for s in sizes[:max(batch - self.batch0, 0)])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Remap":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def split_sizes(rest: int, world: int, bs: int, loader_drop_last: bool,
                sampler_drop_last: bool) -> tuple[list[list[int]], int]:
    """Cut ``rest`` samples into steps of ``world`` batches of at most ``bs``, every rank the same
    number of batches, none empty. Returns (sizes[step][rank], adjust): ``adjust`` samples were
    added (repeats) or, negative, left out when an exact cut does not exist."""
    if rest == 0:
        return [], 0
    if loader_drop_last:  # full batches only, as the DataLoader would
        k = rest // (world * bs)
        return [[bs] * world for _ in range(k)], k * world * bs - rest
    total, adjust = rest, 0
    if rest < math.ceil(rest / (world * bs)) * world:  # some rank would get an empty batch
        total = world * (rest // world) if sampler_drop_last else world * math.ceil(rest / world)
        adjust = total - rest
        if total == 0:
            return [], adjust
    k = math.ceil(total / (world * bs))
    # Full steps first; the last t steps share what is left evenly (the fewest steps that give every
    # batch at least one sample), larger batches first.
    for t in range(1, k + 1):
        left = total - (k - t) * world * bs
        if left >= t * world:
            break
    q, extra = divmod(left, t * world)
    tail = [q + (i < extra) for i in range(t * world)]
    sizes = [[bs] * world for _ in range(k - t)] + [tail[i * world:(i + 1) * world] for i in range(t)]
    return sizes, adjust


class RemappedEpoch:
    """Stands in for a loader's batch sampler for one epoch: yields this rank's remapped index
    batches the first time, the loader's own batch sampler afterwards (a persistent-workers
    iterator reuses its index sampler in later epochs)."""

    def __init__(self, inner: Any, before: int, batches: list[list[int]]) -> None:
        self.inner, self.before, self.batches, self.pending = inner, before, batches, True

    def __len__(self) -> int:
        return self.before + len(self.batches)

    def __iter__(self) -> Any:
        if self.pending:
            self.pending = False
            return iter(self.batches)
        return iter(self.inner)


def plan(loader: Any, pos: dict[str, Any]) -> tuple[Remap, int] | None:
    """The remap of a fast-forward to ``pos`` (a saved position) on this loader, and the batches of it
    to skip; None when the plain fast-forward applies (same world size, no remapped epoch).

    ``pos["from_world"]`` is set by resume when the checkpoint was written by another number of ranks;
    ``pos["reshard"]`` is the remap in force when the snapshot was taken."""
    from torch.utils.data import BatchSampler, DistributedSampler

    saved, from_world = pos.get("reshard"), pos.get("from_world")
    sampler = loader.sampler
    if (saved is None and from_world is None) or not isinstance(sampler, DistributedSampler) \
            or type(loader.batch_sampler) is not BatchSampler:
        return None
    batch = int(pos["batch"])
    if saved is not None:
        old = Remap.from_json(saved)
        if from_world is None and old.world == sampler.num_replicas:
            return old, batch - old.batch0  # same split again: exact
        consumed, world0 = old.consumed(batch), old.world0
        base = (old.n, old.shuffle, old.seed, old.epoch, old.sampler_drop_last)
    else:
        n = len(sampler.dataset)  # type: ignore[arg-type]
        smp = (pos.get("samplers") or [None])[0] or {}
        base = (n, bool(sampler.shuffle), int(smp.get("seed", sampler.seed)), int(smp.get("epoch", sampler.epoch)),
                bool(sampler.drop_last))
        world0 = int(from_world)
        per_rank = min(batch * int(loader.batch_size), num_samples(n, world0, bool(sampler.drop_last)))
        consumed = min(per_rank * world0, epoch_length(n, world0, bool(sampler.drop_last)))
    n, shuffle, seed, epoch, sdl = base
    new = Remap(n, shuffle, seed, epoch, world0, sdl, consumed, int(sampler.num_replicas), int(loader.batch_size),
                bool(loader.drop_last), batch)
    return new, 0


def index_sampler(loader: Any, pos: dict[str, Any], stream: Any) -> RemappedEpoch | None:
    """The batch sampler for the fast-forward epoch when it must be remapped (else None); records
    the remap on ``stream`` (``stream.reshard``) so snapshots in this epoch store it."""
    found = plan(loader, pos)
    if found is None:
        return None
    remap, skip = found
    rank = int(loader.sampler.rank)
    if rank == 0 and skip == 0:
        _say_split(remap)
    stream.reshard = dict(remap.to_json(), at_epoch=stream.epochs)
    return RemappedEpoch(loader._index_sampler, int(pos["batch"]), remap.batches(rank)[skip:])


def position_extra(stream: Any) -> dict[str, Any]:
    """What a snapshot's position must add: the remap in force in the stream's current epoch."""
    r = getattr(stream, "reshard", None)
    if r is None or r.get("at_epoch") != stream.epochs:
        return {}
    return {"reshard": {k: v for k, v in r.items() if k != "at_epoch"}}


def _say_split(remap: Remap) -> None:
    from .activation import _say

    total = remap.total()
    sizes, adjust = remap.sizes()
    what = ""
    if adjust > 0:
        what = f"; {adjust} sample(s) repeated so that every rank gets a batch (DistributedSampler pads)"
    elif adjust < 0:
        cause = "DataLoader drop_last=True" if remap.loader_drop_last else "DistributedSampler drop_last=True"
        what = f"; {-adjust} sample(s) left out ({cause})"
    _say(f"data: the rest of epoch {remap.epoch} ({total - remap.start} of {total} samples, "
         f"{remap.start} trained) is split across {remap.world} rank(s) by global sample count: "
         f"{len(sizes)} batch(es) per rank{what}")
