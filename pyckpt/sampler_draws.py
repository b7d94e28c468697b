"""Random numbers an index sampler draws from the global generators in the middle of an epoch's iterator.

timm's ``MultiEpochsDataLoader`` (one iterator for the whole run, over a batch sampler repeated forever)
and endless samplers that re-shuffle at each pass: a ``RandomSampler`` without a generator of its own
draws each pass's seed from torch's global generator when the previous pass ends, in the middle of the
loader's iterator, and the training steps (dropout) draw from the same generator between fetches. A
relaunch skipping to the checkpoint's batch pulls the skipped index batches back to back at its first
fetch: the pass drew from another state, and the batches after the restore were other ones, silently.

So the index batches pulled from the sampler's iterator past its length (all of them for a sampler
without ``len()``) are watched (``loader_state._Skipping``), and the first ``PROBED`` after the first of
every iterator: a sampler seen drawing there draws per batch, and every later pull is watched. The CPU
streams (torch's, Python's ``random``, NumPy's global) that changed while a watched pull ran were drawn
by the sampler, and their states before it are kept with the pull's number. The relaunch puts each
back right before it pulls that index batch again, and its own state after. The first pull's draws (a
``RandomSampler``'s permutation) are covered by the epoch's start state (``loader_state``'s ``epoch_rng``
and ``first_rng``), so an ordinary loader keeps nothing.

At most ``KEPT`` draws per epoch iterator are kept (one per pass of a repeated ``RandomSampler``: a run of
a thousand epochs on one iterator); a resume in an iterator that dropped some says so. The three states
are read whole before each watched pull, Python's and NumPy's in place (``python_state``, ``numpy_state``:
0.4 and 0.5 us rather than ``getstate()``'s 6 and ``get_state()``'s 30, one-off probes on the 2-vCPU
development box) and converted only when kept, so every draw is kept from the first.

Stored form (a snapshot's loader position, ``sampler_draws``): ``{"at": [pull number per draw], "lost":
draws not kept, "every", "from_python", "from_numpy": the flags of ``Draws``}`` plus
``epoch_gaps.pack_states``' tables of the states.
"""
from __future__ import annotations

from typing import Any

from . import epoch_gaps, rng

KEPT = 1024
PROBED = 2  # pulls after the first watched in every epoch iterator (and all past the sampler's length)


def watched(draws: "Draws", n: int, length: int | None) -> bool:
    """Whether pull ``n`` of an iterator over a sampler of ``length`` index batches (None: no ``len()``) is
    watched: not the first (the epoch's start state covers it); the next ``PROBED``; every one past the
    length (a sampler repeated forever, whose ``len()`` is one pass or none); all of them once the sampler
    drew inside its length after the first (a sampler drawing per batch)."""
    return n > 0 and (n <= PROBED or draws.every or length is None or n >= length)


class Draws:
    """The draws of one epoch iterator's sampler: ``states[i]`` (``rng.restore_some``'s form) before pull
    ``at[i]``."""

    def __init__(self, before: "Draws | None" = None) -> None:
        """``before``: the previous epoch's, whose knowledge of the streams its sampler drew from is kept."""
        self.at: list[int] = []
        self.states: list[dict[str, Any]] = []
        self.lost = 0  # draws not kept (beyond KEPT, or from NumPy imported by the pull itself)
        # The sampler drew from Python's / NumPy's generator (kept with the draws; every state is read anyway)
        self.python = before.python if before is not None else False
        self.numpy = before.numpy if before is not None else False
        # The sampler drew at a pull inside its declared length, past the first: every pull is watched
        self.every = before.every if before is not None else False
        self._stored: dict[str, Any] | None = None

    def add(self, n: int, state: dict[str, Any] | None, unread: bool = False) -> None:
        """A draw at pull ``n`` from ``state`` (None: nothing kept); ``unread``: it drew from a stream whose
        state was not read."""
        self.lost += unread
        if state:
            self.at.append(n)
            self.states.append(state)
            if len(self.at) > KEPT:
                self.at.pop(0)
                self.states.pop(0)
                self.lost += 1
        self._stored = None

    def replay(self) -> dict[int, dict[str, Any]]:
        """{pull number: the state to draw it from}."""
        return dict(zip(self.at, self.states))

    def stored(self) -> dict[str, Any]:
        """The form a snapshot's loader position holds (above); built once per draw, not per snapshot."""
        if self._stored is None:
            self._stored = {"at": list(self.at), "lost": self.lost, "every": self.every,
                            "from_python": self.python, "from_numpy": self.numpy,
                            **epoch_gaps.pack_states(self.states)}
        return self._stored

    @classmethod
    def parse(cls, saved: Any) -> "Draws | None":
        """``stored()``'s form back, checked (nothing read from a checkpoint is trusted unchecked); None when
        malformed."""
        try:
            at, lost = saved["at"], saved["lost"]
            if not (isinstance(at, list) and all(type(n) is int and n > 0 for n in at)
                    and type(lost) is int and lost >= 0):
                return None
            states = epoch_gaps.unpack_states(saved, KEPT)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError):
            return None
        if states is None or len(states) != len(at) or any(s is None for s in states):
            return None
        d = cls()
        d.at, d.states, d.lost = list(at), states, lost
        # What was learnt of the sampler goes on after a resume (absent in checkpoints written before)
        d.every, d.python, d.numpy = (saved.get(k) is True for k in ("every", "from_python", "from_numpy"))
        return d


def before(draws: Draws) -> tuple:
    """What ``drawn`` compares with, taken right before a pull (a few microseconds): ``rng.cpu_raw()``."""
    return rng.cpu_raw()


def drawn(draws: Draws, n: int, then: tuple, length: int | None = None) -> None:
    """After pull ``n`` (of a sampler of ``length`` index batches): keep the states of the streams it drew
    from (``then``: ``before``'s)."""
    moved = rng.cpu_moved(then, rng.cpu_raw())
    draws.python |= "python" in moved
    draws.numpy |= "numpy" in moved
    state = rng.cpu_saved(then, moved)
    unread = "numpy" in moved and then[2] is None  # NumPy imported by the pull itself
    if state or unread:
        if length is not None and n < length:
            draws.every = True  # (before add(), which renews what stored() gives)
        draws.add(n, state, unread)
