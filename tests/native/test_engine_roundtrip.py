"""Engine.save -> files -> Engine.read through real files: many chunks,
several files, packed small arrays, both codecs, several jobs at once."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from native_helpers import addr, mixed_state, plan, read_chunks, save_chunks

NONE, ZSTD = 0, 1
CHUNK = 64 << 10


def save_state(engine, dirpath, arrays, nfiles=3, codec=NONE, **kw):
    layout = plan(arrays, CHUNK, nfiles)
    files = [os.path.join(dirpath, f"data-{i:03d}.bin") for i in range(nfiles)]
    job = engine.save(files, save_chunks(layout, arrays), codec=codec, **kw)
    return layout, files, job


def read_back(engine, layout, files, results, arrays):
    dests = [np.zeros_like(a) for a in arrays]
    errors = engine.read(files, read_chunks(layout, results, dests))
    return dests, errors


@pytest.mark.parametrize("codec", [NONE, ZSTD])
def test_round_trip_many_chunks_several_files(make_engine, tmp_path, rng, codec):
    engine = make_engine(staging_bytes=4 * CHUNK, chunk_bytes=CHUNK)
    arrays = mixed_state(rng)
    layout, files, job = save_state(engine, tmp_path, arrays, codec=codec)
    assert job.wait(60) and job.error() is None
    results = job.results()
    assert len(results) == job.num_chunks() == len(layout.chunks) > 10
    dests, errors = read_back(engine, layout, files, results, arrays)
    assert errors == []
    for a, d in zip(arrays, dests):
        assert np.array_equal(a.view(np.uint8), d.view(np.uint8))
    if codec == ZSTD:
        assert any(r[4] == ZSTD for r in results) and any(r[1] < r[2] for r in results)


def test_files_end_at_their_last_chunk(make_engine, tmp_path, rng):
    """Direct writes go out in whole 4 KiB blocks; the padding is cut off at commit."""
    engine = make_engine(staging_bytes=4 * CHUNK, chunk_bytes=CHUNK)
    arrays = mixed_state(rng)
    layout, files, job = save_state(engine, tmp_path, arrays)
    assert job.wait(60) and job.error() is None
    ends = {}
    for (f, _es, _p), (off, stored, *_rest) in zip(layout.chunks, job.results()):
        ends[f] = max(ends.get(f, 0), off + stored)
    assert {f: os.path.getsize(files[f]) for f in ends} == ends


def test_results_describe_the_bytes_on_disk(C, make_engine, tmp_path, rng):
    engine = make_engine(staging_bytes=4 * CHUNK, chunk_bytes=CHUNK)
    arrays = mixed_state(rng)
    layout, files, job = save_state(engine, tmp_path, arrays, codec=ZSTD)
    assert job.wait(60) and job.error() is None
    contents = [Path(f).read_bytes() for f in files]
    spans: dict[int, list] = {}
    for (f, _es, pieces), (off, stored, raw, crc, codec, raw_crc) in zip(layout.chunks, job.results()):
        assert off % 4096 == 0
        blob = contents[f][off : off + stored]
        assert len(blob) == stored and C.crc32c(blob) == crc
        src = b"".join(arrays[i].view(np.uint8)[o : o + n].tobytes() for i, o, n in pieces)
        assert raw == len(src) and C.crc32c(src) == raw_crc
        if codec == NONE:
            assert blob == src
        spans.setdefault(f, []).append((off, off + stored))
    for regions in spans.values():  # no two chunks overlap within a file
        regions.sort()
        assert all(a[1] <= b[0] for a, b in zip(regions, regions[1:]))


def test_whole_chunk_piece_is_read_in_place(make_engine, tmp_path, rng):
    engine = make_engine(chunk_bytes=CHUNK)
    src = rng.standard_normal(CHUNK // 8)
    path = str(tmp_path / "one.bin")
    job = engine.save([path], [(0, 8, [(addr(src), src.nbytes, -1)])])
    assert job.wait(30) and job.error() is None
    (off, stored, raw, crc, codec, _), = job.results()
    dst = np.zeros_like(src)
    # A piece covering the whole chunk takes the direct path; one covering only
    # part of it must decode through a buffer and still land right.
    assert engine.read([path], [(0, off, stored, raw, crc, codec, [(0, addr(dst), raw, -1)])]) == []
    assert np.array_equal(dst, src)
    half = np.zeros(src.size // 2)
    assert engine.read([path], [(0, off, stored, raw, crc, codec, [(raw // 2, addr(half), raw // 2, -1)])]) == []
    assert np.array_equal(half, src[src.size // 2 :])


def test_verify_only_read_with_no_pieces(make_engine, tmp_path, rng):
    engine = make_engine(chunk_bytes=CHUNK)
    arrays = mixed_state(rng)
    layout, files, job = save_state(engine, tmp_path, arrays, codec=ZSTD)
    assert job.wait(60) and job.error() is None
    chunks = [(f, o, s, r, c, k, []) for (f, _, _), (o, s, r, c, k, _) in zip(layout.chunks, job.results())]
    assert engine.read(files, chunks) == []


def test_several_jobs_in_flight_share_one_engine(make_engine, tmp_path, rng):
    engine = make_engine(staging_bytes=3 * CHUNK, chunk_bytes=CHUNK, io_threads=3)
    states, jobs = [], []
    for k in range(3):
        d = tmp_path / f"job{k}"
        d.mkdir()
        arrays = mixed_state(rng)
        states.append((arrays, *save_state(engine, d, arrays, nfiles=2, codec=k % 2, write_delay_us=2000)))
    for arrays, layout, files, job in states:
        assert job.wait(120) and job.error() is None
        dests, errors = read_back(engine, layout, files, job.results(), arrays)
        assert errors == []
        assert all(np.array_equal(a, d) for a, d in zip(arrays, dests))
    assert engine.staging_bytes_allocated() <= 3 * CHUNK


def test_state_larger_than_pool_streams_through(make_engine, tmp_path, rng):
    engine = make_engine(staging_bytes=2 * CHUNK, chunk_bytes=CHUNK)
    assert engine.staging_bytes_allocated() == 0  # allocated lazily, by the first save
    arrays = [rng.standard_normal(20 * CHUNK // 8)]  # 20 chunks through 2 slabs
    for _ in range(2):  # the second save reuses the same slabs
        layout, files, job = save_state(engine, tmp_path, arrays, nfiles=1, write_delay_us=1000)
        assert job.wait(60) and job.error() is None
        assert engine.staging_bytes_allocated() == 2 * CHUNK
    dests, errors = read_back(engine, layout, files, job.results(), arrays)
    assert errors == [] and np.array_equal(dests[0], arrays[0])


def test_capture_is_reported_before_the_write_finishes(make_engine, tmp_path, rng):
    engine = make_engine(staging_bytes=8 * CHUNK, chunk_bytes=CHUNK, io_threads=1)
    arrays = [rng.standard_normal(4 * CHUNK // 8)]
    original = arrays[0].copy()
    layout, files, job = save_state(engine, tmp_path, arrays, nfiles=1, write_delay_us=300_000)
    assert job.wait_captured(30)
    assert job.captured_count() == job.num_chunks() == 4
    assert all(job.chunk_captured(i) for i in range(4))
    assert not job.done()  # four 0.3 s writes are still queued
    arrays[0][:] = -1.0  # safe: every chunk is already in staging
    assert job.wait(30) and job.error() is None
    dests, errors = read_back(engine, layout, files, job.results(), arrays)
    assert errors == [] and np.array_equal(dests[0], original)


def _fs_type(path) -> str:
    """The file system's magic number in hex (ef53: ext2/3/4, 58465342: XFS)."""
    return subprocess.run(["stat", "-f", "-c", "%t", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_room_for_the_chunks_to_be_written_is_allocated_before_the_writes(make_engine, tmp_path, rng):
    """On ext4 and XFS a direct write past a file's end takes the file's lock alone, so parallel
    writes of a new file went one at a time. The room of every chunk to be written is now allocated
    when the files are created: by the end of capture the file already holds it (blocks, not a hole),
    chunks expected unchanged left out, and it is cut back to its data's end at the end."""
    if _fs_type(tmp_path) not in ("ef53", "58465342"):
        pytest.skip(f"preallocation is done on ext4 and XFS only; {tmp_path} is another file system")
    engine = make_engine(staging_bytes=8 * CHUNK, chunk_bytes=CHUNK, io_threads=1)
    arrays = [rng.standard_normal((4 * CHUNK - 1000) // 8)]  # four chunks, the last one short
    layout = plan(arrays, CHUNK, 1)
    padded = [(sum(n for _a, _o, n in p) + 4095) // 4096 * 4096 for _f, _es, p in layout.chunks]
    first = engine.save([str(tmp_path / "a.bin")], save_chunks(layout, arrays), fingerprint=True)
    assert first.wait(60) and first.error() is None
    fps = [fp for fp, _ in first.incremental()]
    arrays[0][-1] += 1.0  # the last chunk changes; the first two are expected unchanged
    expect = [(i, fps[i], False, 0) for i in (0, 1)]
    for name, kw, room in (("b.bin", {}, sum(padded)), ("c.bin", {"expect": expect}, padded[2] + padded[3])):
        path = tmp_path / name
        job = engine.save([str(path)], save_chunks(layout, arrays), fingerprint=True, write_delay_us=300_000, **kw)
        assert job.wait_captured(30)
        st = os.stat(path)
        assert not job.done()  # the 0.3 s writes are still running
        assert st.st_size == room and st.st_blocks * 512 >= room, (name, st.st_size, st.st_blocks, room)
        assert job.wait(30) and job.error() is None
        written = [r for r, (_fp, status) in zip(job.results(), job.incremental()) if status != 1]
        assert len(written) == (4 if name == "b.bin" else 2)
        assert os.path.getsize(path) == max(off + stored for off, stored, *_ in written)
        if name == "b.bin":  # (c.bin's referenced chunks are in a.bin)
            dests, errors = read_back(engine, layout, [str(path)], job.results(), arrays)
            assert errors == [] and np.array_equal(dests[0], arrays[0])


def test_results_and_indices_are_checked(make_engine, tmp_path, rng):
    engine = make_engine(chunk_bytes=CHUNK)
    arrays = [rng.standard_normal(2 * CHUNK // 8)]
    _, _, job = save_state(engine, tmp_path, arrays, nfiles=1, write_delay_us=200_000)
    with pytest.raises(RuntimeError, match="still running"):
        job.results()
    with pytest.raises(ValueError):
        job.chunk_captured(99)
    assert job.wait(30) and len(job.results()) == 2


def test_empty_job_creates_and_syncs_files(make_engine, tmp_path):
    engine = make_engine()
    path = tmp_path / "empty.bin"
    job = engine.save([str(path)], [])
    assert job.wait(30) and job.error() is None and job.results() == []
    assert path.exists() and path.stat().st_size == 0


def _odd_pieces(make_engine, rng, copy_threads: int):
    """(engine with 4 MiB chunks, arrays, their layout): a 9 MiB + 13 B array (whole chunks, then an
    odd tail sharing a chunk with the small arrays) and pieces of odd lengths, so that stripes, the
    copy threads' parts and pieces do not line up."""
    chunk = 4 << 20
    engine = make_engine(staging_bytes=4 * chunk, chunk_bytes=chunk, copy_threads=copy_threads)
    arrays = [rng.integers(0, 256, (9 << 20) + 13, dtype=np.uint8), rng.integers(0, 256, 777, dtype=np.uint8),
              rng.integers(0, 256, (1 << 20) + 3, dtype=np.uint8)]
    return engine, arrays, plan(arrays, chunk)


@pytest.mark.parametrize("copy_threads", [1, 2, 3])
def test_checksums_and_fingerprints_taken_while_copying_match_the_bytes(C, make_engine, tmp_path, rng, copy_threads):
    """Host chunks are checksummed and fingerprinted during the copy (one pass), split over
    the copy threads for pieces >= 1 MiB; each result must equal the values computed from
    the source bytes by the independent table CRC and the single-threaded fingerprint."""
    engine, arrays, layout = _odd_pieces(make_engine, rng, copy_threads)
    job = engine.save([str(tmp_path / "d.bin")], save_chunks(layout, arrays), fingerprint=True)
    assert job.wait(60) and job.error() is None
    fps = [fp for fp, _status in job.incremental()]
    assert any(len(pieces) > 1 for _f, _es, pieces in layout.chunks)
    for (_f, _es, pieces), (_off, _stored, raw, _crc, _codec, raw_crc), fp in zip(layout.chunks, job.results(), fps):
        src = [arrays[i].view(np.uint8)[o : o + n].tobytes() for i, o, n in pieces]
        assert C.crc32c_software(b"".join(src)) == raw_crc
        want = C.FP_SEED
        for piece in src:
            want = C.chunk_fold(want, C.fingerprint_portable(piece))
        assert fp == want


@pytest.mark.parametrize("copy_threads", [1, 3])
def test_host_chunks_expected_unchanged_are_referenced_only_when_fingerprint_and_crc_both_match(
        C, make_engine, tmp_path, rng, copy_threads):
    """A host chunk expected unchanged, with the CRC check on (PYCKPT_INCREMENTAL_VERIFY=auto), is
    fingerprinted and checksummed in one read, split over the copy threads: it is referenced
    (status 1) when both match; a matching fingerprint with another CRC (a collision) is written
    afresh (2), as is a changed chunk (0); what is written reads back exactly."""
    engine, arrays, layout = _odd_pieces(make_engine, rng, copy_threads)
    first = engine.save([str(tmp_path / "a.bin")], save_chunks(layout, arrays), fingerprint=True)
    assert first.wait(60) and first.error() is None
    fps = [fp for fp, _ in first.incremental()]
    crcs = [r[5] for r in first.results()]
    n = len(layout.chunks)
    assert n >= 3 and any(len(pieces) > 1 for _f, _es, pieces in layout.chunks)
    collided, changed = 0, n - 1  # the last chunk holds the odd tail and both small arrays
    arrays[2][5] ^= 0x77  # in the last chunk
    expect = [(i, fps[i], True, crcs[i] ^ (1 if i == collided else 0)) for i in range(n)]
    path = str(tmp_path / "b.bin")
    second = engine.save([path], save_chunks(layout, arrays), fingerprint=True, expect=expect)
    assert second.wait(60) and second.error() is None
    status = [s for _, s in second.incremental()]
    assert status == [2 if i == collided else 0 if i == changed else 1 for i in range(n)]
    for i in (collided, changed):
        _f, _es, pieces = layout.chunks[i]
        want = b"".join(arrays[a].view(np.uint8)[o:o + k].tobytes() for a, o, k in pieces)
        o, s, r, c, k, raw_crc = second.results()[i]
        assert raw_crc == C.crc32c_software(want)
        out = np.zeros(r, dtype=np.uint8)
        assert engine.read([path], [(0, o, s, r, c, k, [(0, addr(out), r, -1)])]) == []
        assert out.tobytes() == want


def test_chunks_marked_changed_are_written_without_a_fingerprint(C, make_engine, tmp_path, rng):
    """skip_fingerprint: those chunks get no fingerprint (0), the others the real one, and every chunk
    is written and read back exactly; a chunk cannot be both expected unchanged and skipped."""
    engine = make_engine(staging_bytes=4 * CHUNK, chunk_bytes=CHUNK)
    arrays = mixed_state(rng)
    layout = plan(arrays, CHUNK, 1)
    files = [str(tmp_path / "d.bin")]
    skip = list(range(0, len(layout.chunks), 2))
    job = engine.save(files, save_chunks(layout, arrays), fingerprint=True, skip_fingerprint=skip)
    full = engine.save([str(tmp_path / "e.bin")], save_chunks(layout, arrays), fingerprint=True)
    assert job.wait(60) and full.wait(60) and job.error() is None
    got, want = [fp for fp, _ in job.incremental()], [fp for fp, _ in full.incremental()]
    assert all(got[i] == 0 for i in skip) and all(want[i] != 0 for i in skip)
    assert [got[i] for i in range(len(got)) if i not in skip] == [want[i] for i in range(len(got)) if i not in skip]
    dests, errors = read_back(engine, layout, files, job.results(), arrays)
    assert errors == [] and all(np.array_equal(a.view(np.uint8), d.view(np.uint8)) for a, d in zip(arrays, dests))
    with pytest.raises(ValueError, match="also expected unchanged"):
        engine.save(files, save_chunks(layout, arrays), fingerprint=True, expect=[(0, 1, False, 0)],
                    skip_fingerprint=[0])
