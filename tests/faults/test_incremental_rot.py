"""A chunk that rots on disk after its commit, while later incremental saves would reference it
(pyckpt/incremental.py): the next save must check the referenced bytes on disk before it commits, or
every later checkpoint inherits the damage and retention deletes the last sound one. A chunk of a
tensor that did not move, whose reference the background check had not passed yet, is checked on the
commit thread (not in ``save()``): that save is then not committed, and the next one writes it afresh."""
from __future__ import annotations

import json
import logging
import os
import re
import threading

import pytest
import torch

import pyckpt
from pyckpt import layout, reader
from pyckpt.errors import CorruptCheckpointError
from pyckpt._native import get_engine

N = 1 << 18  # 1 MiB of float32: one chunk each with PYCKPT_CHUNK_MB=1
ROTTED = "step-000000003"


def _state(step: int) -> dict:
    """``frozen`` never changes; ``x`` changes at step 2 only (save 3 still writes it: a chunk that
    changed at the previous save is copied without comparison; saves 4 and 5 would reference step 3's
    copy); ``t`` changes at every step."""
    return {"frozen": torch.randn(N, generator=torch.Generator().manual_seed(0)),
            "x": torch.full((N,), 0.0 if step == 1 else 1.0), "t": torch.full((N,), float(step))}


def _part(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, "rank-00000.json"), "rb") as f:
        return json.loads(f.read())


def _rot_own_chunks(ckpt_dir: str) -> str:
    """Invert one byte of each chunk ``ckpt_dir`` holds itself, keeping the file's size and times
    as a failing disk would; returns the file's path."""
    own = [c for c in _part(ckpt_dir)["chunks"] if not c["file"].startswith("../")]
    assert own and len({c["file"] for c in own}) == 1, own
    path = os.path.join(ckpt_dir, own[0]["file"])
    st = os.stat(path)
    with open(path, "r+b") as f:
        for c in own:
            f.seek(c["offset"] + 100)
            b = f.read(1)
            f.seek(c["offset"] + 100)
            f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return path


def _rejected(ck, step: int, state: dict, rotted: str) -> None:
    """Save ``step``: its commit must refuse to reference the rotted file, naming it."""
    with pytest.raises(CorruptCheckpointError, match=re.escape(rotted)):
        ck.save(step, state).result(60)
    assert not os.path.exists(os.path.join(ck.directory, layout.step_dir_name(step)))


def test_a_chunk_rotted_on_disk_is_written_afresh_not_referenced(ckpt_root, knob_env, caplog):
    knob_env(PYCKPT_CHUNK_MB=1)
    with pyckpt.Checkpointer(ckpt_root, keep=2) as ck:
        for s in (1, 2, 3):
            ck.save(s, _state(s)).result(60)
        ck._baseline.stop_precheck()  # the next save comes before the background check reached step 3
        rotted = _rot_own_chunks(os.path.join(ckpt_root, ROTTED))
        with caplog.at_level(logging.WARNING, logger="pyckpt"):
            _rejected(ck, 4, _state(4), rotted)
            paths = [ck.save(s, _state(s)).result(60) for s in (5, 6)]
    for path in paths:  # neither later checkpoint references the rotted chunk
        assert not [c["file"] for c in _part(path)["chunks"] if c["file"].startswith(f"../{ROTTED}/")]
        reader.verify(get_engine(), path)  # every chunk it reads, referenced ones included, is sound
    lines = [r.getMessage() for r in caplog.records if rotted in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("pyckpt: "), caplog.text  # one line names the file
    # Retention kept the two newest, and they load.
    with pyckpt.Checkpointer(ckpt_root, keep=2) as ck:
        r = ck.restore()
    assert r.step == 6 and all(torch.equal(r.state[k], _state(6)[k]) for k in ("frozen", "x", "t"))


def test_a_chunk_checked_at_an_earlier_save_is_checked_again_once_its_file_changed(ckpt_root, knob_env, caplog):
    """``frozen`` lives in step 1's file and was checked when save 2 first referenced it; a write to
    that file afterwards (its size and mtime kept) must not let save 4 reference it unchecked."""
    knob_env(PYCKPT_CHUNK_MB=1)
    first = os.path.join(ckpt_root, "step-000000001")
    with pyckpt.Checkpointer(ckpt_root, keep=5) as ck:
        for s in (1, 2, 3):
            ck.save(s, _state(s)).result(60)
        assert "../step-000000001/rank-00000/data-000.bin" in {c["file"] for c in _part(ck.latest().path)["chunks"]}
        rotted = _rot_own_chunks(first)
        with caplog.at_level(logging.WARNING, logger="pyckpt"):
            _rejected(ck, 4, _state(4), rotted)
            path = ck.save(5, _state(5)).result(60)
    assert not [c["file"] for c in _part(path)["chunks"] if c["file"].startswith("../step-000000001/")]
    reader.verify(get_engine(), path)
    assert f"{rotted}: 1 chunk(s) this checkpoint would reference" in caplog.text


def _precheck_done() -> None:
    """Wait for the background read-back of the last commit's chunks (incremental.Baseline.precheck)."""
    for t in threading.enumerate():
        if t.name == "pyckpt-precheck":
            t.join(60)


def test_a_chunk_rotted_after_the_background_check_passed_it_is_still_caught(ckpt_root, knob_env, caplog):
    """Step 3's chunks were read back and found sound in the background after its commit; bytes that
    rot afterwards (a write: the file's ctime moves) must be read again by save 4, not trusted."""
    knob_env(PYCKPT_CHUNK_MB=1)
    state = _state(1)  # kept and changed in place: x's version counter does not move after step 2
    with pyckpt.Checkpointer(ckpt_root, keep=2) as ck:
        for s in (1, 2, 3):
            if s == 2:
                state["x"].fill_(1.0)
            state["t"].fill_(float(s))
            ck.save(s, state).result(60)
        _precheck_done()
        rel = f"{ROTTED}/rank-00000/data-000.bin"
        assert ck._baseline._sound_on_disk[rel][1]  # x's chunk (save 4 would reference it) found sound
        rotted = _rot_own_chunks(os.path.join(ckpt_root, ROTTED))
        with caplog.at_level(logging.WARNING, logger="pyckpt"):
            state["t"].fill_(4.0)
            _rejected(ck, 4, state, rotted)
            paths = []
            for s in (5, 6):
                state["t"].fill_(float(s))
                paths.append(ck.save(s, state).result(60))
    for path in paths:
        assert not [c["file"] for c in _part(path)["chunks"] if c["file"].startswith(f"../{ROTTED}/")]
        reader.verify(get_engine(), path)
    lines = [r.getMessage() for r in caplog.records if rotted in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("pyckpt: "), caplog.text


def test_a_chunk_rotted_after_a_restore_checked_it_is_caught_at_the_first_save(ckpt_root, knob_env, caplog):
    """A relaunched process restored step 3 (every chunk read and checked); bytes that rot afterwards
    must be read again by its first save, not taken as checked by the restore."""
    knob_env(PYCKPT_CHUNK_MB=1)
    with pyckpt.Checkpointer(ckpt_root, keep=2) as ck:
        for s in (1, 2, 3):
            ck.save(s, _state(s)).result(60)
    with pyckpt.Checkpointer(ckpt_root, keep=2) as ck:
        assert ck.restore().step == 3
        rotted = _rot_own_chunks(os.path.join(ckpt_root, ROTTED))
        with caplog.at_level(logging.WARNING, logger="pyckpt"):
            _rejected(ck, 4, _state(4), rotted)
            paths = [ck.save(s, _state(s)).result(60) for s in (5, 6)]
    for path in paths:
        assert not [c["file"] for c in _part(path)["chunks"] if c["file"].startswith(f"../{ROTTED}/")]
        reader.verify(get_engine(), path)
    lines = [r.getMessage() for r in caplog.records if rotted in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("pyckpt: "), caplog.text
