"""SIGKILL an unmodified Hugging Face Trainer script under pyckpt, relaunch, get the exact plain result.

examples/train_trainer.py: a tiny random Llama, 11 micro-batches per epoch, accumulation
over 2, so 6 optimizer steps per epoch (the 6th on the epoch's last, lone micro-batch), 3
epochs, the Trainer's own checkpoints every 4 steps. The Trainer fetches through accelerate's
look-ahead loader and keeps its own counters (TrainerState) and epoch loop.
"""
from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

import _harness
from e2e_helpers import (KILL_TIMEOUT_S, RUN_TIMEOUT_S, Example, Reference, References, after_commit,
                         assert_lines_match, assert_resumed_exactly, assert_state_equal, kill_and_relaunch,
                         plain_reference, pyckpt_env, run_plain)

pytest.importorskip("transformers", reason="transformers is a test-only dependency (requirements-dev.txt)")

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.usefixtures("pyckpt_installed")]

TRAINER = Example("train_trainer.py", steps=18)
# torchrun, 2 gloo ranks: 6 micro-batches per rank and epoch, so 3 optimizer steps per epoch.
TRAINER_DDP = Example("train_trainer.py", nproc=2, steps=9)

# (every_steps, checkpoint step to kill right after): step 5's snapshot is taken when the Trainer
# asks for the epoch's lone last micro-batch; step 6's at the first fetch of epoch 1 (the relaunch
# skips epoch 0); step 15's mid-epoch 2 (two finished epochs skipped).
KILLS = {
    "last_batch_of_epoch": (5, 5),
    "first_batch_of_epoch": (6, 6),
    "past_epoch_0": (5, 15),
}


def _trainer_checkpoints(out: Path) -> list[str]:
    folder = out.with_suffix(".trainer")
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-"))


@pytest.mark.parametrize("kill_point", list(KILLS))
def test_trainer_resumes_exactly(kill_point, references, tmp_path):
    every, step = KILLS[kill_point]
    reference = references.get(TRAINER)
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = kill_and_relaunch(TRAINER.command(out), pyckpt_env(ckpt, every_steps=every), ckpt, out,
                              after_commit(ckpt, step))
    assert "no checkpoints will be taken" not in crash.killed.stderr + crash.resumed.stderr
    # Model, optimizer, scheduler and trainer.state.global_step, bitwise / equal.
    assert_resumed_exactly(crash, reference, out)
    # The Trainer's own checkpoints carry the same numbers as in the plain run.
    plain_out = references.root / "train_trainer.pt"
    assert _trainer_checkpoints(out) == _trainer_checkpoints(plain_out)


# transformers' DataCollatorForLanguageModeling(seed=...) masks from a generator of its own, made at its first
# call in the process that collates (remade where its `_generator_pid` is not that process's), here the main
# one, one batch ahead of the loop (accelerate's look-ahead loader). Before, the relaunch masked with another
# generator state, silently.
MASKING = ["--workers", "0", "--mask-seed", "5"]


@pytest.fixture(scope="module")
def masking_reference(tmp_path_factory) -> Reference:
    return plain_reference(TRAINER, tmp_path_factory.mktemp("trainer_masking") / "plain.pt", MASKING)


def test_trainer_with_a_seeded_masking_collator_resumes_exactly(masking_reference, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = kill_and_relaunch(TRAINER.command(out) + MASKING, pyckpt_env(ckpt, every_steps=3), ckpt, out,
                              after_commit(ckpt, 9))
    assert "warning" not in crash.resumed.stderr, crash.resumed.stderr[-3000:]
    assert_resumed_exactly(crash, masking_reference, out)


# The Trainer caches its evaluation DataLoader when dataloader_persistent_workers=True and reuses its iterator at
# every later evaluation: no worker seed drawn from the main generator. The relaunch made a new one at its first
# evaluation after the restore, drawing one number more: the attention dropout after it differed, silently, and
# the evaluation's workers (word dropout in the collator) were seeded anew.
EVALUATING = ["--eval-steps", "4", "--persistent-workers", "--dropout", "0.1", "--word-dropout", "0.2"]


def _evals(run) -> list[str]:
    return [line for line in run.stdout_lines if line.startswith("eval ")]


@pytest.fixture(scope="module")
def evaluating_reference(tmp_path_factory) -> tuple[Reference, list[str]]:
    out = tmp_path_factory.mktemp("trainer_evaluating") / "plain.pt"
    run = run_plain(TRAINER.command(out, sleep=None) + EVALUATING)
    assert [s for s, _, _ in run.steps()] == list(range(1, TRAINER.steps + 1)), run.stdout
    return Reference(_harness.load_state(out), run.steps()), _evals(run)


def test_trainer_evaluating_with_persistent_workers_resumes_exactly(evaluating_reference, tmp_path):
    reference, evals = evaluating_reference
    assert [e.split()[1] for e in evals] == ["4", "8", "12", "16", "18"], evals
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = kill_and_relaunch(TRAINER.command(out) + EVALUATING, pyckpt_env(ckpt, every_steps=3), ckpt, out,
                              after_commit(ckpt, 9))  # past the evaluations at steps 4 and 8
    assert "warning" not in crash.killed.stderr + crash.resumed.stderr, crash.resumed.stderr[-3000:]
    assert_resumed_exactly(crash, reference, out)  # the weights: the dropout after the resume
    after = _evals(crash.resumed)
    assert after and after == evals[-len(after):]  # the evaluations after it: its workers' word dropout


# ----------------------------------------------------------------------------- the Trainer's own resume too
# examples/train_trainer.py --resume: as the Hugging Face example scripts do, the script passes the
# newest checkpoint-N of its output dir to trainer.train(resume_from_checkpoint=...). pyckpt resumes
# from whichever checkpoint is newer and says which; the run ends as the plain run does.
RESUME_SLEEP = "0.2"  # seconds per step: room between the kill point and the next checkpoint of either kind
WON_RE = re.compile(r"pyckpt: resume: (pyckpt's checkpoint|the Trainer's checkpoint) \S+ \(step (\d+)\) is newer")


def _trainer_checkpoint_written(out: Path, step: int):
    """The Trainer's checkpoint-``step`` is complete (trainer_state.json is written last)."""
    return lambda run: (out.with_suffix(".trainer") / f"checkpoint-{step}" / "trainer_state.json").is_file()


def _newest_trainer_step(out: Path) -> int:
    steps = [int(name.split("-")[1]) for name in _trainer_checkpoints(out)
             if (out.with_suffix(".trainer") / name / "trainer_state.json").is_file()]
    return max(steps, default=0)


def _launch_and_kill(cmd, env, kill_when) -> _harness.Run:
    """Launch, wait until ``kill_when(run)`` holds, SIGKILL the process tree; returns the killed run."""
    run = _harness.launch(cmd, env)
    assert run.wait_until(lambda: kill_when(run), KILL_TIMEOUT_S), run.stderr[-3000:]
    run.kill()
    return run


def _relaunch_and_check(cmd, env, ckpt: Path, out: Path, reference) -> tuple[str, _harness.Run]:
    """Relaunch after a kill and run to the end; one line names the newer checkpoint, and training
    continues right after it. Returns ("pyckpt" or "trainer", the run)."""
    pyckpt_step = max(_harness.committed_steps(ckpt), default=0)
    trainer_step = _newest_trainer_step(out)
    run = _harness.launch(cmd, env)
    rc = run.finish(RUN_TIMEOUT_S)
    won = WON_RE.findall(run.stderr)
    assert len(won) == 1, f"exit {rc}; expected one line saying which resume won:\n{run.stderr[-3000:]}"
    assert rc == 0, f"exit {rc}:\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr and "refusing to guess" not in run.stderr, run.stderr[-3000:]
    winner, step = ("pyckpt", pyckpt_step) if pyckpt_step >= trainer_step else ("trainer", trainer_step)
    assert (won[0][0].startswith("pyckpt"), int(won[0][1])) == (winner == "pyckpt", step), (won, pyckpt_step,
                                                                                          trainer_step)
    assert (winner == "pyckpt") == bool(_harness.resume_line(run.stderr)), run.stderr[-3000:]
    printed = [s for s, _, _ in run.steps()]
    assert printed[:1] == [step + 1] and printed == list(range(step + 1, printed[-1] + 1)), printed
    assert_lines_match(run, reference)
    return winner, run


def test_trainer_own_resume_newer_wins_then_pyckpt_newer_wins(references, tmp_path):
    # pyckpt every 7 steps (7, 14), the Trainer every 4 (4, 8, 12, 16). Kill 1 right after the
    # Trainer's checkpoint-8: the Trainer's resume wins, pyckpt counts on from step 8 (epoch 1, 4
    # micro-batches in). Kill 2 right after pyckpt's step 14 (the Trainer has 12): pyckpt's wins,
    # at a position recorded after the Trainer's resume.
    reference = references.get(TRAINER)
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    cmd = TRAINER.command(out, sleep=RESUME_SLEEP) + ["--resume"]
    env = pyckpt_env(ckpt, every_steps=7)
    _launch_and_kill(cmd, env, _trainer_checkpoint_written(out, 8))
    second = _launch_and_kill(cmd, env, after_commit(ckpt, 14))
    won = WON_RE.findall(second.stderr)
    assert [(w.startswith("pyckpt"), int(s)) for w, s in won] == [(False, 8)], second.stderr[-3000:]
    assert_lines_match(second, reference)
    winner, _ = _relaunch_and_check(cmd, env, ckpt, out, reference)
    assert winner == "pyckpt"
    assert_state_equal(reference, out)
    assert _trainer_checkpoints(out) == _trainer_checkpoints(references.root / "train_trainer.pt")


def test_trainer_own_resume_older_than_pyckpt(references, tmp_path):
    # pyckpt every 3 steps; killed right after its step 9 (mid-epoch 1); the Trainer's newest is 8.
    reference = references.get(TRAINER)
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    cmd = TRAINER.command(out, sleep=RESUME_SLEEP) + ["--resume"]
    env = pyckpt_env(ckpt, every_steps=3)
    _launch_and_kill(cmd, env, after_commit(ckpt, 9))
    winner, run = _relaunch_and_check(cmd, env, ckpt, out, reference)
    assert winner == "pyckpt"
    assert_state_equal(reference, out)
    assert _trainer_checkpoints(out) == _trainer_checkpoints(references.root / "train_trainer.pt")


# Put on PYTHONPATH of the run to be killed only: the Trainer's checkpoint-8 writes its trainer_state.json
# (its last file) SAVE_STALL_S late, so a SIGKILL lands inside the Trainer's own save.
SLOW_SAVE = '''
import importlib.abc, sys, time

class _SlowSave(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer_callback":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            save = module.TrainerState.save_to_json

            def slow(self, json_path):
                if "%s" in str(json_path):
                    time.sleep(%r)
                return save(self, json_path)
            module.TrainerState.save_to_json = slow
        spec.loader.exec_module = exec_module
        return spec

import importlib.util
sys.meta_path.insert(0, _SlowSave())
'''
SAVE_STALL_S = 30.0


def test_kill_during_trainer_save_with_its_own_resume(references, tmp_path):
    # pyckpt every 3 steps; SIGKILL while the Trainer writes checkpoint-8 (its trainer_state.json not
    # yet written). The script's get_last_checkpoint() names that incomplete folder; pyckpt's step 6
    # is newer than the Trainer's newest complete one (4), so pyckpt resumes, and the Trainer writes
    # checkpoint-8 again in the relaunch.
    reference = references.get(TRAINER)
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    cmd = TRAINER.command(out, sleep=RESUME_SLEEP) + ["--resume"]
    env = pyckpt_env(ckpt, every_steps=3)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SLOW_SAVE % ("checkpoint-8", SAVE_STALL_S))
    slow_env = dict(env, PYTHONPATH=str(inject) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    folder = out.with_suffix(".trainer") / "checkpoint-8"
    saving = lambda: folder.is_dir() and any(folder.iterdir()) and not (folder / "trainer_state.json").exists()
    _launch_and_kill(cmd, slow_env, lambda run: saving() and 6 in _harness.committed_steps(ckpt))
    assert not (folder / "trainer_state.json").exists()
    assert _harness.committed_steps(ckpt)[-1] == 6
    winner, run = _relaunch_and_check(cmd, env, ckpt, out, reference)
    assert winner == "pyckpt" and "checkpoint-8 (incomplete" in run.stderr, run.stderr[-3000:]
    assert_state_equal(reference, out)
    assert _trainer_checkpoints(out) == _trainer_checkpoints(references.root / "train_trainer.pt")


# ----------------------------------------------------------------------------- torchrun, 2 gloo ranks
@pytest.fixture(scope="module")
def ddp_references(tmp_path_factory) -> References:
    # The shared References cache is keyed by script name; the 2-rank run has its own.
    return References(tmp_path_factory.mktemp("trainer_ddp"))


@pytest.mark.dist
def test_trainer_torchrun_two_ranks_own_resume_sigterm_and_pyckpt_resume(ddp_references, tmp_path):
    # 3 optimizer steps per epoch on each rank, 9 in all; pyckpt every 3 steps, the Trainer every 4.
    # Kill 1 (SIGKILL) right after the Trainer's checkpoint-4: its own resume wins (pyckpt has 3) and
    # starts in epoch 1. Kill 2: SIGTERM to torchrun once step 5 is printed: every rank takes pyckpt's
    # checkpoint at the next point and exits. The relaunch resumes from pyckpt's (newer than the
    # Trainer's 4), at a position recorded after the Trainer's resume, past epoch 0.
    reference = ddp_references.get(TRAINER_DDP)
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    cmd = TRAINER_DDP.command(out, sleep=RESUME_SLEEP) + ["--resume"]
    env = pyckpt_env(ckpt, every_steps=3)
    _launch_and_kill(cmd, env, _trainer_checkpoint_written(out, 4))
    second = _harness.launch(cmd, env)
    assert second.wait_until(lambda: second.last_step() >= 5, KILL_TIMEOUT_S), second.stderr[-3000:]
    before = _harness.committed_steps(ckpt)
    os.kill(second.popen.pid, signal.SIGTERM)
    rc = second.finish(RUN_TIMEOUT_S)
    assert rc != 0 and not out.exists(), f"exit {rc}: the job trained to the end\n{second.stderr[-3000:]}"
    won = WON_RE.findall(second.stderr)
    assert [(w.startswith("pyckpt"), int(s)) for w, s in won] == [(False, 4)], second.stderr[-3000:]
    assert _harness.committed_steps(ckpt)[-1] > max(before + [4]), (before, _harness.committed_steps(ckpt))
    assert_lines_match(second, reference)
    winner, _ = _relaunch_and_check(cmd, env, ckpt, out, reference)
    assert winner == "pyckpt"
    assert_state_equal(reference, out)
    assert _trainer_checkpoints(out) == _trainer_checkpoints(ddp_references.root / "train_trainer.pt")
