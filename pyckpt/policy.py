"""When to snapshot: every N steps and/or every S seconds, agreed by all ranks.

The step trigger needs no agreement: every rank counts the same steps. The
time trigger (and a SIGTERM request) does, because ranks' clocks fire at
different steps. Agreement never blocks the main thread: a blocking store
wait on one rank while another is inside an allreduce would deadlock. A rank
that wants a snapshot posts a request key; every rank polls for it with a
non-blocking ``store.check`` at most every ``POLL_S`` seconds, and once it
has seen the request posts its current step. When every rank's step is in,
each computes the same target ``max(steps) + 2``: under DDP the ranks are at
most one step apart, so no rank has passed it.
"""
from __future__ import annotations

import time
from typing import Any

DEFAULT_EVERY_SECONDS = 600.0  # used when neither PYCKPT_EVERY_STEPS nor PYCKPT_EVERY_SECONDS is set
POLL_S = 0.2
MARGIN = 2


class StoreAgreement:
    """Agree on a future step through a c10d store, with non-blocking polls only."""

    def __init__(self, store: Any, rank: int, world_size: int, prefix: str = "pyckpt-policy") -> None:
        self.store, self.rank, self.world_size, self.prefix = store, rank, world_size, prefix
        self.round = 0
        self.joined = False

    def _req(self) -> str:
        return f"{self.prefix}/{self.round}/request"

    def _post(self, r: int) -> str:
        return f"{self.prefix}/{self.round}/step/{r}"

    def request(self) -> None:
        """Ask every rank for a snapshot (idempotent within a round)."""
        self.store.set(self._req(), "1")

    def requested(self) -> bool:
        """True when some rank has asked for a snapshot this round."""
        return bool(self.store.check([self._req()]))

    def join(self, step: int) -> None:
        """Post this rank's current step for this round."""
        if not self.joined:
            self.store.set(self._post(self.rank), str(step))
            self.joined = True

    def target(self) -> int | None:
        """The agreed step once every rank has posted (then the next round starts), else None."""
        keys = [self._post(r) for r in range(self.world_size)]
        if not self.store.check(keys):
            return None
        steps = [int(self.store.get(k)) for k in keys]
        self.round += 1
        self.joined = False
        return max(steps) + MARGIN


class Policy:
    """Decides, at each counted step, whether a snapshot is due at the next consistent point."""

    def __init__(self, every_steps: int | None, every_seconds: float | None, now: float | None = None) -> None:
        if every_steps is None and every_seconds is None:
            every_seconds = DEFAULT_EVERY_SECONDS
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.agreement: StoreAgreement | None = None
        self.forced = False
        self.target: int | None = None
        self.next_poll = 0.0
        self.restart_timer(time.monotonic() if now is None else now)

    def restart_timer(self, now: float) -> None:
        """Called after every snapshot (and at start): the time trigger counts from here."""
        self.deadline = now + self.every_seconds if self.every_seconds is not None else float("inf")
        self.next_poll = min(self.deadline, now + POLL_S) if self.agreement else self.deadline

    def set_agreement(self, agreement: StoreAgreement | None) -> None:
        """Use ``agreement`` (multi-rank jobs) for time and SIGTERM triggers."""
        self.agreement = agreement
        self.restart_timer(time.monotonic())

    def force(self) -> None:
        """Snapshot as soon as all ranks agree (SIGTERM)."""
        self.forced = True
        self.next_poll = 0.0

    def due(self, step: int) -> bool:
        """True when a snapshot should be taken at the next consistent point after ``step``."""
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        if self.target is None and time.monotonic() < self.next_poll:
            return False
        return self._slow_path(step, time.monotonic())

    def _slow_path(self, step: int, now: float) -> bool:
        ag = self.agreement
        if ag is None:
            if self.forced or now >= self.deadline:
                self.forced = False
                return True
            self.next_poll = self.deadline
            return False
        if self.target is None:
            self.target = self._agree(ag, step, now)
        if self.target is not None and step >= self.target:
            self.target = None
            self.forced = False
            return True
        return False

    def _agree(self, ag: StoreAgreement, step: int, now: float) -> int | None:
        if not ag.joined:
            if self.forced or now >= self.deadline:
                ag.request()
                ag.join(step)
            elif ag.requested():
                ag.join(step)
            else:
                self.next_poll = min(self.deadline, now + POLL_S)
                return None
        target = ag.target()
        if target is None:
            self.next_poll = 0.0  # poll every step until all ranks have posted
        return target
