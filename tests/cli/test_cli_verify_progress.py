"""``pyckpt verify`` shows a byte progress bar (only when asked or on a terminal) and still names a
damaged chunk by its index in its part, as ``reader.verify`` does, although it checks in slices."""
from __future__ import annotations

import json
import os

import pytest
import torch

import pyckpt
from pyckpt import cli, reader
from pyckpt._native import get_engine
from pyckpt.errors import CorruptCheckpointError

pytest.importorskip("tqdm")


@pytest.fixture
def eight_chunks(tmp_path, knob_env, monkeypatch):
    knob_env(PYCKPT_CHUNK_MB=1)
    path = pyckpt.save({f"t{i}": torch.full((1 << 18,), float(i)) for i in range(8)}, str(tmp_path / "c"))
    with open(os.path.join(path, "rank-00000.json")) as f:
        chunks = json.load(f)["chunks"]
    assert len(chunks) >= 6
    monkeypatch.setattr(cli, "_VERIFY_SLICE_BYTES", 2 << 20)  # several slices of a small checkpoint
    return path, chunks


def test_bar_only_when_asked_in_a_pipe(eight_chunks, capsys):
    path, _ = eight_chunks
    assert cli.main(["verify", path, "--progress-delay", "0"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and f"{path}: OK" in out.out  # captured stderr is no terminal: no bar
    assert cli.main(["verify", path, "--progress-delay", "0", "--progress", "always"]) == 0
    err = capsys.readouterr().err
    assert "verify:" in err and "100%" in err and "8.00M/8.00M" in err, err


def test_damaged_chunk_is_named_by_its_index_in_the_part(eight_chunks, capsys):
    path, chunks = eight_chunks
    ch = chunks[5]
    with open(os.path.join(path, ch["file"]), "r+b") as f:
        f.seek(ch["offset"] + 10)
        byte = f.read(1)
        f.seek(ch["offset"] + 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError) as expected:
        reader.verify(get_engine(), path)
    assert cli.main(["verify", path]) == 1
    err = capsys.readouterr().err
    assert "chunk 5 of rank 0 is damaged" in err and str(expected.value) in err, err
