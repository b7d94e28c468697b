"""Explicit API: ``CheckpointNotFoundError`` (a FileNotFoundError, which callers read as "no
checkpoint yet, start fresh") only when no committed checkpoint exists; committed checkpoints of
which none loads, for whatever reason (a checksum, a deleted data file, a lost part), are
``CorruptCheckpointError`` naming them and what is wrong."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import pyckpt
from pyckpt.errors import CheckpointNotFoundError, CorruptCheckpointError


def _data(ckpt_dir: str) -> str:
    return os.path.join(ckpt_dir, "rank-00000", "data-000.bin")


def _delete_own_data_files(root: str, paths: list[str]) -> None:
    for p in paths:
        os.remove(_data(p))


def _delete_referenced_step_1(root: str, paths: list[str]) -> None:
    # keep=1 retired step 1 (no manifest), whose data every later save references: lost.
    shutil.rmtree(os.path.join(root, "step-000000001"))


def _delete_parts(root: str, paths: list[str]) -> None:
    for p in paths:
        os.remove(os.path.join(p, "rank-00000.json"))


CASES = {
    "own data file deleted": (3, _delete_own_data_files, "missing"),
    "referenced data file deleted": (1, _delete_referenced_step_1, "missing"),
    "part deleted": (3, _delete_parts, "rank-00000.json"),
}


def _damaged_root(tmp_path, case: str) -> tuple[str, list[str], str]:
    keep, damage, why = CASES[case]
    root = str(tmp_path / "root")
    frozen = torch.arange(1 << 20, dtype=torch.float32)
    with pyckpt.Checkpointer(root, keep=keep) as ck:
        paths = [ck.save(s, {"base": frozen, "lora": torch.full((8,), float(s))}).result(60) for s in (1, 2, 3)]
    committed = paths[::-1][:keep]  # newest first
    damage(root, committed)
    return root, committed, why


@pytest.mark.parametrize("case", list(CASES))
def test_restore_with_every_committed_checkpoint_unloadable_is_damage_not_not_found(tmp_path, case):
    root, committed, why = _damaged_root(tmp_path, case)
    with pyckpt.Checkpointer(root) as ck:
        for call in (ck.restore, ck.load):
            with pytest.raises(CorruptCheckpointError) as ei:
                call()
            assert not isinstance(ei.value, FileNotFoundError)  # never "no checkpoint yet"
            msg = str(ei.value)
            assert msg.startswith(f"no checkpoint in {root} loads: every one is damaged ("), msg
            assert all(p in msg for p in committed) and why in msg, msg
            assert "\n" not in msg


@pytest.mark.parametrize("case", list(CASES))
def test_pyckpt_load_of_a_root_with_every_checkpoint_unloadable_is_damage(tmp_path, case):
    root, committed, why = _damaged_root(tmp_path, case)
    with pytest.raises(CorruptCheckpointError) as ei:
        pyckpt.load(root)
    assert not isinstance(ei.value, FileNotFoundError)
    msg = str(ei.value)
    assert committed[0] in msg and why in msg, msg


def test_a_checksum_failure_and_a_missing_file_are_both_named(tmp_path, flip_data_byte):
    root = str(tmp_path / "root")
    with pyckpt.Checkpointer(root, keep=2, incremental=False) as ck:
        older = ck.save(1, {"w": torch.ones(64)}).result(60)
        newer = ck.save(2, {"w": torch.zeros(64)}).result(60)
        os.remove(_data(older))  # found by the candidate scan
        flip_data_byte(newer)  # found while loading
        with pytest.raises(CorruptCheckpointError) as ei:
            ck.restore()
    msg = str(ei.value)
    assert newer in msg and older in msg and "checksum" in msg and "missing" in msg, msg


def test_no_committed_checkpoint_is_not_found(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "step-000000003.tmp-1x2-0").mkdir()  # an interrupted save is no checkpoint
    (root / "step-000000004").mkdir()  # nor is a directory without a manifest
    with pyckpt.Checkpointer(root) as ck:
        for call in (ck.restore, ck.load):
            with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint"):
                call()
    with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint"):
        pyckpt.load(str(root))
