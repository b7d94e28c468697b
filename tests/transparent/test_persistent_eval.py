"""A validation DataLoader with persistent workers, iterated before the checkpoint: the run's next validation
reuses its iterator (no new worker seed drawn from the main process's generator, workers that go on from
their states). A relaunch made a new iterator there. It drew one number more from the main generator, so
every dropout mask after the restore differed: the resumed weights were silently not the run's (and the
validation's own noise came from newly seeded workers)."""
import re
import signal
from pathlib import Path

import pytest

from transparent_helpers import clean_env, killed_and_relaunched, load, run_script, tree_equal, zygote

SCRIPT = Path(__file__).with_name("persistent_eval_train.py")


def _plain(tmp_path: Path, mode: str):
    out = tmp_path / f"plain-{mode}.pt"
    r = zygote.shared().run_path(SCRIPT, [out], env=clean_env(MODE=mode), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return load(out)


def _same(got: dict, ref: dict) -> bool:
    """The weights (the main generator: dropout after the resume) and the validation losses (the workers'
    generators: the validation's noise)."""
    return tree_equal(got["model"], ref["model"]) and tree_equal(got["losses"], ref["losses"])


@pytest.mark.parametrize("mode,kill_at,resumed", [
    ("steps", 7, r"step [46] \(epoch 0"),  # validations at steps 3 and 6 before it, the next after the restore
    # The relaunch validates at the skipped epoch 0's end, before the restore: its workers are not the run's.
    ("epoch", 13, r"step 1[02] \(epoch 1"),
], ids=["every_3_steps", "each_epoch_end"])
def test_a_persistent_validation_loader_resumes_training_and_validation_exactly(tmp_path, mode, kill_at, resumed):
    out = tmp_path / "out.pt"
    first, second = killed_and_relaunched(SCRIPT, out, tmp_path, kill_at, 2, MODE=mode, STEP_SLEEP="0.1")
    assert "warning" not in first.stderr + second.stderr, second.stderr
    assert re.search(r"pyckpt: resumed from " + resumed, second.stderr), second.stderr
    assert _same(load(out), _plain(tmp_path, mode))


@pytest.mark.parametrize("mode,kills,resumed", [
    ("steps", "7,9", "step 8 (epoch 0, batch 8)"),
    ("epoch", "13,15", "step 14 (epoch 1, batch 6)"),  # the first relaunch shut its own validation's down
], ids=["every_3_steps", "each_epoch_end"])
def test_a_second_relaunch_before_the_first_relaunchs_next_validation_resumes_exactly(tmp_path, mode, kills, resumed):
    """The first relaunch's snapshot at step 8 (14) comes before its next validation: it must carry the run's
    persistent iterator on, not yet taken by any loader, for the second relaunch."""
    out, env = tmp_path / "out.pt", dict(MODE=mode, PYCKPT_DIR=tmp_path / "ckpt", PYCKPT_EVERY_STEPS="2",
                                         KILL_AT=kills, KILL_MARK=tmp_path / "mark", STEP_SLEEP="0.1")
    runs = [run_script([SCRIPT, out], tmp_path, **env) for _ in range(3)]
    assert [r.returncode for r in runs] == [-signal.SIGKILL, -signal.SIGKILL, 0], runs[-1].stderr
    assert f"pyckpt: resumed from {resumed}" in runs[2].stderr, runs[2].stderr
    assert not any("warning" in r.stderr for r in runs), [r.stderr for r in runs]
    assert _same(load(out), _plain(tmp_path, mode))


def test_a_validation_loader_made_anew_at_each_validation_resumes_exactly(tmp_path):
    """Each new loader draws its worker seed, in the run and in the relaunch alike: nothing to hold back once the
    run had dropped one (two validations by the checkpoint at step 6 or 8)."""
    out = tmp_path / "out.pt"
    first, second = killed_and_relaunched(SCRIPT, out, tmp_path, 8, 2, MODE="remade", STEP_SLEEP="0.1")
    assert "warning" not in first.stderr + second.stderr, second.stderr
    assert _same(load(out), _plain(tmp_path, "remade"))


def test_a_loader_made_anew_after_one_validation_by_the_checkpoint_is_said(tmp_path):
    """By step 4 the run had made one validation loader: taken to be kept (a Trainer's cached one looks so), the
    relaunch's next one goes on from it; the one after shows the script makes them anew: said, once."""
    first, second = killed_and_relaunched(SCRIPT, tmp_path / "out.pt", tmp_path, 6, 4, MODE="remade",
                                          STEP_SLEEP="0.1")
    assert "pyckpt: resumed from step 4" in second.stderr, second.stderr
    said = [ln for ln in second.stderr.splitlines() if ln.startswith("pyckpt: warning")]
    assert len(said) == 1 and "makes new loaders of it" in said[0] and "Noisy" in said[0], second.stderr


def test_a_validation_left_early_resumes_training_exactly_and_says_its_workers_start_over(tmp_path):
    """Left after 2 of 6 batches, its workers had loaded batches the loop never took: what they drew then is
    not known, so the relaunch's validation workers start from the run's seed (said), and training is exact."""
    out = tmp_path / "out.pt"
    first, second = killed_and_relaunched(SCRIPT, out, tmp_path, 7, 2, MODE="early", STEP_SLEEP="0.1")
    assert "warning" not in first.stderr, first.stderr
    said = [ln for ln in second.stderr.splitlines() if ln.startswith("pyckpt: warning")]
    assert len(said) == 1 and "persistent" in said[0] and "Noisy" in said[0], second.stderr
    got, ref = load(out), _plain(tmp_path, "early")
    assert tree_equal(got["model"], ref["model"]) and len(got["losses"]) == len(ref["losses"])
