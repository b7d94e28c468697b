"""Loops whose training steps pyckpt sees late (gradient accumulation over many batches) or never (weights
updated from torch.autograd.grad or torch.func): checkpointed when the steps come, and said when they do not."""
import re
import signal
from pathlib import Path

import pytest

from transparent_helpers import clean_env, load, run_script, tree_equal, zygote

SCRIPT = Path(__file__).with_name("unseen_steps_train.py")
NO_STEP = "pyckpt: warning: no training step in the first 16 batches"


def _plain(tmp_path: Path, mode: str, **env: str):
    out = tmp_path / f"plain-{mode}.pt"
    r = zygote.shared().run_path(SCRIPT, [out], env=clean_env(MODE=mode, **env), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return load(out)


@pytest.mark.parametrize("mode", ["accum", "prefetch"])
def test_accumulation_over_more_batches_than_the_first_check_resumes_exactly(tmp_path, mode):
    """20 batches per AdamW step. accum: pyckpt's check after 16 batches found gradients and no step yet, said "no
    checkpoints will be taken: ... backward() is never called" and took none, so the relaunch started over.
    prefetch (each window's batches fetched first, as Hugging Face's Trainer does): no gradient and no step
    at the check, which is no reason to say anything either."""
    out = tmp_path / "out.pt"
    env = dict(MODE=mode, PYCKPT_DIR=tmp_path / "ckpt", PYCKPT_EVERY_STEPS="2", KILL_AT="5",
               KILL_MARK=tmp_path / "mark")
    first = run_script([SCRIPT, out], tmp_path, **env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert "warning" not in first.stderr, first.stderr
    second = run_script([SCRIPT, out], tmp_path, **env)
    assert second.returncode == 0, second.stderr
    # (step 4's snapshot may still be in flight at the kill, right after step 5: then step 2's)
    assert re.search(r"pyckpt: resumed from step [24] \(epoch 0, batch [48]0\)", second.stderr), second.stderr
    assert "warning" not in second.stderr, second.stderr
    assert tree_equal(load(out), _plain(tmp_path, mode))


@pytest.mark.parametrize("mode", ["autograd_grad", "func"])
def test_weights_updated_from_autograd_grad_or_torch_func_are_said_to_be_unseen(tmp_path, mode):
    """No optimizer and no backward(): no step to snapshot at. It was silent (no checkpoint, a relaunch
    started over without a word); now one warning line names the reason, and the run's result is its own."""
    r = run_script([SCRIPT, tmp_path / "out.pt"], tmp_path, MODE=mode, PYCKPT_DIR=tmp_path / "ckpt",
                   PYCKPT_EVERY_STEPS="2")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(NO_STEP)]
    assert len(lines) == 1 and "torch.autograd.grad" in lines[0], r.stderr
    assert tree_equal(load(tmp_path / "out.pt"), _plain(tmp_path, mode))
    assert not list((tmp_path / "ckpt").glob("step-*")), list((tmp_path / "ckpt").iterdir())


def test_an_evaluation_and_a_longer_accumulation_are_not_said_to_be_unseen(tmp_path):
    """backward() at each batch with the step still to come is training under way; a loop computing no
    gradient trains nothing: neither is a loop whose steps pyckpt cannot see."""
    for mode, extra in (("accum", {"ACCUM": "40"}), ("eval", {})):
        r = run_script([SCRIPT, tmp_path / f"{mode}.pt"], tmp_path, MODE=mode, PYCKPT_DIR=tmp_path / f"c-{mode}",
                       **extra)
        assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
