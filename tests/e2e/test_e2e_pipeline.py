"""SIGKILL an unmodified script whose data pipeline draws random numbers in worker processes,
relaunch, get the plain run's batches bitwise (issue 6 item 5).

examples/train_augment.py: 11 batches of 4 per epoch, one optimizer step per batch, 3 epochs,
2 worker processes augmenting every sample with torch, Python ``random`` and NumPy draws.
Every kill lands where the batch position is odd (the next batch belongs to worker 1), so a
resume that restarted the workers from their epoch seeds, or from worker 0, would differ.
"""
from __future__ import annotations

import pytest

import _harness
from e2e_helpers import (Example, Reference, after_commit, assert_resumed_exactly, kill_and_relaunch, launch_and_kill,
                         pyckpt_env, run_plain)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("pyckpt_installed")]

AUGMENT = Example("train_augment.py", steps=33)
FLAGS = ["--persistent-workers", "--paired"]


def _two_kills(example: Example, ckpt, out, first: int, second: int):
    """A kill chain (every 5 steps): SIGKILL right after the commit of step ``first``, relaunch and
    SIGKILL right after that of ``second``, relaunch to the end. Checks the middle run resumed from
    ``first`` and went on at the next step; returns the Crash of the second kill."""
    env = pyckpt_env(ckpt, every_steps=5)
    launch_and_kill(example.command(out), env, out, after_commit(ckpt, first))
    # The kill lands within a few ms of the commit of ``first`` unless the machine stalls the
    # harness for a whole checkpoint interval (seen once on 2 loaded cores): the middle run then
    # starts from the later commit, which is still before ``second`` and tests the same thing.
    landed = _harness.committed_steps(ckpt)[-1]
    assert first <= landed < second, (landed, first, second)
    crash = kill_and_relaunch(example.command(out), env, ckpt, out, after_commit(ckpt, second))
    middle = _harness.resume_line(crash.killed.stderr)
    assert middle is not None and middle["step"] == landed, crash.killed.stderr[-2000:]
    assert crash.killed.steps()[0][0] == landed + 1, crash.killed.stdout[-1000:]  # no repeat or gap
    return crash


def test_random_augmentation_in_workers_resumes_exactly_mid_epoch(references, tmp_path):
    # A chain of two kills. Step 5's snapshot is taken before batch 5 of epoch 0: worker 1's, which
    # has loaded 2 batches; the relaunch is killed again right after the commit of step 20 (before
    # batch 9 of epoch 1, worker 1's again) and the second relaunch runs to the end.
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = _two_kills(AUGMENT, ckpt, out, 5, 20)
    assert crash.resume is not None and crash.resume["step"] == 20, crash.resumed.stderr[-2000:]
    assert_resumed_exactly(crash, references.get(AUGMENT), out)


def test_persistent_workers_and_a_zipped_loader_resume_exactly_past_epoch_0(tmp_path):
    # Step 16's snapshot is taken before batch 5 of epoch 1. Persistent workers were seeded once,
    # at epoch 0, and carry their generators across epochs; the unlabelled loader zipped with the
    # training loader is the one fetched last before each step, so the training loader is the
    # second stream to position (its epoch 0 finished, its epoch 1 at batch 5).
    ref_out, ckpt, out = tmp_path / "plain.pt", tmp_path / "ckpt", tmp_path / "final.pt"
    plain = run_plain(AUGMENT.command(ref_out, sleep=None) + FLAGS)
    reference = Reference(_harness.load_state(ref_out), plain.steps())
    assert [s for s, _, _ in reference.steps] == list(range(1, AUGMENT.steps + 1))
    crash = kill_and_relaunch(AUGMENT.command(out) + FLAGS, pyckpt_env(ckpt, every_steps=8), ckpt, out,
                              after_commit(ckpt, 16))
    assert crash.resume["epoch"] == 1 and crash.resume["batch"] == 5, crash.resume
    assert_resumed_exactly(crash, reference, out)


ITERABLE = Example("train_iterable_state.py", steps=30)  # 3 epochs x 10 batches of 4 records


def test_iterable_dataset_with_state_dict_is_positioned_through_it(references, tmp_path):
    # Step 15's snapshot is taken before batch 5 of epoch 1. The dataset's own state (pass 1,
    # record 20) is saved and loaded back: the relaunch reads only the 60 records from there on,
    # where loading and dropping batches would read 20 more (and replay epoch 1 with epoch 0's
    # shuffle: a fresh dataset object has not counted the skipped pass). Before that, a first run is
    # killed mid-epoch 0 (after the commit of step 5) and resumed: a chain of two kills.
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = _two_kills(ITERABLE, ckpt, out, 5, 15)
    assert crash.resume is not None and crash.resume["step"] == 15, crash.resumed.stderr[-2000:]
    assert "records read 60" in crash.resumed.stdout, crash.resumed.stdout[-500:]
    assert_resumed_exactly(crash, references.get(ITERABLE), out)
