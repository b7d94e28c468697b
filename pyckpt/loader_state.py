"""DataLoader tracking and fast-forward.

Loaders are grouped into *streams* by a signature (dataset type and length,
batch size, sampler types, ...), so a loader re-created every epoch continues
the same stream. For each stream we count ``iter()`` calls (epochs started)
and batches returned in the current epoch, and keep the RNG state(s) from
right before the current epoch's ``iter()``: a shuffling sampler and the
worker base seed are drawn from them then.

Fast-forward to (epoch E, batch B) of one stream: ``iter()`` number < E
returns a finished iterator (a real ``_BaseDataLoaderIter`` that raises
StopIteration at once: no data loaded, no workers started); ``iter()``
number E puts the epoch-start RNG state back, builds the real iterator (so it
draws the same permutation and worker seeds) and drops the first B index
batches at the *sampler* level (``DataLoader._index_sampler`` is patched for
that one call), which also works with worker processes because the workers
only ever see the remaining indices. An ``IterableDataset`` has no sampler:
its B batches are consumed (loaded) and dropped.

Look-ahead wrappers (accelerate's ``DataLoaderShard`` fetches batch k+1 before
it hands batch k to the loop) are registered with ``count_handed_by``: their
``__iter__`` is wrapped to count the batches handed to the loop, so a position
is (batches handed B, batches fetched F >= B). Fast-forward skips B and the
restore waits until the wrapper has fetched F again (its look-ahead refilled).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _BaseDataLoaderIter, _DatasetKind

from . import rng
from .hooks import HookSet


def signature(loader: DataLoader) -> list:
    """What identifies "the same" loader across re-creation and across runs (JSON-able)."""
    try:
        n = len(loader.dataset)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        n = -1
    bs = loader.batch_sampler
    return [type(loader.dataset).__qualname__, n, loader.batch_size, type(loader.sampler).__qualname__,
            type(bs).__qualname__ if bs is not None else None, bool(loader.drop_last), int(loader.num_workers)]


def generators(loader: DataLoader) -> list[torch.Generator]:
    """The loader's own torch.Generators (loader, then its samplers), deduplicated, in a fixed order."""
    found: list[torch.Generator] = []
    for owner in (loader, *_sampler_chain(loader)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not x for x in found):
            found.append(g)
    return found


def _sampler_chain(loader: DataLoader) -> list:
    """The loader's sampler and batch sampler and what they wrap (``sampler`` / ``batch_sampler``
    attributes, breadth first): accelerate's ``BatchSamplerShard`` wraps the BatchSampler that
    holds the shuffling sampler, one level deeper than a plain loader's."""
    chain: list = []
    todo = [loader.sampler, loader.batch_sampler]
    while todo and len(chain) < 8:
        s = todo.pop(0)
        if s is None or any(s is x for x in chain):
            continue
        chain.append(s)
        todo += [getattr(s, "sampler", None), getattr(s, "batch_sampler", None)]
    return chain


def _epoch_rng(loader: DataLoader) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "gens": [rng.generator_state(g) for g in generators(loader)]}


def _set_epoch_rng(loader: DataLoader, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    for g, s in zip(generators(loader), state["gens"]):
        rng.set_generator_state(g, s)


@dataclass
class Stream:
    """One logical training/evaluation data stream (loaders with the same signature)."""

    sig: list
    tracker: "LoaderTracker"
    epochs: int = 0  # iter() calls so far; the current epoch is number `epochs`
    batches: int = 0  # batches returned by the current epoch's iterator
    epoch_rng: dict | None = None
    reused: bool = False  # current epoch reused a persistent-workers iterator
    loader: Any = None  # weakref to the loader of the current epoch
    # Batches a look-ahead wrapper handed to the training loop in the current epoch (None: the loop
    # iterates the DataLoader itself, so handed == fetched).
    handed: int | None = None
    skipping: bool = False  # the current epoch finished before the checkpoint being resumed

    def position(self) -> dict[str, Any]:
        """This stream's position and sampler state, for a checkpoint's per-rank part.

        ``batch`` is in the training loop's terms (batches handed to it); ``fetched`` counts the
        batches taken from the DataLoader, more than ``batch`` under a look-ahead wrapper."""
        loader = self.loader() if self.loader is not None else None
        handed = self.batches if self.handed is None else min(self.handed, self.batches)
        pos: dict[str, Any] = {"sig": self.sig, "epoch": self.epochs, "batch": handed, "fetched": self.batches,
                               "epoch_rng": self.epoch_rng, "reused": self.reused, "gens": [], "samplers": []}
        if loader is not None:
            pos["gens"] = [rng.generator_state(g) for g in generators(loader)]
            pos["samplers"] = [_sampler_state(s) for s in _samplers(loader)]
        return pos

    def restore_sampler_state(self, pos: dict[str, Any]) -> None:
        """Put generators and DistributedSampler epoch/seed back (the position itself is reached by fast-forward)."""
        loader = self.loader() if self.loader is not None else None
        if loader is None:
            return
        for g, s in zip(generators(loader), pos.get("gens", [])):
            rng.set_generator_state(g, s)
        for smp, s in zip(_samplers(loader), pos.get("samplers", [])):
            for k, v in (s or {}).items():
                setattr(smp, k, v)


def _samplers(loader: DataLoader) -> list:
    inner = getattr(loader.batch_sampler, "sampler", None)
    return [s for s in (loader.sampler, inner) if s is not None]


def _sampler_state(sampler: Any) -> dict[str, Any] | None:
    # DistributedSampler keeps epoch (from set_epoch) and seed as plain ints.
    if isinstance(getattr(sampler, "epoch", None), int) and isinstance(getattr(sampler, "seed", None), int):
        return {"epoch": sampler.epoch, "seed": sampler.seed}
    return None


@dataclass
class FastForward:
    """Where one stream must be brought to: the epoch-th iter() call, `batch` batches handed to the
    loop; the restore happens once `fetched` batches were taken from the loader."""

    sig: list
    epoch: int
    batch: int
    epoch_rng: dict | None
    reused: bool
    position: dict = field(default_factory=dict)
    fetched: int = -1

    def __post_init__(self) -> None:
        if self.fetched < self.batch:  # checkpoints without "fetched": no look-ahead
            self.fetched = self.batch

    @classmethod
    def from_position(cls, pos: dict[str, Any]) -> "FastForward":
        batch = int(pos["batch"])
        return cls(list(pos["sig"]), int(pos["epoch"]), batch, pos.get("epoch_rng"),
                   bool(pos.get("reused")), pos, int(pos.get("fetched", batch)))


class _SkipFirst:
    """Stands in for the loader's index sampler during one ``iter()``: the first iterator
    advanced drops ``k`` index batches; later ones (persistent workers' next epochs) do not."""

    def __init__(self, inner: Any, k: int, before_first_draw: Callable[[], None] | None) -> None:
        self.inner, self.k, self.pending, self.before_first_draw = inner, k, True, before_first_draw

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> "_Skipping":
        return _Skipping(self.inner, self)


class _Skipping:
    """Index-batch iterator that drops ``owner.k`` batches once, on ``prime()`` or first use."""

    def __init__(self, inner: Any, owner: _SkipFirst) -> None:
        self.it, self.owner, self.primed = iter(inner), owner, False

    def __iter__(self) -> "_Skipping":
        return self

    def prime(self) -> None:
        """Skip now (a lazy sampler draws its permutation now, right after the worker seed)."""
        if self.primed:
            return
        self.primed = True
        if self.owner.pending:
            self.owner.pending = False
            if self.owner.before_first_draw is not None:
                # Before the sampler's first draw (a lazy sampler draws on first next()).
                self.owner.before_first_draw()
            for _ in range(self.owner.k):
                next(self.it)

    def __next__(self) -> Any:
        if not self.primed:
            try:
                self.prime()
            except StopIteration:
                pass  # fewer batches than the skip: the epoch is over
        return next(self.it)


class _FinishedEpoch(_BaseDataLoaderIter):
    """The iterator of an epoch that finished before the checkpoint: a real DataLoader iterator
    (wrappers that inspect it see the usual type and attributes) that raises StopIteration at once.

    ``_BaseDataLoaderIter.__init__`` is not run: it would start no workers here, but it draws a
    worker seed and may warn; the attributes the base class reads are set directly."""

    def __init__(self, loader: DataLoader) -> None:  # noqa: D107 - see the class docstring
        self._dataset = loader.dataset
        self._dataset_kind = loader._dataset_kind
        self._IterableDataset_len_called = loader._IterableDataset_len_called
        self._auto_collation = loader._auto_collation
        self._drop_last = loader.drop_last
        self._index_sampler: list = []
        self._sampler_iter = iter(())
        self._num_workers = loader.num_workers
        self._persistent_workers = loader.persistent_workers
        self._timeout = loader.timeout
        self._collate_fn = loader.collate_fn
        self._pin_memory = False
        self._num_yielded = 0
        self._profile_name = f"enumerate(DataLoader)#{_BaseDataLoaderIter.__name__}.__next__"

    def _reset(self, loader: DataLoader, first_iter: bool = False) -> None:
        self._sampler_iter, self._num_yielded = iter(()), 0

    def _next_data(self) -> Any:
        raise StopIteration


class LoaderTracker:
    """Tracks every DataLoader's iteration; drives snapshot points and fast-forward.

    ``on_point(stream)`` is called before a batch is fetched whenever ``armed``
    is set; ``on_first_iter()`` once, at the first ``iter()`` of any loader
    (the resume plan is made then, when the process group exists);
    ``on_idle_fetches()`` once when ``check_at`` fetches were made."""

    def __init__(self, on_point: Callable[[Stream], None], on_first_iter: Callable[[], None],
                 on_idle_fetches: Callable[[], None], check_at: int = 16) -> None:
        self.on_point, self.on_first_iter, self.on_idle_fetches = on_point, on_first_iter, on_idle_fetches
        self.streams: dict[tuple, Stream] = {}
        self.armed = False
        self.fetches = 0
        self.check_at = check_at
        self.last: Stream | None = None
        self.plan: FastForward | None = None
        self.plan_stream: Stream | None = None  # set once the plan's epoch iterator exists
        self.wrapper_depth = 0  # > 0 while a registered look-ahead wrapper runs its own code
        self._first = True

    # -- installation ---------------------------------------------------------
    def install(self, hooks: HookSet) -> None:
        """Patch DataLoader.__iter__, the iterators' __next__ and DataLoader._index_sampler."""
        tracker = self
        orig_iter = DataLoader.__iter__
        orig_next = _BaseDataLoaderIter.__next__
        orig_index_sampler = DataLoader._index_sampler

        def __iter__(loader):  # noqa: N807
            return tracker._on_iter(loader, orig_iter, orig_next)

        def __next__(it):  # noqa: N807
            st = it._pyckpt_stream
            if st is None:
                return orig_next(it)
            if tracker.armed and tracker._ready(st):
                tracker.on_point(st)
            tracker.last = st
            try:
                data = orig_next(it)
            except StopIteration:
                # The end of an epoch is a fetch event too: a look-ahead wrapper hands its last batch
                # after this, so the loop's last step of the epoch follows no successful fetch.
                tracker.fetches += 1
                raise
            st.batches += 1
            tracker.fetches += 1
            if tracker.fetches == tracker.check_at:
                tracker.on_idle_fetches()
            return data

        def _index_sampler(loader):
            skip = loader.__dict__.get("_pyckpt_skip")
            return skip if skip is not None else orig_index_sampler.fget(loader)

        hooks.patch(_BaseDataLoaderIter, "_pyckpt_stream", None)
        hooks.patch(DataLoader, "__iter__", __iter__)
        hooks.patch(_BaseDataLoaderIter, "__next__", __next__)
        hooks.patch(DataLoader, "_index_sampler", property(_index_sampler))
        self._orig_next = orig_next
        from . import integrations

        integrations.install(self, hooks)

    def count_handed_by(self, hooks: HookSet, cls: type,
                        finish_skipped: Callable[[Any], None] | None = None) -> None:
        """Treat ``cls`` (an iterable wrapping a DataLoader, possibly fetching ahead) as the loop's
        data source: its ``__iter__`` is wrapped to count the batches it hands to the loop.

        ``finish_skipped(wrapper)`` is called when the wrapper hands over something for an epoch that
        is skipped on resume (its DataLoader yields nothing then; older accelerate versions hand the
        loop ``None`` for an empty loader): the item is dropped, the wrapper's iterator closed, and
        ``finish_skipped`` does the wrapper's end-of-epoch bookkeeping instead."""
        orig = cls.__iter__
        tracker = self

        def __iter__(wrapper):  # noqa: N807
            tracker.wrapper_depth += 1
            try:
                inner = orig(wrapper)
            finally:
                tracker.wrapper_depth -= 1
            return tracker._count_handed(wrapper, inner, finish_skipped)

        hooks.patch(cls, "__iter__", __iter__)

    def _count_handed(self, wrapper: Any, inner: Any, finish_skipped: Callable[[Any], None] | None) -> Any:
        try:
            while True:
                self.wrapper_depth += 1
                try:
                    item = next(inner)
                except StopIteration:
                    return
                finally:
                    self.wrapper_depth -= 1
                st = self.last
                if st is not None and st.skipping:
                    if finish_skipped is not None:
                        close = getattr(inner, "close", None)
                        if close is not None:
                            close()
                        finish_skipped(wrapper)
                        return
                elif st is not None and st.handed is not None:
                    st.handed += 1
                yield item
        finally:
            close = getattr(inner, "close", None)
            if close is not None:
                close()  # the loop left early (break, exception): let the wrapper clean up as usual

    def _ready(self, st: Stream) -> bool:
        """Whether a point on ``st`` may run now: a pending restore waits until a look-ahead
        wrapper has fetched as many batches as it had when the snapshot was taken."""
        plan = self.plan
        return plan is None or st is not self.plan_stream or st.batches >= plan.fetched

    # -- iteration --------------------------------------------------------------
    def stream_for(self, loader: DataLoader) -> Stream:
        sig = signature(loader)
        key = tuple(sig)
        st = self.streams.get(key)
        if st is None:
            st = self.streams[key] = Stream(sig, self)
        return st

    def ensure_started(self) -> None:
        """Run ``on_first_iter`` now if no loader was iterated yet (an integration needs the resume
        plan before the training loop's first ``iter()``)."""
        if self._first:
            self._first = False
            self.on_first_iter()

    def _on_iter(self, loader: DataLoader, orig_iter: Callable, orig_next: Callable) -> Any:
        self.ensure_started()
        st = self.stream_for(loader)
        st.epochs += 1
        st.batches = 0
        st.handed = 0 if self.wrapper_depth else None
        st.skipping = False
        st.loader = weakref.ref(loader)
        plan = self.plan
        if plan is not None and plan.sig == st.sig and self.plan_stream is None:
            if st.epochs < plan.epoch:
                st.skipping = True
                it = _FinishedEpoch(loader)
                it._pyckpt_stream = st
                return it
            if st.epochs == plan.epoch:
                return self._fast_forward(loader, st, plan, orig_iter, orig_next)
        st.reused = bool(loader.persistent_workers and loader.num_workers > 0 and loader._iterator is not None)
        st.epoch_rng = _epoch_rng(loader)
        it = orig_iter(loader)
        it._pyckpt_stream = st
        return it

    def _fast_forward(self, loader: DataLoader, st: Stream, plan: FastForward, orig_iter: Callable,
                      orig_next: Callable) -> Any:
        st.reused, st.epoch_rng = plan.reused, plan.epoch_rng
        before = None
        if plan.epoch_rng is not None:
            _set_epoch_rng(loader, plan.epoch_rng)
            if plan.reused:
                # The original epoch reused a persistent iterator, which draws no new worker
                # seed; ours is new and does. Put the state back before the sampler draws.
                before = lambda: _set_epoch_rng(loader, plan.epoch_rng)  # noqa: E731
        iterable = loader._dataset_kind == _DatasetKind.Iterable
        if not iterable:
            loader.__dict__["_pyckpt_skip"] = _SkipFirst(loader._index_sampler, plan.batch, before)
        try:
            it = orig_iter(loader)
        finally:
            loader.__dict__.pop("_pyckpt_skip", None)
        if iterable:
            _consume(it, plan.batch, orig_next)
        elif isinstance(getattr(it, "_sampler_iter", None), _Skipping):
            try:
                it._sampler_iter.prime()
            except StopIteration:
                pass
        it._pyckpt_stream = st
        st.batches = plan.batch
        if st.handed is not None:
            st.handed = plan.batch
        self.plan_stream = st
        self.armed = True  # the restore happens at this iterator's next fetch
        return it


def _consume(it: Any, n: int, orig_next: Callable) -> None:
    for _ in range(n):
        try:
            orig_next(it)
        except StopIteration:
            return
