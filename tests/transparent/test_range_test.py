"""A learning-rate range test drawing batches of the training loader with next() before training, or one sample
batch drawn with next(iter(loader)): a relaunch skipped that epoch, so its next() got the epoch's end at once, which
such code does not catch, and the relaunch stopped (one line, exit 1) at every resume after it. The epoch is now
replayed with its data (loader_state._replay)."""
import re
import signal
from pathlib import Path

import pytest

from transparent_helpers import clean_env, load, run_script, tree_equal, zygote

SCRIPT = Path(__file__).with_name("range_test_train.py")


@pytest.mark.parametrize("style,kill_at", [
    ("next", 13),   # in the first training epoch (the loader's second: its first is the range test's)
    ("next", 31),   # two training epochs in
    ("reiter", 31),  # torch-lr-finder's iterator: a new iter() at StopIteration
    ("for", 31),    # a for loop with a break: passed without data before, as now
    ("sample", 21),  # one batch drawn with next(iter(loader)) before training: every relaunch stopped too
    ("tutorial", 21),  # the same with the iterator kept in a variable while training runs: the relaunch stopped
    ("tutorial", 13),  # (until 2026-12-07: that epoch was not recorded as left early, so it was not replayed)
    ("epoch_sample", 27),  # ... at each epoch's end, its loss logged: the relaunch stopped past epoch 1
])
def test_a_range_test_before_training_resumes_exactly(tmp_path, style, kill_at):
    out = tmp_path / "out.pt"
    env = dict(STYLE=style, PYCKPT_DIR=tmp_path / "ckpt", PYCKPT_EVERY_STEPS="4", KILL_AT=str(kill_at),
               KILL_MARK=tmp_path / "mark")
    first = run_script([SCRIPT, out], tmp_path, **env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    second = run_script([SCRIPT, out], tmp_path, **env)
    assert second.returncode == 0, second.stderr
    saved = kill_at // 4 * 4
    assert re.search(rf"pyckpt: resumed from step ({saved}|{saved - 4}) ", second.stderr), second.stderr
    replays = re.findall(r"pyckpt: epoch (\d+), which the run left after (\d+) batch(?:es)?, runs again with its data",
                         second.stderr)
    unfed = re.findall(r"pyckpt: the passes over loader .* that fed no optimizer step in the run", second.stderr)
    if style == "for":  # a for loop passes it without data
        assert replays == [] and unfed == [], second.stderr
    elif style in ("next", "reiter"):  # said once, at the first epoch replayed
        assert replays == [("0", "6")] and unfed == [], second.stderr
    else:  # a sample batch fed no step: run with its data from its iter() (test_unfed_passes.py), said once
        assert replays == [] and len(unfed) == 1, second.stderr
    # The epochs run again without data, said once: the range test's first epoch is not one of them, except where
    # it is a for loop (passed without data). A sample's iter()s fed no step: never counted as epochs (the loop's
    # numbering, in this line and the resume line; until 2026-12-08 they were, off by one per sample).
    resumed = int(re.search(r"resumed from step \d+ \(epoch (\d+)", second.stderr).group(1))
    first = 1 if style in ("next", "reiter") else 0
    want = [] if resumed <= first else [f"epoch {first}" if resumed - first == 1 else f"epochs {first}-{resumed - 1}"]
    assert re.findall(r"pyckpt: (epochs? [0-9-]+) runs? again without data", second.stderr) == want, second.stderr
    plain = tmp_path / "plain.pt"
    r = zygote.shared().run_path(SCRIPT, [plain], env=clean_env(STYLE=style), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert tree_equal(load(out), load(plain))
