"""Error messages never disclose file contents; the engine's own open refuses links and FIFOs;
a FIFO or link as ``latest`` never hangs or misleads a reader of a root."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch

import pyckpt
import zygote
from pyckpt._native import get_engine, native
from pyckpt.errors import CorruptCheckpointError


def test_checksum_mismatch_does_not_print_the_crc_of_the_bytes_read(tmp_path):
    """With a 1-byte chunk the CRC of the bytes read names the byte: it must not appear."""
    path = pyckpt.save({"b": torch.tensor([65], dtype=torch.uint8)}, tmp_path / "c")
    part = json.loads(Path(path, "rank-00000.json").read_text())
    (chunk,) = part["chunks"]
    assert chunk["stored_len"] == 1
    data = os.path.join(path, chunk["file"])
    with open(data, "r+b") as f:
        f.seek(chunk["offset"])
        f.write(b"Z")  # the "secret" byte
    leaked = native().crc32c(b"Z")
    for fn in (lambda: pyckpt.load(path), lambda: pyckpt.reader.verify(get_engine(), path)):
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch") as ei:
            fn()
        msg = str(ei.value)
        assert f"{leaked:08x}" not in msg.lower() and str(leaked) not in msg
        assert f"{chunk['crc32c']:08x}" in msg  # the expected value may be named


def test_engine_open_refuses_symlinks_and_fifos(tmp_path):
    real = tmp_path / "real.bin"
    real.write_bytes(bytes(64))
    link = tmp_path / "link.bin"
    os.symlink(real, link)
    fifo = tmp_path / "fifo.bin"
    os.mkfifo(fifo)
    out: list = []
    t = threading.Thread(target=lambda: out.append(get_engine().read(
        [str(link), str(fifo)], [(0, 0, 64, 64, 0, 0, []), (1, 0, 64, 64, 0, 0, [])])), daemon=True)
    t.start()
    t.join(60)
    assert out, "engine.read blocked on a FIFO"
    (i0, m0), (i1, m1) = out[0]
    assert (i0, i1) == (0, 1)
    assert "symbolic link" in m0 and str(link) in m0
    assert "not a regular file" in m1 and str(fifo) in m1


def test_engine_refuses_a_borrowed_descriptor_of_a_fifo(tmp_path):
    fifo = tmp_path / "fifo.bin"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        (idx, msg), = get_engine().read(["named-fifo"], [(0, 0, 8, 8, 0, 0, [])], fds=[fd])
    finally:
        os.close(fd)
    assert idx == 0 and "named-fifo" in msg and "not a regular file" in msg


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_hostile_latest_pointer_is_ignored_promptly(tmp_path, kind):
    """``latest`` is a hint: a FIFO (or a link to elsewhere) there must neither hang nor redirect."""
    root = tmp_path / "root"
    ck = pyckpt.Checkpointer(root, keep=3)
    ck.save(1, {"x": torch.full((4,), 1.0)}).result(60)
    ck.close()
    os.remove(root / "latest")
    if kind == "fifo":
        os.mkfifo(root / "latest")
    else:
        (tmp_path / "other").write_text("step-000000009\n")
        os.symlink(tmp_path / "other", root / "latest")
    code = ("import pyckpt, sys\n"
            "print(pyckpt.load(sys.argv[1])['x'].tolist())\n")
    try:  # real processes (forked by the session's zygote), killed if they hang
        r = zygote.shared().run(code, [root], env=dict(os.environ), timeout=120)
        v = zygote.shared().run_module("pyckpt.cli", ["verify", root], env=dict(os.environ), timeout=120)
    except TimeoutError:
        pytest.fail(f"a {kind} as `latest` hung a reader")
    assert r.returncode == 0 and "[1.0, 1.0, 1.0, 1.0]" in r.stdout, r.stderr
    assert v.returncode == 0 and "OK" in v.stdout, v.stderr
