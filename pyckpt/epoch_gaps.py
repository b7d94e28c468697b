"""The random states the script's per-epoch code drew from, for every gap between two epochs.

A relaunch resuming in epoch E runs the code of epochs 0..E-1 again without data (the loader's
iterators end at once), so its per-epoch code (between one epoch's end and the next one's ``iter()``)
draws from other states than originally: the steps that drew between them (dropout, augmentation in
the main process) are not run. The state at the end of epoch E-1 was saved and put back, which makes
the code right before epoch E draw what it drew. Code whose effect carries over from epoch to epoch (a
dataset's order shuffled in place at each epoch's start, the Keras-style ``on_epoch_end``) still
depended on the earlier gaps: epoch E trained on another order, silently.

So each gap's state is kept: at the next ``iter()``, the CPU streams (Python's ``random``, torch's,
NumPy's global) that changed since the epoch ended were drawn by that gap's code, and their states at
the epoch's end are kept (a gap that drew nothing keeps nothing); the relaunch puts them back where its
skipped epoch ends. At most ``KEPT`` gaps are kept; a resume that needs an older one that drew says so.

Stored form (a snapshot's loader position, ``past_ends``): one tensor per stream for all gaps, not
three per gap (256 gaps as 768 small tensors took 8 ms to encode at every snapshot, 0.05 ms as three:
a one-off probe on the 2-vCPU development box)::

    {"first": gap index of the first kept gap, "lost": gaps dropped beyond KEPT that had drawn,
     "drew": per kept gap, the streams it drew from ("", or letters of "p", "t", "n"),
     "python": {"words": int64 [n, 625], "version": [n], "gauss": [n]},
     "torch": uint8 [n, state size],
     "numpy": {"keys": int64 [n, 624], "pos": [n], "has_gauss": [n], "gauss": [n]}}

with a row per gap that drew from that stream, in gap order.
"""
from __future__ import annotations

from typing import Any

import torch

from . import rng

KEPT = 256
_LETTER = {"python": "p", "torch": "t", "numpy": "n"}


def drawn_between(end: tuple, now: tuple) -> dict[str, Any] | None:
    """The streams of raw state ``end`` (``rng.cpu_raw``'s) that differ in ``now``, in the checkpoint's form
    (``rng.restore_some`` puts them back); None: none drew."""
    return rng.cpu_saved(end, rng.cpu_moved(end, now)) or None


class Gaps:
    """One stream's gap states: ``states[i]`` is gap ``first + i`` (gap k: after epoch k, 0-based), each
    the streams it drew from in ``rng.restore_some``'s form, or None."""

    def __init__(self) -> None:
        self.states: list[dict[str, Any] | None] = []
        self.first = 0
        self.lost = 0  # gaps dropped beyond KEPT that had drawn
        self._stored: dict[str, Any] | None = None  # built once per gap, not at every snapshot

    def close(self, end: tuple | None, now: tuple) -> None:
        """The next epoch starts: the gap after the one that ended (at raw state ``end``; None: it ended by
        ``break``, or was skipped by a relaunch) is over at raw state ``now``."""
        self.states.append(None if end is None else drawn_between(end, now))
        if len(self.states) > KEPT:
            self.lost += self.states.pop(0) is not None
            self.first += 1
        self._stored = None

    def state_of(self, gap: int) -> tuple[dict[str, Any] | None, bool]:
        """The streams saved for ``gap`` (None: it drew nothing, or none is kept), and whether it was
        dropped (beyond ``KEPT``) after drawing: the resume is then not exact."""
        i = gap - self.first
        if i < 0:
            return None, self.lost > 0
        return (self.states[i] if i < len(self.states) else None), False

    def stored(self) -> dict[str, Any]:
        """The form a snapshot's loader position holds (``past_ends``, above)."""
        if self._stored is None:
            self._stored = _pack(self)
        return self._stored

    @classmethod
    def parse(cls, saved: Any) -> "Gaps | None":
        """``stored()``'s form back, checked (nothing read from a checkpoint is trusted unchecked); None when
        malformed."""
        try:
            return _unpack(saved)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError):
            return None


def _pack(g: Gaps) -> dict[str, Any]:
    return {"first": g.first, "lost": g.lost, **pack_states(g.states)}


def pack_states(states: list) -> dict[str, Any]:
    """States in ``rng.restore_some``'s form (or None) as ``drew`` and one table per stream (the form in
    the module docstring; ``sampler_draws`` stores its states so too)."""
    rows: dict[str, list] = {"python": [], "torch": [], "numpy": []}
    drew = []
    for s in states:
        drew.append("".join(_LETTER[k] for k in ("python", "torch", "numpy") if s and k in s))
        for k in rows:
            if s and k in s:
                rows[k].append(s[k])
    py, np_ = rows["python"], rows["numpy"]
    out: dict[str, Any] = {"drew": drew}
    if py:
        out["python"] = {"words": torch.stack([p[1] for p in py]), "version": [p[0] for p in py],
                         "gauss": [p[2] for p in py]}
    if rows["torch"]:
        out["torch"] = torch.stack(rows["torch"])
    if np_:
        out["numpy"] = {"keys": torch.stack([n["keys"] for n in np_]), "name": [n["name"] for n in np_],
                        **{f: [n[f] for n in np_] for f in ("pos", "has_gauss", "gauss")}}
    return out


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _unpack(saved: Any) -> Gaps | None:
    if not (isinstance(saved, dict) and _is_count(saved.get("first")) and _is_count(saved.get("lost"))):
        return None
    states = unpack_states(saved, KEPT)
    if states is None:
        return None
    g = Gaps()
    g.first, g.lost, g.states = saved["first"], saved["lost"], states
    return g


def unpack_states(saved: dict, most: int) -> list | None:
    """``pack_states``' form back (at most ``most`` states), checked; None when malformed."""
    drew = saved.get("drew")
    if not (isinstance(drew, list) and len(drew) <= most and all(isinstance(d, str) and set(d) <= set("ptn")
                                                                 for d in drew)):
        return None
    need = {k: sum(letter in d for d in drew) for k, letter in _LETTER.items()}
    py, cpu, np_ = saved.get("python"), saved.get("torch"), saved.get("numpy")

    def table(t: Any, n: int, dtype: torch.dtype) -> bool:
        return n == 0 or (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == n and t.dtype == dtype)

    def column(d: Any, key: str, n: int) -> bool:
        return n == 0 or (isinstance(d, dict) and isinstance(d.get(key), list) and len(d[key]) == n)

    if not (table(py["words"] if need["python"] else None, need["python"], torch.int64)
            and all(column(py, k, need["python"]) for k in ("version", "gauss"))
            and table(cpu, need["torch"], torch.uint8)
            and table(np_["keys"] if need["numpy"] else None, need["numpy"], torch.int64)
            and all(column(np_, k, need["numpy"]) for k in ("name", "pos", "has_gauss", "gauss"))):
        return None
    states: list = []
    at = {"python": 0, "torch": 0, "numpy": 0}
    for d in drew:
        s: dict[str, Any] = {}
        for k, letter in _LETTER.items():
            if letter not in d:
                continue
            i = at[k]
            at[k] += 1
            if k == "python":
                s[k] = (py["version"][i], py["words"][i], py["gauss"][i])
            elif k == "torch":
                s[k] = cpu[i]
            else:
                s[k] = {"keys": np_["keys"][i], **{f: np_[f][i] for f in ("name", "pos", "has_gauss", "gauss")}}
        states.append(s or None)
    return states
