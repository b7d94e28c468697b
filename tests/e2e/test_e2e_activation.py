"""The other two ways in (``import pyckpt``, ``pyckpt-run``) and bad settings."""
from __future__ import annotations

import os
import signal

import pytest

import _harness
from e2e_helpers import DDP, RUN_TIMEOUT_S, SINGLE, STEP_SLEEP, KILL_TIMEOUT_S, \
    assert_lines_match, assert_resumed_exactly, assert_state_equal, at_step, kill_and_relaunch, \
    pyckpt_env

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("pyckpt_installed")]


def test_import_pyckpt_line_resumes_exactly(references, tmp_path):
    # The practitioner's script with one added first line, run from its own
    # directory without PYCKPT_DIR: checkpoints go to ./pyckpt-checkpoints.
    script = tmp_path / SINGLE.script
    script.write_text("import pyckpt\n" + SINGLE.path.read_text())
    out, ckpt = tmp_path / "final.pt", tmp_path / "pyckpt-checkpoints"
    crash = kill_and_relaunch(SINGLE.command(out, script=script), pyckpt_env(None, every_steps=3),
                              ckpt, out, at_step(8), cwd=tmp_path)
    assert_resumed_exactly(crash, references.get(SINGLE), out)


def _steps_of_two_attempts(steps: list[int], resumed_from: int, total: int) -> bool:
    """True if ``steps`` is 1..K from the first attempt then resumed_from+1..total, K >= resumed_from."""
    k = len(steps) - (total - resumed_from)
    return k >= resumed_from and steps == list(range(1, k + 1)) + list(range(resumed_from + 1, total + 1))


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.usefixtures("pyckpt_run_installed")
def test_wrapper_restarts_a_killed_worker_which_resumes(references, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    cmd = _harness.wrapper_command() + [
        "--dir", str(ckpt), "--every-steps", "2", "--nproc-per-node", "2",
        str(DDP.path), "--out", str(out), "--step-sleep", STEP_SLEEP]
    run = _harness.launch(cmd, _harness.clean_env())
    assert run.wait_until(lambda: at_step(7)(run), KILL_TIMEOUT_S), \
        f"never reached step 7:\n{run.stderr[-3000:]}"
    workers = _harness.elastic_workers(run.popen.pid)
    assert sorted(workers) == [0, 1], f"expected two workers under the wrapper, found {workers}"
    os.kill(workers[1], signal.SIGKILL)
    committed = _harness.committed_steps(ckpt)

    rc = run.finish(RUN_TIMEOUT_S)
    assert rc == 0, f"pyckpt-run exited with {rc}:\n{run.stderr[-3000:]}"
    resume = _harness.resume_line(run.stderr)
    assert resume, f"the restarted workers did not resume:\n{run.stderr[-3000:]}"
    assert committed and resume["step"] >= committed[-1]
    # One start-up line per attempt, from rank 0 only (never from the agent or rank 1).
    assert run.stderr.count(f"pyckpt: checkpointing to {ckpt} every 2 steps, keep 3\n") == 2, run.stderr[-3000:]
    steps = [s for s, _, _ in run.steps()]
    assert _steps_of_two_attempts(steps, resume["step"], DDP.steps), steps
    reference = references.get(DDP)
    assert_lines_match(run, reference)
    assert_state_equal(reference, out)


@pytest.mark.parametrize("setting", ["PYCKPT_EVERY_STEPS", "PYCKPT_DIR"])
def test_bad_setting_stops_the_job_before_training(setting, tmp_path):
    a_file = tmp_path / "a-regular-file"
    a_file.write_text("not a directory")
    if setting == "PYCKPT_EVERY_STEPS":
        env = pyckpt_env(tmp_path / "ckpt", every_steps=3, PYCKPT_EVERY_STEPS="abc")
    else:  # we may run as root, so "unwritable" means: below a regular file
        env = pyckpt_env(a_file / "ckpt", every_steps=3)
    out = tmp_path / "final.pt"
    run = _harness.launch(SINGLE.command(out, sleep=None), env)
    rc = run.finish(RUN_TIMEOUT_S)
    assert rc != 0
    assert run.steps() == [] and not out.exists(), "training started despite the bad setting"
    assert setting in run.stderr, f"the message does not name {setting}:\n{run.stderr[-2000:]}"
    if setting == "PYCKPT_EVERY_STEPS":
        assert "abc" in run.stderr
    assert "Traceback" not in run.stderr, f"expected a clear message, got:\n{run.stderr[-3000:]}"
