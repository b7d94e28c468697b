"""A script that resumes itself from its own checkpoint (torch.load + optimizer.load_state_dict, its
own start epoch) under transparent mode: pyckpt's checkpoint and the script's compose, the newer wins
(pyckpt/own_resume.py). pyckpt counted epochs from the relaunch's first iter(): it skipped the script's
remaining epochs as finished ones (their per-epoch torch.save overwrote the script's checkpoint with the
state just loaded) and then refused, exit 2."""
from __future__ import annotations

import signal

import pytest

from transparent_helpers import HERE, load, run_script, tree_equal

SCRIPT = HERE / "train_own_resume.py"


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The uninterrupted run without pyckpt: its final state and its own last checkpoint."""
    d = tmp_path_factory.mktemp("plain")
    r = run_script([SCRIPT, d / "out.pt"], d, PYCKPT_DISABLE="1", LAST=d / "last.pt")
    assert r.returncode == 0, r.stderr
    return load(d / "out.pt"), load(d / "last.pt")


@pytest.mark.parametrize("every,kill_at,winner", [
    ("4", "37", "pyckpt"),  # pyckpt's snapshot (step 36 or 32) is newer than the script's (end of epoch 2: step 30)
    ("25", "37", "script"),  # pyckpt's (step 25) is older than the script's (step 30)
])
def test_the_newer_of_the_two_resumes_wins_and_the_run_equals_an_uninterrupted_one(tmp_path, plain, every,
                                                                                   kill_at, winner):
    env = dict(PYCKPT_DIR=tmp_path / "ckpt", PYCKPT_EVERY_STEPS=every, LAST=tmp_path / "last.pt",
               KILL_AT=kill_at, KILL_MARK=tmp_path / "mark", KILL_AFTER_COMMIT=tmp_path / "ckpt")
    first = run_script([SCRIPT, tmp_path / "out.pt"], tmp_path, **env)
    assert first.returncode == -signal.SIGKILL
    second = run_script([SCRIPT, tmp_path / "out.pt"], tmp_path, **env)
    assert second.returncode == 0, second.stderr
    assert "RESUMED OWN 2" in second.stdout
    if winner == "pyckpt":
        assert "is newer than or as new as the script's own Adam.load_state_dict() (optimizer step 30)" \
            in second.stderr, second.stderr
        assert "pyckpt: resumed from step " in second.stderr
        assert "again without data" not in second.stderr  # the script starts in pyckpt's epoch itself
    else:
        assert "the script's own Adam.load_state_dict() (optimizer step 30) is newer than pyckpt's checkpoint" \
            in second.stderr, second.stderr
        assert "pyckpt: resumed from step" not in second.stderr
    final, last = plain
    assert tree_equal(load(tmp_path / "out.pt"), final)
    assert tree_equal(load(tmp_path / "last.pt"), last)  # its own checkpoint was not overwritten with older state
