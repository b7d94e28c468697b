"""Failures are reported, never crash: damaged or missing files on read, I/O
errors and staging timeouts on save, cancellation, bad arguments, and a limit
on threads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from native_helpers import HERE, addr, plan, read_chunks, save_chunks

CHUNK = 64 << 10
_KEEP_ALIVE: list = []


def saved(engine, tmp_path, rng, nchunks=4, codec=0):
    arrays = [rng.standard_normal(nchunks * CHUNK // 8)]
    layout = plan(arrays, CHUNK, 1)
    path = str(tmp_path / "data.bin")
    job = engine.save([path], save_chunks(layout, arrays), codec=codec)
    assert job.wait(30) and job.error() is None
    # The destination must outlive every read of these chunks: keep it
    # referenced from the module-level list below for the test's duration.
    dests = [np.zeros_like(arrays[0])]
    _KEEP_ALIVE[:] = dests
    return path, read_chunks(layout, job.results(), dests)


def test_flipped_byte_is_a_checksum_mismatch_naming_the_file(make_engine, tmp_path, rng):
    engine = make_engine(chunk_bytes=CHUNK)
    path, chunks = saved(engine, tmp_path, rng)
    offset = chunks[2][1] + 100
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    errors = engine.read([path], chunks)
    assert [i for i, _ in errors] == [2]
    assert "checksum mismatch" in errors[0][1] and path in errors[0][1]
    assert engine.read([path], chunks, verify=False) == []


def test_zstd_chunk_damage_is_reported(make_engine, tmp_path, rng):
    engine = make_engine(chunk_bytes=CHUNK)
    path, chunks = saved(engine, tmp_path, rng, codec=1)
    with open(path, "r+b") as f:  # destroy the first frame's magic
        f.seek(chunks[0][1])
        f.write(b"XXXX")
    errors = engine.read([path], chunks)
    assert [i for i, _ in errors] == [0] and path in errors[0][1]
    # Without verification the malformed frame is still caught by the decoder.
    (idx, msg), = engine.read([path], chunks, verify=False)
    assert idx == 0 and "malformed" in msg and path in msg


def test_truncated_file_names_sizes_and_file(make_engine, tmp_path, rng):
    engine = make_engine(chunk_bytes=CHUNK)
    path, chunks = saved(engine, tmp_path, rng)
    # Cut 10 bytes into the chunk that lies last in the file (writers append
    # in the order they finish, not always by index).
    last = max(range(len(chunks)), key=lambda i: chunks[i][1])
    cut = chunks[last][1] + 10
    os.truncate(path, cut)
    errors = engine.read([path], chunks)
    assert [i for i, _ in errors] == [last]
    msg = errors[0][1]
    assert msg.startswith("truncated") and path in msg and f"file has {cut}" in msg


def test_missing_file_is_reported_for_each_of_its_chunks(make_engine, tmp_path, rng):
    engine = make_engine(chunk_bytes=CHUNK)
    path, chunks = saved(engine, tmp_path, rng)
    missing = str(tmp_path / "gone.bin")
    chunks = [chunks[0]] + [(1,) + c[1:] for c in chunks[1:]]
    errors = engine.read([path, missing], chunks)
    assert [i for i, _ in errors] == [1, 2, 3]
    assert all(missing in m and "No such file" in m for _, m in errors)


def test_read_rejects_pieces_outside_the_chunk(make_engine, tmp_path, rng):
    engine = make_engine(chunk_bytes=CHUNK)
    path, chunks = saved(engine, tmp_path, rng, nchunks=1)
    f, off, stored, raw, crc, codec, pieces = chunks[0]
    dst = np.zeros(16)
    (idx, msg), = engine.read([path], [(f, off, stored, raw, crc, codec, [(raw - 8, addr(dst), 128, -1)])])
    assert idx == 0 and "outside" in msg


@pytest.mark.parametrize("where", ["not-a-dir", "dev-full"])
def test_io_errors_fail_the_job_not_the_process(make_engine, tmp_path, rng, where):
    engine = make_engine(chunk_bytes=CHUNK)
    src = rng.standard_normal(CHUNK // 8)
    if where == "not-a-dir":  # ENOTDIR even for root
        (tmp_path / "plain").write_bytes(b"x")
        path, expect = str(tmp_path / "plain" / "data.bin"), "Not a directory"
    else:  # every write to /dev/full fails with ENOSPC
        path, expect = "/dev/full", "No space left on device"
    good = str(tmp_path / "ok.bin")
    job = engine.save([good, path], [(0, 8, [(addr(src), src.nbytes, -1)]), (1, 8, [(addr(src), src.nbytes, -1)])])
    assert job.wait(30)
    err = job.error()
    assert err is not None and path in err and expect in err
    with pytest.raises(RuntimeError, match=expect):
        job.results()
    # The engine keeps working after the failure.
    job2 = engine.save([good], [(0, 8, [(addr(src), src.nbytes, -1)])])
    assert job2.wait(30) and job2.error() is None


def test_staging_timeout_while_another_job_holds_the_slabs(make_engine, tmp_path, rng):
    engine = make_engine(staging_bytes=2 * CHUNK, chunk_bytes=CHUNK, io_threads=1)
    src = rng.standard_normal(3 * CHUNK // 8)
    layout = plan([src], CHUNK, 1)
    slow = engine.save([str(tmp_path / "a.bin")], save_chunks(layout, [src]), write_delay_us=500_000)
    while slow.captured_count() < 2:  # both slabs now wait behind 0.5 s writes
        time.sleep(0.001)
    starved = engine.save(
        [str(tmp_path / "b.bin")], save_chunks(layout, [src]), staging_timeout_ms=50
    )
    assert starved.wait(30)
    assert starved.error().startswith("staging timeout")
    assert starved.captured_count() == 0
    assert engine.staging_bytes_allocated() == 2 * CHUNK  # the pool did not grow
    assert slow.wait(30) and slow.error() is None  # the first checkpoint is unharmed
    assert engine.staging_bytes_allocated() == 2 * CHUNK


def test_cancel_stops_the_job(make_engine, tmp_path, rng):
    engine = make_engine(staging_bytes=2 * CHUNK, chunk_bytes=CHUNK, io_threads=1)
    src = rng.standard_normal(40 * CHUNK // 8)
    layout = plan([src], CHUNK, 1)
    job = engine.save([str(tmp_path / "a.bin")], save_chunks(layout, [src]), write_delay_us=100_000)
    job.cancel()
    assert job.wait(30)  # far sooner than the 4 s the writes would take
    assert job.error() == "cancelled" and job.captured_count() < job.num_chunks()


@pytest.mark.parametrize(
    "chunk, kwargs, match",
    [
        ((0, 3, []), {}, "elem_size"),
        ((5, 4, []), {}, "file index"),
        ((0, 4, [(0, CHUNK + 1, -1)]), {}, "chunk_bytes"),
        ((0, 4, [(0, 8, 0)]), {}, "CUDA"),
        ((0, 4, []), {"codec": 7}, "codec"),
    ],
)
def test_bad_save_arguments_raise_value_error(make_engine, tmp_path, chunk, kwargs, match, C):
    if match == "CUDA" and C.cuda_available():
        pytest.skip("a GPU is present")
    engine = make_engine(chunk_bytes=CHUNK)
    with pytest.raises(ValueError, match=match):
        engine.save([str(tmp_path / "x.bin")], [chunk], **kwargs)
    assert not (tmp_path / "x.bin").exists()  # rejected before anything was written


def test_a_file_listed_twice_is_rejected(make_engine, tmp_path):
    engine = make_engine(chunk_bytes=CHUNK)
    path = str(tmp_path / "x.bin")
    with pytest.raises(ValueError, match="listed twice"):
        engine.save([path, str(tmp_path / "y.bin"), path], [])


@pytest.fixture
def shm_dir():
    """A directory on tmpfs (/dev/shm), where read() checksums chunks where they lie (mapped)."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="pyckpt-native-", dir="/dev/shm")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("codec", [0, 1])
def test_a_chunk_in_memory_is_verified_where_it_lies_before_it_reaches_its_destination(
        make_engine, shm_dir, rng, codec):
    # Memory-tier files are read through a mapping instead of a bounce buffer:
    # a damaged chunk must still fail before any of its bytes reach the
    # caller's memory, and every sound chunk must arrive bitwise (decoded from
    # the mapping when compressed).
    engine = make_engine(chunk_bytes=CHUNK)
    src = rng.standard_normal(6 * CHUNK // 8)
    layout = plan([src], CHUNK, 1)
    path = os.path.join(shm_dir, "data.bin")
    job = engine.save([path], save_chunks(layout, [src]), codec=codec)
    assert job.wait(30) and job.error() is None
    dest = np.zeros_like(src)
    chunks = read_chunks(layout, job.results(), [dest])
    with open(path, "r+b") as f:
        f.seek(chunks[2][1] + 7)
        byte = f.read(1)
        f.seek(chunks[2][1] + 7)
        f.write(bytes([byte[0] ^ 0x01]))
    errors = engine.read([path], chunks)
    assert [i for i, _ in errors] == [2] and path in errors[0][1]
    per = CHUNK // 8
    assert not dest[2 * per:3 * per].any()  # the damaged chunk's destination was never written
    for k in (0, 1, 3, 4, 5):
        assert np.array_equal(dest[k * per:(k + 1) * per], src[k * per:(k + 1) * per]), k
    # A file cut short after it was written: the chunks past the end are
    # reported as truncated (never read past the end of the mapping). The
    # cut goes 10 bytes into the fifth chunk *in file order*: compressed
    # chunks are laid out in the order their writers finished, not by index.
    by_offset = sorted(range(len(chunks)), key=lambda i: chunks[i][1])
    cut = chunks[by_offset[4]][1] + 10
    os.truncate(path, cut)
    cut_short = {i for i, c in enumerate(chunks) if c[1] + c[2] > cut}
    assert len(cut_short) == 2
    errors = engine.read([path], chunks)
    assert [i for i, _ in errors] == sorted(cut_short | {2})
    assert all(m.startswith("truncated") for i, m in errors if i in cut_short)


_THREAD_LIMIT_CHILD = """
import json, logging, os, shutil, sys
sys.path.insert(0, {here!r})
sys.path.insert(0, os.path.dirname({here!r}))  # thread_limit
import numpy as np
from native_helpers import plan, read_chunks, save_chunks
from pyckpt import _native
from thread_limit import become_own_user, limit

C = _native.native()
a = np.random.default_rng(5).standard_normal(3 << 17)  # what is imported later, as another user, would fail
layout = plan([a], 1 << 20, 1)
work = become_own_user()
out = {{}}

with limit(0):  # not one thread: no engine, and the error says why
    try:
        C.Engine(1 << 24, 1 << 20, io_threads=4, copy_threads=2)
        out["none"] = "constructed"
    except OSError as e:
        out["none"] = str(e)
os.environ.update(PYCKPT_IO_THREADS="4", PYCKPT_COPY_THREADS="2")
said = []
logging.getLogger("pyckpt").addHandler(type("H", (logging.Handler,), {{"emit": lambda h, r: said.append(r.getMessage())}})())
path = os.path.join(work, "data.bin")
with limit(3):  # the copy worker and two of the four writers
    engine = _native.get_engine()
    out["short"], out["said"] = engine.thread_shortfall(), said
    try:  # every thread the limit allows is taken: a save's capture thread cannot start
        engine.save([path], save_chunks(layout, [a]))
        out["capture"] = "started"
    except OSError as e:
        out["capture"] = str(e)
job = engine.save([path], save_chunks(layout, [a]))
out["saved"] = bool(job.wait(60)) and job.error() is None
back = np.zeros_like(a)
out["read_errors"] = engine.read([path], read_chunks(layout, job.results(), [back]))
out["equal"] = bool(np.array_equal(a, back))
shutil.rmtree(work, ignore_errors=True)
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: RLIMIT_NPROC is set for a user of this test's own")
def test_a_limit_on_threads_is_an_error_or_fewer_threads_never_an_abort():
    """A container's pids limit (or ``ulimit -u``) reached while the engine starts its threads
    aborted the whole process ("terminate called without an active exception"): the training job
    died with it. Now no thread at all is an OSError naming the pool, fewer than asked run the
    engine with those (and one ``pyckpt:`` line says how many), and a save whose capture thread
    cannot start fails alone."""
    env = dict(os.environ, PYCKPT_DISABLE="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _THREAD_LIMIT_CHILD.format(here=HERE)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "pyckpt-copy" in out["none"] and "cannot start" in out["none"], out
    assert "pyckpt-io: 2 of 4 threads started" in out["short"], out
    assert "pyckpt-copy" not in out["short"], out
    assert out["said"] == [f"pyckpt: the checkpoint engine runs with fewer threads than asked: {out['short']}"], out
    assert "capture thread" in out["capture"] and "cannot start" in out["capture"], out
    assert out["saved"] and out["read_errors"] == [] and out["equal"], out
