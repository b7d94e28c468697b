"""The NVIDIA apex ImageNet example's prefetcher (train_apex_prefetch.py), killed with SIGKILL and
relaunched: every relaunch used to be refused ("<module> is at another instruction than in the
checkpoint"). The class has a plain ``next()`` and fetches one batch ahead, from ``__init__``; the
relaunch reaches its restore point at the ``next()`` call before ``while input is not None:``, the
snapshot was taken at the one at the end of the loop body, whose continuation is the same."""
from __future__ import annotations

import signal

import pytest

from transparent_helpers import HERE, load, run_script, tree_equal

SCRIPT = HERE / "train_apex_prefetch.py"


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("apex_plain")
    r = run_script([SCRIPT, root / "plain.pt"], root, PYCKPT_DISABLE="1")
    assert r.returncode == 0, r.stderr
    return load(root / "plain.pt")


@pytest.mark.parametrize("every,kill_at,resumed", [
    (3, 8, "step 6 (epoch 0, batch 6)"),     # in epoch 0
    (5, 13, "step 10 (epoch 0, batch 10)"),  # the snapshot's next() asked the ended iterator again
    (3, 23, "step 21 (epoch 2, batch 1)"),   # in a later epoch: epochs 0 and 1 are passed without data
])
def test_apex_prefetcher_killed_and_relaunched_equals_a_plain_run(tmp_path, plain, every, kill_at, resumed):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.pt"
    env = dict(PYCKPT_DIR=ckpt, PYCKPT_EVERY_STEPS=str(every), EVERY=str(every), KILL_AT=str(kill_at),
               KILL_MARK=tmp_path / "mark")
    first = run_script([SCRIPT, out], tmp_path, **env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    second = run_script([SCRIPT, out], tmp_path, **env)
    assert second.returncode == 0, second.stderr
    assert f"pyckpt: resumed from {resumed} " in second.stderr, second.stderr
    final = load(out)
    assert tree_equal(final["model"], plain["model"])
    assert tree_equal(final["batches"], plain["batches"])  # each batch trained on, in order


@pytest.fixture(scope="module")
def plain_reiter(tmp_path_factory):
    root = tmp_path_factory.mktemp("apex_reiter_plain")
    r = run_script([SCRIPT, root / "plain.pt"], root, PYCKPT_DISABLE="1", MODE="reiter")
    assert r.returncode == 0, r.stderr
    return load(root / "plain.pt")


def _reiter(tmp_path, kill_at):
    env = dict(PYCKPT_DIR=tmp_path / "ckpt", PYCKPT_EVERY_STEPS="3", EVERY="3", KILL_AT=str(kill_at),
               KILL_MARK=tmp_path / "mark", MODE="reiter")
    first = run_script([SCRIPT, tmp_path / "out.pt"], tmp_path, **env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    return run_script([SCRIPT, tmp_path / "out.pt"], tmp_path, **env)


@pytest.mark.parametrize("kill_at,resumed", [
    (8, "step 6 (epoch 0, batch 6)"),
    # The relaunch's next() re-iterates from the skipped epoch 0 into epoch 1: its item came from epoch 0's
    # look-ahead, so epoch 1 starts with one batch fetched and none handed (it counted one handed, and the
    # relaunch was refused: the restore fell into __init__'s fetch).
    (13, "step 12 (epoch 1, batch 2)"),
])
def test_a_prefetcher_made_once_that_reiterates_resumes_exactly(tmp_path, plain_reiter, kill_at, resumed):
    second = _reiter(tmp_path, kill_at)
    assert second.returncode == 0 and f"pyckpt: resumed from {resumed} " in second.stderr, second.stderr
    final = load(tmp_path / "out.pt")
    assert tree_equal(final["model"], plain_reiter["model"])
    assert tree_equal(final["batches"], plain_reiter["batches"])


def test_a_prefetcher_made_once_that_reiterates_into_a_skipped_epoch_is_named(tmp_path):
    # Its preload() asks a skipped epoch's iterator for a batch itself, gets that epoch's end and re-iterates
    # into the next skipped one: the StopIteration escapes the script. It used to be a bare traceback from
    # pyckpt's code; one line now says why the relaunch stopped and how to start over.
    second = _reiter(tmp_path, 23)
    assert second.returncode == 1, second.stderr
    lines = [x for x in second.stderr.splitlines() if "relaunch stopped before the checkpoint's restore" in x]
    assert len(lines) == 1 and lines[0].startswith("pyckpt: ") and "PYCKPT_RESUME=never" in lines[0], second.stderr
    assert "SkippedEpochEnd" in second.stderr  # the traceback itself still follows
