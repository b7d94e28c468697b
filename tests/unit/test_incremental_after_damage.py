"""Incremental saves after a restore that skipped a damaged checkpoint: the next save must not
reference chunks of the damaged one (the per-save check compares CRC records, not the bytes on
disk, so a reference would inherit the damage and make every later checkpoint unloadable)."""
from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

import pyckpt
from pyckpt import layout, reader, resume
from pyckpt._native import get_engine
from pyckpt.coord import LocalCoordinator
from pyckpt.errors import CorruptCheckpointError

DAMAGED = "step-000000003"
N = 1 << 18  # 1 MiB of float32: one chunk each with PYCKPT_CHUNK_MB=1


def _frozen() -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(0))


def _state(step: int) -> dict:
    """A frozen base (written by save 1, referenced by every later save) and ``x``, which changes
    at step 2 only: save 3 still writes it (a chunk that changed at the previous save is copied
    without comparison), so step 3 owns a chunk whose bytes later saves hold again."""
    return {"frozen": _frozen(), "x": torch.full((N,), 0.0 if step == 1 else 1.0), "step": step}


def _files(ckpt_dir: str) -> set[str]:
    """The files rank 0's chunks live in."""
    with open(os.path.join(ckpt_dir, "rank-00000.json"), "rb") as f:
        part = json.loads(f.read())
    return {c["file"] for c in part["chunks"]}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


def _save_three(ck: pyckpt.Checkpointer, root: str, flip_data_byte, more=lambda step: {}) -> None:
    for s in (1, 2, 3):
        ck.save(s, _state(s) | more(s)).result(60)
    # Step 3's own data file holds x (the frozen chunk is a reference to step 1's file): the
    # damaged chunk is one that only the newest checkpoint owns.
    assert _files(os.path.join(root, DAMAGED)) == {"rank-00000/data-000.bin",
                                                   "../step-000000001/rank-00000/data-000.bin"}
    flip_data_byte(os.path.join(root, DAMAGED))


def _check_next_save(ck: pyckpt.Checkpointer, root: str) -> None:
    """Step 4 holds x=1, the bytes the damaged chunk's record describes: it must not reference
    that chunk; the frozen base is still referenced in step 1, whose chunks the restore verified."""
    path = ck.save(4, _state(4)).result(60)
    files = _files(path)
    assert not [f for f in files if f.startswith(f"../{DAMAGED}/")], files
    assert "../step-000000001/rank-00000/data-000.bin" in files, files  # still incremental
    reader.verify(get_engine(), path)  # every chunk it references is sound
    assert _equal(pyckpt.load(path), _state(4))


def _check_after_deleting_the_damaged_one(root: str) -> None:
    """The operator removes the damaged checkpoint: the new one does not depend on it."""
    shutil.rmtree(os.path.join(root, DAMAGED))
    with pyckpt.Checkpointer(root, keep=5) as ck:
        r = ck.restore()
        assert r.step == 4 and _equal(r.state, _state(4))


@pytest.fixture
def one_mib_chunks(knob_env):
    knob_env(PYCKPT_CHUNK_MB=1)  # the engine rebuilt with 1 MiB chunks, and again after the test


def test_relaunch_restoring_an_older_checkpoint_does_not_reference_the_damaged_newest(
        tmp_path, flip_data_byte, one_mib_chunks, caplog):
    root = str(tmp_path / "root")
    with pyckpt.Checkpointer(root, keep=5) as ck:
        _save_three(ck, root, flip_data_byte)
    with pyckpt.Checkpointer(root, keep=5) as ck:  # a relaunch
        with caplog.at_level(logging.WARNING, logger="pyckpt"):
            r = ck.restore()
        assert r.step == 2 and _equal(r.state, _state(2))
        assert f"pyckpt: skipping damaged checkpoint {os.path.join(root, DAMAGED)}: " in caplog.text
        _check_next_save(ck, root)
    _check_after_deleting_the_damaged_one(root)


def test_same_process_restoring_past_a_damaged_own_save_does_not_reference_it(
        tmp_path, flip_data_byte, one_mib_chunks, caplog):
    """The Checkpointer that wrote step 3 remembers its chunks for the next save; once a restore
    finds step 3 damaged, those must be forgotten too."""
    root = str(tmp_path / "root")
    with pyckpt.Checkpointer(root, keep=5) as ck:
        _save_three(ck, root, flip_data_byte)
        with caplog.at_level(logging.WARNING, logger="pyckpt"):
            assert ck.restore().step == 2
        assert "skipping damaged checkpoint" in caplog.text
        _check_next_save(ck, root)
    _check_after_deleting_the_damaged_one(root)


def _transparent_resume(ck: pyckpt.Checkpointer) -> int:
    """Transparent mode resumes through resume.choose (latest(verify=True)) and Source.restore."""
    src = resume.choose(ck, LocalCoordinator(), "auto")
    assert src is not None and _equal(src.restore(None).state, _state(src.step))
    return src.step


@pytest.mark.parametrize("learn", [_transparent_resume, lambda ck: ck.latest(verify=True).step],
                         ids=["transparent_resume", "latest_verify_alone"])
def test_a_relaunch_that_finds_the_newest_damaged_does_not_reference_it(tmp_path, flip_data_byte, one_mib_chunks,
                                                                        learn):
    """However the relaunch learns of the damage: a transparent resume, or a caller that only asks
    latest(verify=True) and loads elsewhere."""
    root = str(tmp_path / "root")
    with pyckpt.Checkpointer(root, keep=5) as ck:
        _save_three(ck, root, flip_data_byte)
    with pyckpt.Checkpointer(root, keep=5) as ck:
        assert learn(ck) == 2
        _check_next_save(ck, root)
    _check_after_deleting_the_damaged_one(root)


def test_relaunch_without_a_restore_still_continues_incrementally(tmp_path, one_mib_chunks):
    """The documented behaviour stays: a relaunch that finds nothing damaged references the newest
    checkpoint's chunks (docs/FORMAT.md §14)."""
    root = str(tmp_path / "root")
    with pyckpt.Checkpointer(root, keep=5) as ck:
        for s in (1, 2):
            ck.save(s, _state(s)).result(60)
    with pyckpt.Checkpointer(root, keep=5) as ck:
        path = ck.save(3, _state(3)).result(60)
    assert _files(path) == {"../step-000000001/rank-00000/data-000.bin", "../step-000000002/rank-00000/data-000.bin"}
    assert _equal(pyckpt.load(path), _state(3))
    assert [e.step for e in layout.committed(root)] == [3, 2, 1]


def test_a_save_in_flight_when_the_damage_is_found_does_not_become_the_baseline(
        tmp_path, flip_data_byte, knob_env):
    """Save 4 was planned from step 3's chunks before the restore found step 3 damaged: its
    references must not seed save 5 (they point into the damaged data). Its check of them before
    its commit finds the damage, so it does not commit at all."""
    knob_env(PYCKPT_CHUNK_MB=1)
    root = str(tmp_path / "root")
    moving = {s: torch.full((N,), float(s)) for s in range(1, 6)}  # changes: written at every save
    with pyckpt.Checkpointer(root, keep=10) as ck:
        _save_three(ck, root, flip_data_byte, lambda s: {"m": moving[s]})
        knob_env(PYCKPT_TEST_WRITE_DELAY_MS=1500)  # save 4 is still writing during the restore
        in_flight = ck.save(4, _state(4) | {"m": moving[4]})
        assert ck.restore().step == 2
        assert not in_flight.done()  # the race this test is about did happen
        # Its reference into step 3 (x, unmoved) is checked before its commit: it does not commit.
        with pytest.raises(CorruptCheckpointError, match=DAMAGED):
            in_flight.result(60)
        path = ck.save(5, _state(5) | {"m": moving[5]}).result(60)
    files = _files(path)
    assert not [f for f in files if f.startswith(("../step-000000003/", "../step-000000004/"))], files
    assert "../step-000000001/rank-00000/data-000.bin" in files, files
    reader.verify(get_engine(), path)
    assert _equal(pyckpt.load(path), _state(5) | {"m": moving[5]})


def test_a_run_started_over_with_resume_never_references_no_earlier_checkpoint(tmp_path, flip_data_byte,
                                                                                one_mib_chunks):
    """PYCKPT_RESUME=never is the way out the refusal names when every checkpoint is damaged: the run
    started over must not reference their chunks (its first save would inherit the frozen base's
    damage, and so every later checkpoint of it). Its first save is written in full."""
    root = str(tmp_path / "root")
    with pyckpt.Checkpointer(root, keep=5) as ck:
        for s in (1, 2):
            ck.save(s, _state(s)).result(60)
    flip_data_byte(os.path.join(root, "step-000000001"))  # the frozen base every later save references
    with pyckpt.Checkpointer(root, keep=5) as ck:
        assert resume.choose(ck, LocalCoordinator(), "never") is None
        path = ck.save(3, _state(3)).result(60)
        assert _files(path) == {"rank-00000/data-000.bin"}  # nothing of the earlier run's
        reader.verify(get_engine(), path)
        assert _equal(pyckpt.load(path), _state(3))
        later = ck.save(4, _state(4)).result(60)  # and incremental again from its own first save
        assert "../step-000000003/rank-00000/data-000.bin" in _files(later)
        reader.verify(get_engine(), later)


@pytest.mark.parametrize("keep", [5, 2], ids=["committed", "retired_but_referenced"])
def test_a_save_never_replaces_a_directory_other_checkpoints_read_chunks_from(tmp_path, one_mib_chunks, keep):
    """A run started over next to an earlier one (PYCKPT_RESUME=never) saves step 1 again, where the
    earlier run's step 1 (committed, or retired by retention) holds the frozen base its later
    checkpoints reference: replacing it damaged them all. The save fails instead, naming them."""
    root = str(tmp_path / "root")
    with pyckpt.Checkpointer(root, keep=keep) as ck:
        for s in (1, 2, 3):
            ck.save(s, _state(s)).result(60)
    kept = [e.path for e in layout.committed(root)]
    assert {"../step-000000001/rank-00000/data-000.bin"} <= _files(kept[0])
    with pyckpt.Checkpointer(root, keep=keep) as ck:
        assert resume.choose(ck, LocalCoordinator(), "never") is None
        fresh = {"frozen": _frozen() + 1, "x": torch.zeros(N), "step": 1}
        with pytest.raises(pyckpt.PyckptError, match=r"step-000000001 exists and committed checkpoints "
                                                      r"\(step-000000003, step-000000002\) read chunks"):
            ck.save(1, fresh).result(60)
    for path in kept:  # the earlier run's checkpoints are intact
        reader.verify(get_engine(), path)
        assert _equal(pyckpt.load(path), _state(layout.parse_step(os.path.basename(path))))
