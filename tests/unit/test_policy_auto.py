"""PYCKPT_EVERY_STEPS=auto: the Young/Daly interval from the measured checkpoint cost (pyckpt/policy.py)."""
from __future__ import annotations

import math

import pytest

from pyckpt import knobs
from pyckpt.activation import startup_line
from pyckpt.errors import ConfigError
from pyckpt.policy import FIRST_AUTO_S, MIN_AUTO_S, Policy, young_daly


def _steps(policy: Policy, t: float, durations: list[float], busy: bool) -> tuple[float, float | None]:
    out = None
    for d in durations:
        t += d
        out = policy.note_step(t, busy) or out
    return t, out


def test_interval_follows_the_measured_cost_and_is_re_evaluated():
    p = Policy("auto", None, now=0.0, mtbf_hours=24)
    assert p.every_steps is None and p.every_seconds == FIRST_AUTO_S  # the first snapshot measures the cost
    t, _ = _steps(p, 0.0, [0.1] * 10, busy=False)  # no checkpoint: 0.1 s per step
    t, _ = _steps(p, t, [0.3, 0.25], busy=True)  # a checkpoint in flight: 0.2 + 0.15 s lost
    t, new = _steps(p, t, [0.1], busy=False)  # it finished: cost measured
    assert p.auto.cost == pytest.approx(0.35)
    assert new == p.every_seconds == pytest.approx(math.sqrt(2 * 0.35 * 24 * 3600))
    assert p.deadline == pytest.approx(p.started + p.every_seconds)
    t, _ = _steps(p, t, [0.1 + 0.05], busy=True)  # a cheaper one: smoothed, the interval shrinks
    t, new = _steps(p, t, [0.1], busy=False)
    assert p.auto.cost == pytest.approx(0.5 * 0.35 + 0.5 * 0.05)
    assert new == pytest.approx(young_daly(p.auto.cost, 24 * 3600))


def test_stall_inside_a_quick_checkpoint_counts_and_cap_and_floor_apply():
    p = Policy("auto", 30.0, now=0.0, mtbf_hours=1000)  # PYCKPT_EVERY_SECONDS caps the auto interval
    assert p.every_seconds == 30.0
    t, _ = _steps(p, 0.0, [0.1] * 5, busy=False)
    p.note_step(t + 0.5, busy=False, blocked=0.4)  # finished within the step, but it blocked 0.4 s
    p.note_step(t + 0.6, busy=False)
    assert p.auto.cost == pytest.approx(0.4) and p.every_seconds == 30.0
    q = Policy("auto", None, now=0.0, mtbf_hours=1e-9)  # absurd MTBF: never more often than MIN_AUTO_S
    t, _ = _steps(q, 0.0, [0.1] * 3 + [0.2], busy=False)
    q.note_step(t + 0.3, busy=True)
    q.note_step(t + 0.4, busy=False)
    assert q.every_seconds == MIN_AUTO_S


def test_setting_and_start_up_line():
    with knobs.override(PYCKPT_EVERY_STEPS="auto", PYCKPT_MTBF_HOURS="6"):
        assert knobs.get("PYCKPT_EVERY_STEPS") == "auto"
        line = startup_line("/ck", "auto", None, 3, 600.0)
    assert "Young/Daly" in line and "MTBF 6 h" in line and line.startswith("checkpointing to /ck ")
    with knobs.override(PYCKPT_EVERY_STEPS="often"):
        with pytest.raises(ConfigError, match="integer >= 1 or auto"):
            knobs.get("PYCKPT_EVERY_STEPS")
    with knobs.override(PYCKPT_MTBF_HOURS="0"):
        with pytest.raises(ConfigError, match="PYCKPT_MTBF_HOURS"):
            knobs.get("PYCKPT_MTBF_HOURS")


def test_the_first_snapshot_comes_well_before_a_short_mtbf():
    # A job that fails every 36 s on average never lived to a first snapshot fixed at 60 s.
    p = Policy("auto", None, now=0.0, mtbf_hours=0.01)
    assert p.every_seconds == pytest.approx(0.01 * 3600 / 10)
    assert "the first after 3.6 s" in startup_line_auto(0.01)
    q = Policy("auto", None, now=0.0, mtbf_hours=24)  # a usual MTBF: the first after 60 s
    assert q.every_seconds == FIRST_AUTO_S and "the first after 60 s" in startup_line_auto(24)
    r = Policy("auto", None, now=0.0, mtbf_hours=1e-6)  # never more often than MIN_AUTO_S
    assert r.every_seconds == MIN_AUTO_S


def startup_line_auto(mtbf_hours: float) -> str:
    with knobs.override(PYCKPT_EVERY_STEPS="auto", PYCKPT_MTBF_HOURS=str(mtbf_hours)):
        return startup_line("/ck", "auto", None, 3, 600.0)
