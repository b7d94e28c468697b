"""Loops whose training steps pyckpt sees late (gradient accumulation over many batches) or never (weights
updated from torch.autograd.grad or torch.func): checkpointed when the steps come, and said when they do not."""
import re
import signal
from pathlib import Path

from transparent_helpers import clean_env, load, run_script, tree_equal, zygote

SCRIPT = Path(__file__).with_name("unseen_steps_train.py")
NO_STEP = "pyckpt: warning: no training step in the first 16 batches"


def _plain(tmp_path: Path, mode: str, **env: str):
    out = tmp_path / f"plain-{mode}.pt"
    r = zygote.shared().run_path(SCRIPT, [out], env=clean_env(MODE=mode, **env), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return load(out)


def test_accumulation_over_more_batches_than_the_first_check_resumes_exactly(tmp_path):
    """20 batches per AdamW step: pyckpt's check after 16 batches found gradients and no step yet, said "no
    checkpoints will be taken: ... backward() is never called" and took none, so the relaunch started over."""
    out = tmp_path / "out.pt"
    env = dict(MODE="accum", PYCKPT_DIR=tmp_path / "ckpt", PYCKPT_EVERY_STEPS="2", KILL_AT="5",
               KILL_MARK=tmp_path / "mark")
    first = run_script([SCRIPT, out], tmp_path, **env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert "no checkpoints will be taken" not in first.stderr and NO_STEP not in first.stderr, first.stderr
    second = run_script([SCRIPT, out], tmp_path, **env)
    assert second.returncode == 0, second.stderr
    # (step 4's snapshot may still be in flight at the kill, right after step 5: then step 2's)
    assert re.search(r"pyckpt: resumed from step [24] \(epoch 0, batch [48]0\)", second.stderr), second.stderr
    assert tree_equal(load(out), _plain(tmp_path, "accum"))


def test_weights_updated_from_autograd_grad_are_said_to_be_unseen(tmp_path):
    """No optimizer and no backward(): no step to snapshot at. It was silent (no checkpoint, a relaunch
    started over without a word); now one warning line names the reason, and the run's result is its own."""
    r = run_script([SCRIPT, tmp_path / "out.pt"], tmp_path, MODE="autograd_grad", PYCKPT_DIR=tmp_path / "ckpt")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(NO_STEP)]
    assert len(lines) == 1 and "the model's weights changed" in lines[0] and "torch.autograd.grad" in lines[0], \
        r.stderr
    assert tree_equal(load(tmp_path / "out.pt"), _plain(tmp_path, "autograd_grad"))


def test_parameters_the_loop_holds_under_torch_func_are_said_to_be_unseen(tmp_path):
    r = run_script([SCRIPT, tmp_path / "out.pt"], tmp_path, MODE="func", PYCKPT_DIR=tmp_path / "ckpt")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(NO_STEP)]
    assert len(lines) == 1 and "torch.func" in lines[0] and "weights changed" not in lines[0], r.stderr


def test_accumulation_is_not_said_to_be_unseen_and_an_evaluation_is(tmp_path):
    """backward() at each batch with the step still to come is training under way: nothing said. A loop
    with no training at all gets the line (no checkpoint is taken, and that is why)."""
    r = run_script([SCRIPT, tmp_path / "a.pt"], tmp_path, MODE="accum", ACCUM="40", PYCKPT_DIR=tmp_path / "c1")
    assert r.returncode == 0 and NO_STEP not in r.stderr and "no checkpoints" not in r.stderr, r.stderr
    r = run_script([SCRIPT, tmp_path / "e.pt"], tmp_path, MODE="eval", PYCKPT_DIR=tmp_path / "c2")
    assert r.returncode == 0, r.stderr
    assert sum(ln.startswith(NO_STEP) for ln in r.stderr.splitlines()) == 1, r.stderr
