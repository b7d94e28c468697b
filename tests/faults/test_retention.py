"""Commit order, retention and fallback past damage: what a relaunch resumes from and what
retention deletes follow the commit sequence, never step numbers, and never reach outside the root."""
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

import pyckpt
from pyckpt import commit, layout

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "transparent"))
from transparent_helpers import TINY, load, run_script, tree_equal  # noqa: E402


def state(v):
    return {"w": torch.full((1000,), float(v)), "v": v}


def test_new_run_in_a_dir_holding_higher_steps_keeps_its_own_checkpoints(ckpt_root):
    with pyckpt.Checkpointer(ckpt_root, keep=2) as old_run:
        for s in (100, 200, 300):
            old_run.save(s, state(s)).result(60)
    # A new run (PYCKPT_RESUME=never, as the docs advise) starts again at step 1 in the same directory.
    with pyckpt.Checkpointer(ckpt_root, keep=2) as new_run:
        new_run.save(1, state(1)).result(60)
        assert os.path.isdir(os.path.join(ckpt_root, "step-000000001"))  # used to be deleted at once
        assert new_run.latest().step == 1 and commit.read_latest(ckpt_root) == "step-000000001"
        new_run.save(2, state(2)).result(60)
    assert sorted(os.listdir(ckpt_root)) == [".pyckpt.lock", "latest", "metrics.jsonl", "step-000000001", "step-000000002"]
    with pyckpt.Checkpointer(ckpt_root, keep=2) as relaunch:  # an `auto` relaunch resumes the new run
        assert relaunch.latest().step == 2 and relaunch.load()["v"] == 2


def test_own_save_survives_when_the_highest_step_is_damaged(ckpt_root, caplog):
    with pyckpt.Checkpointer(ckpt_root, keep=1) as ck:
        ck.save(10, state(10)).result(60)
    with pyckpt.Checkpointer(ckpt_root, keep=3) as ck:
        ck.save(30, state(30)).result(60)
    os.remove(os.path.join(ckpt_root, "step-000000030", "rank-00000.json"))
    with pyckpt.Checkpointer(ckpt_root, keep=1) as ck:
        with caplog.at_level(logging.WARNING, logger="pyckpt"):
            assert ck.latest().step == 10  # skips the damaged step 30 ...
        assert "skipping damaged checkpoint" in caplog.text and "step-000000030" in caplog.text
        ck.save(25, state(25)).result(60)  # ... and resumes and saves step 25
        assert ck.latest().step == 25 and ck.load()["v"] == 25
    assert sorted(os.listdir(ckpt_root)) == [".pyckpt.lock", "latest", "metrics.jsonl", "step-000000025"]


def test_retention_never_deletes_through_a_symlinked_step(tmp_path, caplog):
    root, outside = tmp_path / "root", tmp_path / "outside"
    pyckpt.save(state(7), str(outside))  # a complete-looking checkpoint outside the root ...
    (outside / "sentinel").write_text("keep me")
    root.mkdir()
    os.symlink(outside, root / "step-000000000")  # ... linked in as the oldest step
    with caplog.at_level(logging.WARNING, logger="pyckpt"):
        with pyckpt.Checkpointer(root, keep=1) as ck:
            for s in (1, 2, 3):
                ck.save(s, state(s)).result(60)
            assert ck.latest().step == 3
            try:
                ck.restore(step=0)  # an explicit step is not read through the link either
            except pyckpt.CheckpointNotFoundError:
                pass
            else:
                raise AssertionError("restore(step=0) read a checkpoint through a symbolic link")
    assert (outside / "sentinel").read_text() == "keep me" and layout.is_checkpoint_dir(str(outside))
    assert os.path.islink(root / "step-000000000")
    assert sorted(os.listdir(root)) == [".pyckpt.lock", "latest", "metrics.jsonl", "step-000000000", "step-000000003"]
    assert "a symbolic link is never a checkpoint" in caplog.text


def test_transparent_resume_skips_a_damaged_newest_checkpoint(tmp_path, flip_data_byte):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.pt"
    env = dict(PYCKPT_DIR=ckpt, PYCKPT_EVERY_STEPS="4", KILL_AT="13", KILL_MARK=tmp_path / "mark")
    first = run_script([TINY, out], tmp_path, **env)
    assert first.returncode != 0 and "TRAINED" not in first.stdout
    newest, older = layout.committed(str(ckpt))[:2]
    flip_data_byte(newest.path)
    second = run_script([TINY, out], tmp_path, **env)
    assert second.returncode == 0, second.stderr
    skip = [ln for ln in second.stderr.splitlines() if "skipping damaged checkpoint" in ln]
    assert len(skip) == 1 and skip[0].startswith(f"pyckpt: skipping damaged checkpoint {newest.path}: "), second.stderr
    assert f"pyckpt: resumed from step {older.step} " in second.stderr
    plain = run_script([TINY, tmp_path / "plain.pt"], tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert tree_equal(load(out), load(tmp_path / "plain.pt")), second.stderr  # exact, from the older one


def test_every_checkpoint_damaged_is_an_error_not_a_silent_fresh_start(ckpt_root, flip_data_byte):
    with pyckpt.Checkpointer(ckpt_root, keep=2) as ck:
        p1 = ck.save(1, state(1)).result(60)
        p2 = ck.save(2, state(2)).result(60)
        flip_data_byte(p1)
        flip_data_byte(p2)
        try:
            ck.load()
        except pyckpt.CorruptCheckpointError as e:
            assert "every one is damaged" in str(e) and p1 in str(e) and p2 in str(e)
        else:
            raise AssertionError("loading a root whose checkpoints are all damaged must fail")
    shutil.rmtree(ckpt_root)


def test_transparent_resume_with_every_checkpoint_damaged_stops_instead_of_starting_over(tmp_path, flip_data_byte):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.pt"
    env = dict(PYCKPT_DIR=ckpt, PYCKPT_EVERY_STEPS="4", KILL_AT="13", KILL_MARK=tmp_path / "mark")
    first = run_script([TINY, out], tmp_path, **env)
    assert first.returncode != 0 and "TRAINED" not in first.stdout
    committed = [e.path for e in layout.committed(str(ckpt))]
    assert committed, first.stderr
    for path in committed:  # every committed checkpoint loses a chunk's checksum
        flip_data_byte(path)
    before = sorted(p.name for p in ckpt.iterdir())
    second = run_script([TINY, out], tmp_path, **env)
    assert second.returncode == 2, f"exit {second.returncode}, expected 2 (a silent fresh start?):\n{second.stderr}"
    assert "Traceback" not in second.stderr, second.stderr
    errors = [ln for ln in second.stderr.splitlines()
              if ln.startswith("pyckpt: ") and "skipping damaged checkpoint" not in ln]
    assert len(errors) == 1, second.stderr
    line = errors[0]
    assert line.startswith(f"pyckpt: cannot resume from {ckpt}: every committed checkpoint is damaged ("), line
    assert all(path in line for path in committed), line
    assert "PYCKPT_RESUME=never trains from scratch, PYCKPT_RESUME=<checkpoint dir>" in line, line
    # Nothing trained: no new checkpoint, no output (the start-up line never came either).
    assert sorted(p.name for p in ckpt.iterdir()) == before
    assert not out.exists() and "TRAINED" not in second.stdout
    # The way out the line names: PYCKPT_RESUME=never trains from scratch.
    third = run_script([TINY, out], tmp_path, PYCKPT_RESUME="never", **env)
    assert third.returncode == 0 and "TRAINED 30" in third.stdout, third.stderr
