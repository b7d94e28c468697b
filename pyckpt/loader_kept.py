"""Loaders whose worker processes persist (``persistent_workers=True``) across a checkpoint: a validation loader.

torch draws each new iterator's worker seed from the main process's generator (the loader's own ``generator``
when it has one). A persistent loader makes its iterator once and reuses it at every later ``iter()``: no seed is
drawn then, and its workers go on from their generators' states. A loader iterated before the checkpoint is
reused at the run's next ``iter()`` of it; a relaunch has no iterator there and makes one. That drew one number
more from the main generator after the restore point, so every draw after it (dropout) differed from the run's,
silently; and its workers started from another seed.

So each snapshot keeps (``capture``), for every such loader other than the training one, its iterator's base seed
and, once the epoch it was in went to its end, its workers' states. After the restore, the relaunch's next new
iterator of a loader of that signature (``Kept.take``) starts its workers with that seed and those states, and the
generator the seed was drawn from is put back as it was. An iterator the relaunch made before the restore point
(a validation run again in a skipped epoch), idle, is shut down at the restore (``Kept.stop_idle``), so its next
``iter()`` starts so. A script that makes such loaders anew (a loader of the signature was dropped by the checkpoint)
draws a new seed for each in the run and in the relaunch alike: nothing is kept for it. Where it had made only one
by the checkpoint, that one is kept; the relaunch's next new one after it is then said (the run may have made a new
one where the relaunch went on from the kept one).
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data.dataloader import _DatasetKind

from . import loader_workers

KEPT_PER_SIG = 8  # live persistent loaders followed per signature (a validation and a test loader, say)


def note_started(st: Any, loader: Any) -> None:
    """``loader`` (of stream ``st``) made a new persistent-workers iterator."""
    alive = [r for r in st.persistent if r() is not None]
    if not any(r() is loader for r in alive):
        st.persistent_made += 1
        alive.append(weakref.ref(loader))
    st.persistent = alive[-KEPT_PER_SIG:]


def _idle(it: Any, loader: Any) -> bool:
    """Whether the iterator's workers have nothing in flight: the epoch it was in went to its end."""
    try:
        if loader._dataset_kind == _DatasetKind.Iterable:
            return not any(it._workers_status)  # each worker sent its dataset's end
        return it._tasks_outstanding == 0 and not it._task_info
    except AttributeError:  # another torch's iterator layout
        return False


def _say(message: str, key: str | None = None) -> None:
    from .loader_state import _say_once  # (loader_state imports this module)

    _say_once(message, "warning", key=key)


def _saved_states(record: Any) -> list:
    """The workers' newest states in checkpoint form; converted again only once one changed (a validation loader
    sits idle between validations, and this runs in every snapshot's stall)."""
    states = record.latest()
    cached = record.__dict__.get("_pyckpt_kept")
    if cached is not None and len(cached[0]) == len(states) and all(a is b for a, b in zip(cached[0], states)):
        return cached[1]
    saved = [loader_workers.to_saved(s) for s in states]
    record._pyckpt_kept = (states, saved)  # (holds the states: compared by identity)
    return saved


def _live(st: Any, skip: Any) -> list[tuple[Any, Any]]:
    """(loader, iterator) of the stream's loaders whose persistent iterator pyckpt started is alive, but ``skip``."""
    out = []
    for ref in st.persistent:
        loader = ref()
        it = loader.__dict__.get("_iterator") if loader is not None and loader is not skip else None
        if it is not None and it.__dict__.get("_pyckpt_workers") is not None:
            out.append((loader, it))
    return out


def capture(streams: Iterable[Any], training: Any, kept: "Kept | None") -> list[dict[str, Any]]:
    """For a snapshot: each live persistent iterator of a loader other than ``training``: its signature, base seed
    and workers' states (None while it has batches in flight: an epoch left early); and, in a relaunch, the
    checkpoint's that no loader took yet (``kept``: the run still had them)."""
    out, seen = [], set()
    for st in streams:
        sig = tuple(st.sig)
        seen.add(sig)
        live, pending = _live(st, None), kept.pending(sig) if kept is not None else []
        if st.persistent_made > len(live) + len(pending):  # (pending: one shut down at the restore, say)
            continue  # a loader of this signature was dropped: the script makes them anew, each drawing its seed
        for loader, it in live:
            if loader is training:
                continue
            states = _saved_states(it._pyckpt_workers) if _idle(it, loader) else None
            out.append({"sig": list(st.sig), "base_seed": int(it._base_seed), "rng": states})
        out.extend(pending)
    for sig in kept.by_sig if kept is not None else []:
        if sig not in seen:
            out.extend(kept.pending(sig))
    return out


class Kept:
    """In a relaunch, after the restore: the checkpoint's persistent iterators, by signature, in the run's order."""

    def __init__(self, saved: Any) -> None:
        # Per signature: (the entry as saved, worker states or None, base seed), in the run's order.
        self.by_sig: dict[tuple, list[tuple[dict, list | None, int]]] = {}
        self.said: set[tuple] = set()
        for entry in saved if isinstance(saved, list) else []:
            try:
                sig, seed, rng = tuple(entry["sig"]), int(entry["base_seed"]), entry["rng"]
                states = None if rng is None else [loader_workers.from_saved(s) for s in rng]
                self.by_sig.setdefault(sig, []).append((entry, states, seed))  # (a sig holding a list: TypeError)
            except (KeyError, TypeError, ValueError) as e:
                _say(f"warning: a persistent DataLoader's worker state in the checkpoint is malformed ({e}); its "
                     "workers start as new ones, so the draws after this resume may differ", key="kept-malformed")

    def stop_idle(self, streams: Iterable[Any], training: Any) -> None:
        """Shut down the idle persistent iterators the relaunch made before the restore of loaders the checkpoint
        kept one for (a validation run again in a skipped epoch): their next ``iter()`` starts as the run's."""
        for st in streams:
            if tuple(st.sig) not in self.by_sig:
                continue
            for loader, it in _live(st, training):
                if _idle(it, loader):
                    it._shutdown_workers()
                    loader._iterator = None

    def take(self, st: Any, loader: Any) -> tuple | None:
        """For a new persistent iterator of ``loader`` (stream ``st``): (worker states or None, base seed, first
        worker, the generator to put back after its seed is drawn) of the checkpoint's next one of its signature."""
        sig = tuple(st.sig)
        entries = self.by_sig.get(sig)
        if entries is not None and not entries and sig not in self.said:
            # One more than the run had at the checkpoint: the script makes such loaders anew, so the run may
            # have made a new one (drawing a seed) where the relaunch took the run's to go on.
            self.said.add(sig)
            _say(f"warning: loader {st.sig}: the script makes new loaders of it while training; the first one made "
                 "after this resume went on from the persistent workers the run had at the checkpoint, so if the "
                 "run made a new one there instead, the random draws after the resume differ from the run's")
        if not entries:
            return None
        _, states, seed = entries.pop(0)
        if states is not None and len(states) != loader.num_workers:
            states = None
        if states is None:
            _say(f"warning: loader {st.sig}: its persistent workers had loaded batches the loop never took when the "
                 "checkpoint was taken (an epoch left early), so their random state then is not known; they start "
                 "again from the run's worker seed, and what they draw at random may differ")
        drawn_from = loader.generator if loader.generator is not None else torch.default_generator
        return states, seed, 0, drawn_from

    def pending(self, sig: tuple) -> list[dict]:
        """The checkpoint's entries of ``sig`` no loader took yet, as saved (a later snapshot keeps them)."""
        return [entry for entry, _, _ in self.by_sig.get(sig, [])]
