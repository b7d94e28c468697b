"""``map_files``: the memory tier's saves copy host chunks straight into their
(reused) data files, mapped, with no staging slab and no write."""
from __future__ import annotations

import os
import shutil
import uuid

import numpy as np
import pytest

from native_helpers import crc32c_bitwise, mixed_state, plan, read_chunks, save_chunks

NONE, ZSTD = 0, 1
CHUNK = 64 << 10


@pytest.fixture
def shm_dir():
    """A directory in /dev/shm (the tier's file system), removed afterwards."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    if root is None:
        pytest.skip("no /dev/shm on this machine")
    path = os.path.join(root, f"pyckpt-test-{uuid.uuid4().hex}")
    os.makedirs(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _save(engine, files, arrays, layout, **kw):
    job = engine.save(files, save_chunks(layout, arrays), map_files=True, **kw)
    assert job.wait(60) and job.error() is None, job.error()
    return job.results()


def _check(engine, files, arrays, layout, results):
    """Read back (CRC32C verified) equals the arrays; padding between chunks is zero; each file ends
    at its last chunk."""
    dests = [np.zeros_like(a) for a in arrays]
    assert engine.read(files, read_chunks(layout, results, dests)) == []
    for a, d in zip(arrays, dests):
        assert np.array_equal(a.view(np.uint8), d.view(np.uint8))
    by_file: dict[int, list] = {}
    for (f, _es, _p), r in zip(layout.chunks, results):
        by_file.setdefault(f, []).append(r)
    for f, rs in by_file.items():
        data = _bytes(files[f])
        rs.sort()
        assert len(data) == rs[-1][0] + rs[-1][1]
        for (off, stored, raw, crc, codec, raw_crc), nxt in zip(rs, rs[1:] + [None]):
            assert codec == NONE and stored == raw and crc == raw_crc
            end = nxt[0] if nxt else len(data)
            assert data[off + stored:end] == bytes(end - off - stored)  # padding zeroed


def test_mapped_save_writes_over_existing_files_without_staging(make_engine, shm_dir, rng):
    engine = make_engine(staging_bytes=4 * CHUNK, chunk_bytes=CHUNK)
    arrays = mixed_state(rng)
    layout = plan(arrays, CHUNK, 2)
    files = [os.path.join(shm_dir, f"data-{i}.bin") for i in range(2)]
    for f in files:  # an evicted snapshot's file: larger, full of other bytes
        with open(f, "wb") as fh:
            fh.write(b"\xab" * (3 * sum(a.nbytes for a in arrays)))
    inodes = [os.stat(f).st_ino for f in files]
    results = _save(engine, files, arrays, layout)
    assert engine.staging_bytes_allocated() == 0  # copied straight into the files
    assert [os.stat(f).st_ino for f in files] == inodes  # written over, not replaced
    _check(engine, files, arrays, layout, results)
    # Small chunks: the recorded CRC is the bitwise one of the bytes in the file.
    small = [(r, ch) for r, ch in zip(results, layout.chunks) if r[1] <= 512]
    for (off, stored, _raw, crc, *_), (f, _es, _p) in small:
        assert crc == crc32c_bitwise(_bytes(files[f])[off:off + stored])


def test_mapped_saves_reuse_files_that_shrank_grew_or_were_replaced(make_engine, shm_dir, rng):
    # The engine keeps a file's mapping between saves: the next save into the same file (cut to its last
    # chunk by the previous one) must land in it; a state that grew needs more room; a file deleted and
    # created again under the same name is another file, never the old mapping.
    engine = make_engine(staging_bytes=4 * CHUNK, chunk_bytes=CHUNK)
    files = [os.path.join(shm_dir, "data-0.bin")]
    for scale in (1, 1, 3):
        arrays = mixed_state(rng, scale)
        layout = plan(arrays, CHUNK, 1)
        _check(engine, files, arrays, layout, _save(engine, files, arrays, layout))
    os.unlink(files[0])
    arrays = mixed_state(rng, 2)
    layout = plan(arrays, CHUNK, 1)
    _check(engine, files, arrays, layout, _save(engine, files, arrays, layout))
    assert engine.staging_bytes_allocated() == 0


def test_mapped_save_with_fingerprints_matches_a_written_save(make_engine, shm_dir, tmp_path, rng):
    # Incremental saves fingerprint while copying: the mapped path must record the same values.
    engine = make_engine(staging_bytes=4 * CHUNK, chunk_bytes=CHUNK)
    arrays = mixed_state(rng)
    layout = plan(arrays, CHUNK, 1)
    mapped = engine.save([os.path.join(shm_dir, "d.bin")], save_chunks(layout, arrays), map_files=True,
                         fingerprint=True)
    written = engine.save([str(tmp_path / "d.bin")], save_chunks(layout, arrays), fingerprint=True)
    assert mapped.wait(60) and written.wait(60) and mapped.error() is None and written.error() is None
    assert [fp for fp, _ in mapped.incremental()] == [fp for fp, _ in written.incremental()]
    assert [r[3] for r in mapped.results()] == [r[3] for r in written.results()]


# 1 MiB chunks: the pieces read include some over the copy kernel's 256 KiB threshold (its folding path)
# and some under it (its block path).
TIER_CHUNK = 1 << 20


def _tier_chunks(engine, shm_dir, rng):
    """A mapped save of a model-like state into /dev/shm: (files, arrays, layout, results)."""
    files = [os.path.join(shm_dir, "data-0.bin")]
    arrays = mixed_state(rng, 2)
    layout = plan(arrays, TIER_CHUNK, 1)
    assert any(n >= 256 << 10 for _f, _es, ps in layout.chunks for i, _o, n in ps if i % 2 == 1)
    return files, arrays, layout, _save(engine, files, arrays, layout)


def _every_other_array(layout, results, dests, reverse=False):
    """Read specs for the arrays of odd index only: shared chunks then hold bytes no piece copies (gaps
    before, between and after the pieces); ``reverse`` lists each chunk's pieces back to front."""
    specs = read_chunks(layout, results, dests)
    out = []
    for (f, off, stored, raw, crc, codec, pieces), (_f, _es, planned) in zip(specs, layout.chunks):
        kept = [p for p, (i, _o, _n) in zip(pieces, planned) if i % 2 == 1]
        if kept:
            out.append((f, off, stored, raw, crc, codec, kept[::-1] if reverse else kept))
    return out


@pytest.mark.parametrize("reverse", [False, True], ids=["pieces_in_order", "pieces_back_to_front"])
def test_a_memory_tier_chunk_read_into_fresh_memory_lands_exactly_with_gaps_between_pieces(
        make_engine, shm_dir, rng, reverse):
    # Fresh destinations (direct=True) of a chunk in /dev/shm are copied with the checksum in one pass;
    # the bytes of the chunk no piece takes are still checksummed, and nothing outside the pieces is written.
    engine = make_engine(staging_bytes=4 * TIER_CHUNK, chunk_bytes=TIER_CHUNK)
    files, arrays, layout, results = _tier_chunks(engine, shm_dir, rng)
    dests = [np.full_like(a.view(np.uint8), 0x5A) for a in arrays]
    specs = _every_other_array(layout, results, dests, reverse)
    assert any(len(s[6]) > 1 for s in specs)  # some chunk has several pieces with gaps between them
    assert engine.read(files, specs, True, direct=True) == []
    for i, (a, d) in enumerate(zip(arrays, dests)):
        want = a.view(np.uint8) if i % 2 == 1 else np.full_like(d, 0x5A)
        assert np.array_equal(d, want), f"array {i}"


@pytest.mark.parametrize("where", ["in_a_piece", "between_pieces"])
def test_a_damaged_memory_tier_chunk_read_into_fresh_memory_is_refused_naming_its_file(
        make_engine, shm_dir, rng, where):
    engine = make_engine(staging_bytes=4 * TIER_CHUNK, chunk_bytes=TIER_CHUNK)
    files, arrays, layout, results = _tier_chunks(engine, shm_dir, rng)
    dests = [np.zeros_like(a.view(np.uint8)) for a in arrays]
    specs = _every_other_array(layout, results, dests)
    k, spec = next((k, s) for k, s in enumerate(specs) if len(s[6]) > 1)
    off, pieces = spec[1], spec[6]
    # A byte of the second piece, or the first byte of the gap before it (an even array no piece reads).
    pos = off + (pieces[1][0] if where == "in_a_piece" else pieces[0][0] + pieces[0][2])
    if where == "between_pieces":
        assert pos < off + pieces[1][0]
    with open(files[0], "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x01]))
    errors = engine.read(files, specs, True, direct=True)
    assert [i for i, _ in errors] == [k]
    assert "checksum mismatch" in errors[0][1] and files[0] in errors[0][1]


def test_map_files_needs_codec_none(make_engine, shm_dir, rng):
    engine = make_engine(staging_bytes=4 * CHUNK, chunk_bytes=CHUNK)
    arrays = mixed_state(rng)
    layout = plan(arrays, CHUNK, 1)
    with pytest.raises(ValueError, match="map_files needs codec none"):
        engine.save([os.path.join(shm_dir, "d.bin")], save_chunks(layout, arrays), codec=ZSTD, map_files=True)


def test_a_full_file_system_fails_the_save_with_a_message_never_a_signal(make_engine, tmp_path, rng):
    # A store into a mapped tmpfs page that cannot be allocated raises SIGBUS, which would kill training.
    # The engine allocates the room first; when that fails the chunks go the written way and the save
    # fails with ENOSPC, as any full disk does. Needs root (mounts a small tmpfs), as tests/faults do.
    import subprocess

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1024k", "tmpfs", str(mnt)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, f"cannot mount a tmpfs (this test needs root): {r.stderr.strip()}"
    try:
        engine = make_engine(staging_bytes=4 * CHUNK, chunk_bytes=CHUNK)
        files = [str(mnt / "d.bin")]
        small = [rng.standard_normal(40_000, dtype=np.float32)]  # 160 KiB: fits
        layout = plan(small, CHUNK, 1)
        _check(engine, files, small, layout, _save(engine, files, small, layout))
        big = [rng.standard_normal(400_000, dtype=np.float32)]  # 1.6 MiB: does not
        job = engine.save(files, save_chunks(plan(big, CHUNK, 1), big), map_files=True)
        assert job.wait(60)
        assert "No space left on device" in (job.error() or ""), job.error()
        assert "d.bin" in job.error()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
