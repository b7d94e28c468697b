"""The example scripts are deterministic, and pyckpt left running changes nothing."""
from __future__ import annotations

import pytest

import _harness
from e2e_helpers import DDP, GAN, INFINITE, LORA, SINGLE, assert_lines_match, assert_state_equal, \
    pyckpt_env, run_to_end

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("example", [
    SINGLE, pytest.param(DDP, marks=pytest.mark.dist), GAN, LORA, INFINITE], ids=lambda e: e.script)
def test_two_plain_runs_are_bitwise_equal(example, references, tmp_path):
    # Every resume test compares against one plain run: that is only meaningful
    # if a second plain run reproduces it bit for bit.
    reference = references.get(example)
    again = references.plain_run(example, tmp_path / "again.pt")
    assert again.steps == reference.steps
    assert _harness.diff_states(reference.state, again.state) == []


def test_run_under_pyckpt_never_killed_equals_plain_run(pyckpt_installed, references, tmp_path):
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "final.pt"
    run = run_to_end(SINGLE.command(out, sleep=None), pyckpt_env(ckpt, every_steps=3))
    # pyckpt really was active: it committed checkpoints while training ran.
    assert _harness.committed_steps(ckpt), f"no checkpoint written; stderr:\n{run.stderr[-2000:]}"
    assert _harness.resume_line(run.stderr) is None
    reference = references.get(SINGLE)
    assert [s for s, _, _ in run.steps()] == [s for s, _, _ in reference.steps]
    assert_lines_match(run, reference)
    assert_state_equal(reference, out)
