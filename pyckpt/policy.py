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

import math
import statistics
import time
from typing import Any

DEFAULT_EVERY_SECONDS = 600.0  # used when neither PYCKPT_EVERY_STEPS nor PYCKPT_EVERY_SECONDS is set
POLL_S = 0.2
MARGIN = 2
FIRST_AUTO_S = 60.0  # PYCKPT_EVERY_STEPS=auto: the first snapshot, which measures the cost, comes after this
FIRST_AUTO_MTBF = 0.1  # ... or after this fraction of the MTBF when sooner: a job that fails every 30 s lives to one
MIN_AUTO_S = 1.0  # never snapshot more often than this, whatever the cost measured
BASELINE_STEPS = 20  # step times (no checkpoint in flight) whose median is the no-checkpoint step time


def young_daly(cost_s: float, mtbf_s: float) -> float:
    """Young/Daly's first-order optimum checkpoint interval ``sqrt(2 * C * MTBF)`` in seconds."""
    return math.sqrt(2.0 * cost_s * mtbf_s)


def first_auto_s(mtbf_hours: float) -> float:
    """Seconds to ``auto``'s first snapshot, which measures the cost: 60 s, or a tenth of the MTBF when
    that is sooner (never under ``MIN_AUTO_S``)."""
    return max(min(FIRST_AUTO_S, FIRST_AUTO_MTBF * mtbf_hours * 3600.0), MIN_AUTO_S)


def describe_auto(mtbf_hours: float, cap_s: float | None = None) -> str:
    """The start-up line's words for ``PYCKPT_EVERY_STEPS=auto``."""
    cap = f", at most {cap_s:g} s (PYCKPT_EVERY_SECONDS)" if cap_s is not None else ""
    first = first_auto_s(mtbf_hours)
    return (f"at an interval chosen from the measured cost C (Young/Daly sqrt(2*C*MTBF), MTBF {mtbf_hours:g} h "
            f"from PYCKPT_MTBF_HOURS; the first after {min(first, cap_s or first):g} s measures C"
            f"{cap})")


class AutoInterval:
    """``PYCKPT_EVERY_STEPS=auto``: the snapshot interval from the measured cost of a checkpoint.

    The cost C of one checkpoint is the training time it takes away: over the
    steps while it is in flight (armed, copying, writing), the sum of each
    step's time above the median step time without one. That covers the stall
    at the snapshot point, a wait before the next step, and the slowdown of
    steps by the background copy and write competing for the machine."""

    def __init__(self, mtbf_hours: float, cap_s: float | None = None) -> None:
        self.mtbf_s = mtbf_hours * 3600.0
        self.mtbf_hours, self.cap_s = mtbf_hours, cap_s
        self.cost: float | None = None  # seconds per checkpoint, once one was measured
        self.quiet: list[float] = []  # recent step times with no checkpoint in flight
        self.extra = 0.0
        self.in_flight = False
        self.last: float | None = None
        self.measured = 0

    def interval(self) -> float:
        """Seconds between snapshots now."""
        if self.cost is None:
            t = first_auto_s(self.mtbf_hours)
        else:
            t = max(young_daly(self.cost, self.mtbf_s), MIN_AUTO_S)
        return min(t, self.cap_s) if self.cap_s is not None else t

    def note_step(self, now: float, busy: bool, blocked: float = 0.0) -> float | None:
        """Called as each step starts; ``busy``: a checkpoint was in flight during the step before
        (or ``blocked`` > 0 s were spent on one). Returns the new cost when a checkpoint's cost was
        just measured, else None."""
        last, self.last = self.last, now
        if last is None:
            return None
        dt = now - last
        if busy or blocked > 0:
            if self.quiet:
                self.extra += max(0.0, dt - statistics.median(self.quiet))
            self.in_flight = True
            return None
        self.quiet = (self.quiet + [dt])[-BASELINE_STEPS:]
        if not self.in_flight:
            return None
        self.in_flight, cost, self.extra = False, self.extra, 0.0
        # Smoothed: one checkpoint slowed by an unrelated hiccup must not halve the interval.
        self.cost = cost if self.cost is None else 0.5 * self.cost + 0.5 * cost
        self.measured += 1
        return self.cost


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

    def __init__(self, every_steps: int | str | None, every_seconds: float | None, now: float | None = None,
                 mtbf_hours: float | None = None) -> None:
        self.auto: AutoInterval | None = None
        if every_steps == "auto":  # a time trigger whose interval follows the measured cost
            if mtbf_hours is None:
                from . import knobs

                mtbf_hours = knobs.get("PYCKPT_MTBF_HOURS")
            self.auto = AutoInterval(mtbf_hours, every_seconds)
            every_steps, every_seconds = None, self.auto.interval()
        if every_steps is None and every_seconds is None:
            every_seconds = DEFAULT_EVERY_SECONDS
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.agreement: StoreAgreement | None = None
        self.forced = False
        self.target: int | None = None
        self.next_poll = 0.0
        self.restart_timer(time.monotonic() if now is None else now)

    def note_step(self, now: float, busy: bool, blocked: float = 0.0) -> float | None:
        """With ``auto``: feed one step's timing (``AutoInterval.note_step``); when a checkpoint's cost
        was measured, the interval is re-evaluated and returned (else None)."""
        if self.auto is None or self.auto.note_step(now, busy, blocked) is None:
            return None
        self.every_seconds = self.auto.interval()
        self.deadline = self.started + self.every_seconds
        self.next_poll = min(self.next_poll, self.deadline)
        return self.every_seconds

    def restart_timer(self, now: float) -> None:
        """Called after every snapshot (and at start): the time trigger counts from here."""
        self.started = now
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
