"""A few sequences of the random SIGKILL fuzz (kill_fuzz.py) in the suite: random settings, kills at
random moments, relaunches; each final state must be bitwise that of a plain run without pyckpt."""
import random
from pathlib import Path

import pytest

import kill_fuzz
from forked import patched  # noqa: F401 - the fixture

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.usefixtures("patched")  # each run forked from the session's zygote (tests/forked.py)
def test_random_kills_and_relaunches_end_bitwise_as_a_plain_run(tmp_path):
    lines: list[str] = []
    # train_single.py: dropout draws from torch's generator in every step, so a resume that put back
    # the wrong random state, data position or optimizer state ends with other weights.
    outcomes = kill_fuzz.run(EXAMPLES / "train_single.py", ["--step-sleep", "0.05", "--samples", "96"], 1,
                             tmp_path, seed=3, sequences=3, first_after_commit=True, say=lines.append)
    assert len(outcomes) == 3
    assert all(o.ok for o in outcomes), "\n".join(lines)
    # The first sequence's first kill came after a commit, so some relaunch resumed from a checkpoint
    # (a fuzz whose relaunches all started afresh would prove nothing about resuming).
    assert any(o.resumed for o in outcomes), "\n".join(lines)


def test_random_settings_cover_the_memory_tier_and_both_capture_modes():
    rnd = random.Random(0)
    seen = [kill_fuzz.random_settings(rnd) for _ in range(40)]
    assert any("PYCKPT_SHM_MB" in s for s in seen) and any("PYCKPT_SHM_MB" not in s for s in seen)
    assert {s["PYCKPT_LAZY"] for s in seen} == {"0", "1"}
    assert {s["PYCKPT_INCREMENTAL"] for s in seen} == {"0", "1"}
    assert all(("PYCKPT_STORAGE_EVERY" in s) == ("PYCKPT_SHM_MB" in s) for s in seen)
