"""Special files beside a transparent run's checkpoints (a FIFO as ``metrics.jsonl``, ``FINISHED.json`` or the
memory tier's token) never stop a relaunch: it resumes exactly, from storage where the memory copy's
token cannot be read. (The Checkpointer and CLI side: tests/faults/test_hostile_root_files.py.)"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pyckpt import metrics, shm_tier

from transparent_helpers import TINY, load, run_script, tree_equal


def _plant(path: Path) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("name", [metrics.METRICS_FILE, metrics.FINISHED_FILE])
def test_a_relaunch_resumes_past_a_fifo_beside_the_checkpoints(tmp_path, name, plain_results):
    out = tmp_path / "out.pt"
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="4", KILL_AT="10", KILL_MARK=tmp_path / "mark")
    first = run_script([TINY, out], tmp_path, **env)
    assert first.returncode == -9, first.stderr
    _plant(tmp_path / "ck" / name)
    try:
        second = run_script([TINY, out], tmp_path, timeout=60, **env)
    except TimeoutError:
        pytest.fail(f"a FIFO as {name} hung the relaunch")
    assert second.returncode == 0, second.stderr
    assert "pyckpt: resumed from step " in second.stderr
    assert tree_equal(load(out), plain_results("adamw"))


@pytest.mark.skipif(not os.path.isdir(shm_tier.SHM_ROOT), reason="no /dev/shm on this machine")
def test_a_fifo_as_the_memory_tier_token_neither_hangs_nor_resumes_an_unproven_copy(tmp_path, plain_results):
    """The token proves which directory a memory copy belongs to: one that cannot be read proves
    nothing, so the relaunch resumes from storage (the copy is removed, with its line)."""
    out = tmp_path / "out.pt"
    shm = Path(shm_tier.shm_path(str(tmp_path / "ck")))
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="4", PYCKPT_SHM_MB="64", KILL_AT="10",
               KILL_MARK=tmp_path / "mark")
    try:
        first = run_script([TINY, out], tmp_path, **env)
        assert first.returncode == -9, first.stderr
        assert shm.is_dir()
        _plant(tmp_path / "ck" / shm_tier.TOKEN)
        try:
            second = run_script([TINY, out], tmp_path, timeout=60, **env)
        except TimeoutError:
            pytest.fail("a FIFO as the memory tier's token hung the relaunch")
        assert second.returncode == 0, second.stderr
        assert "resuming from the memory tier" not in second.stderr
        assert "pyckpt: resumed from step " in second.stderr
        assert "ignoring memory-tier copy" in second.stderr
        assert tree_equal(load(out), plain_results("adamw"))
    finally:
        shutil.rmtree(shm, ignore_errors=True)


@pytest.mark.skipif(not os.path.isdir(shm_tier.SHM_ROOT), reason="no /dev/shm on this machine")
def test_a_memory_tier_token_that_cannot_be_made_turns_the_tier_off_not_the_checkpoints(tmp_path, plain_results):
    """A directory in the token's place: rank 0 raised while opening the tier, at every snapshot, so every
    checkpoint was skipped. Now the tier is off with one line and snapshots go to storage."""
    out = tmp_path / "out.pt"
    shm = Path(shm_tier.shm_path(str(tmp_path / "ck")))
    (tmp_path / "ck" / shm_tier.TOKEN).mkdir(parents=True)
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="4", PYCKPT_SHM_MB="64", KILL_AT="10",
               KILL_MARK=tmp_path / "mark")
    try:
        first = run_script([TINY, out], tmp_path, **env)
        assert first.returncode == -9, first.stderr
        off = [line for line in first.stderr.splitlines() if "memory tier off" in line]
        assert len(off) == 1 and shm_tier.TOKEN in off[0], first.stderr
        assert "skipped" not in first.stderr
        second = run_script([TINY, out], tmp_path, timeout=60, **env)
        assert second.returncode == 0, second.stderr
        assert "pyckpt: resumed from step " in second.stderr
        assert tree_equal(load(out), plain_results("adamw"))
    finally:
        shutil.rmtree(shm, ignore_errors=True)
