"""The engine's device path, run on the emulated GPU (csrc/device_emulator.cpp).

No GPU is needed: ``C._emulate_device`` makes "device memory" host memory, copied by one in-order
stream thread whose copies can be slowed (so several are still queued when the engine looks) or made
to fail (a sticky error, as a CUDA context error is). The same engine code runs as on a GPU: capture
through the staging pool, device fingerprints, CRC checks of unchanged chunks, reads into a device.
tests/native/test_gpu.py runs the real thing on a GPU machine.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from native_helpers import addr, crc32c_bitwise

MIB = 1 << 20


@pytest.fixture
def emulated(C):
    """Switches the emulated device on for one test; returns a function that reconfigures it."""

    def configure(copy_delay_us: int = 0, fail_copy_at: int = -1, refuse_register: bool = False) -> None:
        C._emulate_device(True, copy_delay_us, fail_copy_at, refuse_register)

    configure()
    try:
        yield configure
    finally:
        C._emulate_device(False)


def device_chunks(buf: np.ndarray, chunk: int) -> list:
    """One chunk per `chunk` bytes of `buf`, every piece on (emulated) device 0."""
    return [(0, 1, [(addr(buf) + off, min(chunk, buf.nbytes - off), 0)]) for off in range(0, buf.nbytes, chunk)]


def read_back(engine, path: str, job, nbytes: int, device: int = -1) -> np.ndarray:
    out = np.zeros(nbytes, dtype=np.uint8)
    reads, off = [], 0
    for o, s, r, c, k, _ in job.results():
        reads.append((0, o, s, r, c, k, [(0, addr(out) + off, r, device)]))
        off += r
    assert engine.read([path], reads) == []
    return out


def test_device_chunks_are_copied_several_at_a_time_and_land_whole(C, emulated, tmp_path, rng):
    # Each copy lasts 3 ms: a capture thread that waited for every chunk before queueing the next
    # would never have two copies queued at once.
    emulated(copy_delay_us=3000)
    engine = C.Engine(32 * MIB, MIB, pinned=True)
    src = rng.integers(0, 256, 12 * MIB + 4097, dtype=np.uint8)
    path = str(tmp_path / "d.bin")
    job = engine.save([path], device_chunks(src, MIB), stream=0, device=0)
    assert job.wait(60) and job.error() is None
    stats = C._emulated_device_stats()
    assert stats["copies"] == 13
    assert stats["max_in_flight"] >= 2, stats
    assert stats["live_events"] == 0  # every event the capture made was destroyed
    assert np.array_equal(read_back(engine, path, job, src.nbytes), src)
    # The CRC32C recorded for each chunk is that of its source bytes (the last chunk: checked bit by bit).
    for (o, s, r, c, k, raw_crc), off in zip(job.results(), range(0, src.nbytes, MIB)):
        assert raw_crc == C.crc32c(src[off:off + r])
    assert job.results()[-1][5] == crc32c_bitwise(src[12 * MIB:].tobytes())
    # Read into the device: the host-to-device path gets the same bytes.
    assert np.array_equal(read_back(engine, path, job, src.nbytes, device=0), src)
    assert C._emulated_device_stats()["h2d_copies"] == 13


@pytest.mark.parametrize("refuse", [False, True], ids=["registered", "refused"])
def test_pinned_slabs_are_page_locked_where_they_lie_or_cudahostalloced_when_that_is_refused(C, emulated, tmp_path,
                                                                                            rng, refuse):
    """Pinned slabs are the pool's own huge-page mappings, page-locked in place (cudaHostRegister);
    where the driver refuses, cudaHostAlloc'd as before. Either way the
    capture lands whole, and freeing the pool unlocks what it locked."""
    emulated(refuse_register=refuse)
    engine = C.Engine(8 * MIB, MIB, pinned=True)
    src = rng.integers(0, 256, 6 * MIB, dtype=np.uint8)
    path = str(tmp_path / "d.bin")
    job = engine.save([path], device_chunks(src, MIB), stream=0, device=0)
    assert job.wait(60) and job.error() is None, job.error()
    assert np.array_equal(read_back(engine, path, job, src.nbytes), src)
    assert engine.staging_bytes_allocated() == 6 * MIB
    assert C._emulated_device_stats()["registered"] == (0 if refuse else 6)
    del job, engine
    assert C._emulated_device_stats()["registered"] == 0


def test_a_chunk_reported_captured_is_saved_with_its_value_before_any_later_change(C, emulated, tmp_path, rng):
    """Lazy capture lets training overwrite a region as soon as its chunk is reported captured: the
    saved bytes must still be the ones from before, i.e. a chunk is reported only once its copy landed."""
    emulated(copy_delay_us=5000)
    engine = C.Engine(32 * MIB, MIB, pinned=True)
    src = rng.integers(0, 256, 10 * MIB, dtype=np.uint8)
    expected = src.copy()
    path = str(tmp_path / "lazy.bin")
    job = engine.save([path], device_chunks(src, MIB), stream=0, device=0)
    overwritten: set[int] = set()
    deadline = time.monotonic() + 60
    while len(overwritten) < 10 and time.monotonic() < deadline:
        for i in range(10):
            if i not in overwritten and job.chunk_captured(i):
                src[i * MIB:(i + 1) * MIB] ^= 0xFF  # "the optimizer step" changes the region at once
                overwritten.add(i)
    assert overwritten == set(range(10))
    assert job.wait(60) and job.error() is None
    assert np.array_equal(read_back(engine, path, job, src.nbytes), expected)


def test_a_pool_of_two_slabs_with_copies_queued_neither_deadlocks_nor_mixes_chunks(C, emulated, tmp_path, rng):
    emulated(copy_delay_us=1000)
    engine = C.Engine(2 * MIB, MIB, io_threads=1, pinned=True)
    src = rng.integers(0, 256, 9 * MIB, dtype=np.uint8)
    path = str(tmp_path / "small.bin")
    job = engine.save([path], device_chunks(src, MIB), stream=0, device=0, staging_timeout_ms=20000)
    assert job.wait(60) and job.error() is None
    assert engine.staging_bytes_allocated() <= 2 * MIB
    assert engine.staging_bytes_in_use() == 0
    assert np.array_equal(read_back(engine, path, job, src.nbytes), src)


def test_device_chunks_of_mixed_sizes_share_split_slabs_while_their_copies_are_queued(C, emulated, tmp_path, rng):
    """Tails and small tensors (0.1-0.5 MiB) between full 1 MiB chunks, copies slowed so that blocks
    of one split slab are written by queued copies at once, in a pool of two slabs: every chunk
    lands whole in its own block, and all slabs come back whole."""
    emulated(copy_delay_us=1000)
    engine = C.Engine(2 * MIB, MIB, io_threads=1, pinned=True)
    sizes = [MIB, 300_000, 200_000, MIB, 100_000, 500_000, 250_000, 120_000, MIB, 400_000, 60_000, 5_000]
    src = rng.integers(0, 256, sum(sizes), dtype=np.uint8)
    chunks, off = [], 0
    for n in sizes:
        chunks.append((0, 1, [(addr(src) + off, n, 0)]))
        off += n
    path = str(tmp_path / "mixed.bin")
    job = engine.save([path], chunks, stream=0, device=0, staging_timeout_ms=20000)
    assert job.wait(60) and job.error() is None
    assert engine.staging_bytes_allocated() <= 2 * MIB
    assert engine.staging_bytes_in_use() == 0
    assert np.array_equal(read_back(engine, path, job, src.nbytes), src)


@pytest.mark.parametrize("fail_copy_at", [0, 2, 5])
def test_a_copy_failing_mid_stream_fails_the_save_and_gives_back_every_slab(C, emulated, tmp_path, rng, fail_copy_at):
    # 12 chunks, copies queued behind the failing one; the pool is large enough that none waits for a slab.
    emulated(copy_delay_us=2000, fail_copy_at=fail_copy_at)
    engine = C.Engine(16 * MIB, MIB, pinned=True)
    src = rng.integers(0, 256, 12 * MIB, dtype=np.uint8)
    job = engine.save([str(tmp_path / "bad.bin")], device_chunks(src, MIB), stream=0, device=0)
    assert job.wait(60)
    assert "illegal memory access" in (job.error() or "")
    assert not job.chunk_captured(fail_copy_at)
    assert engine.staging_bytes_in_use() == 0  # the failed chunk's slab and those queued behind it
    assert C._emulated_device_stats()["live_events"] == 0
    # A healthy device again (as after a restart of the context): the same engine saves exactly.
    emulated(copy_delay_us=500)
    path = str(tmp_path / "good.bin")
    job = engine.save([path], device_chunks(src, MIB), stream=0, device=0)
    assert job.wait(60) and job.error() is None
    assert engine.staging_bytes_in_use() == 0
    assert np.array_equal(read_back(engine, path, job, src.nbytes), src)


def test_unchanged_device_chunks_are_referenced_and_forced_collisions_caught_by_the_crc(C, emulated, tmp_path, rng):
    """Constant fingerprints make every chunk look unchanged; the CRC of each staged copy decides,
    for chunks checked while later copies are still queued."""
    emulated(copy_delay_us=1000)
    engine = C.Engine(32 * MIB, MIB, pinned=True)
    src = rng.integers(0, 256, 8 * MIB, dtype=np.uint8)
    first = engine.save([str(tmp_path / "a.bin")], device_chunks(src, MIB), stream=0, device=0,
                        fingerprint=True, constant_fp=True)
    assert first.wait(60) and first.error() is None
    crcs = [r[5] for r in first.results()]
    changed = {1, 4, 5}
    for i in changed:
        src[i * MIB + 17] ^= 0x5A
    expect = [(i, 0, True, crc) for i, crc in enumerate(crcs)]
    path = str(tmp_path / "b.bin")
    second = engine.save([path], device_chunks(src, MIB), stream=0, device=0, fingerprint=True,
                         constant_fp=True, expect=expect)
    assert second.wait(60) and second.error() is None
    status = [s for _, s in second.incremental()]
    assert status == [2 if i in changed else 1 for i in range(8)]
    for i in changed:
        o, s, r, c, k, raw_crc = second.results()[i]
        assert raw_crc == C.crc32c(src[i * MIB:(i + 1) * MIB])
        out = np.zeros(MIB, dtype=np.uint8)
        assert engine.read([path], [(0, o, s, r, c, k, [(0, addr(out), r, -1)])]) == []
        assert np.array_equal(out, src[i * MIB:(i + 1) * MIB])


def test_device_fingerprints_on_the_emulated_device_equal_the_host_ones(C, emulated, rng):
    src = rng.integers(0, 256, 3 * MIB + 5, dtype=np.uint8)
    assert C.fingerprint_addr(addr(src), src.nbytes, 0) == C.fingerprint_addr(addr(src), src.nbytes, -1)


@pytest.fixture
def shm_dir():
    """A directory on tmpfs, where the engine checksums a chunk where it lies (the memory tier)."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="pyckpt-emu-", dir="/dev/shm")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("codec,where", [(0, "disk"), (1, "disk"), (0, "tmpfs")])
def test_reads_into_a_device_go_through_page_locked_memory(C, emulated, tmp_path, shm_dir, rng, codec, where):
    """Every host-to-device copy of a read starts from page-locked memory: the read lands there,
    the decoder writes there, or a chunk checksummed in the memory tier's mapping is staged there."""
    src = rng.integers(0, 4, 3 * MIB, dtype=np.uint8)  # 2 bits of entropy a byte: zstd compresses it
    host = C.Engine(16 * MIB, MIB)
    path = os.path.join(tmp_path if where == "disk" else shm_dir, "r.bin")
    job = host.save([path], [(0, 1, [(addr(src) + o, MIB, -1)]) for o in range(0, src.nbytes, MIB)], codec=codec)
    assert job.wait(60) and job.error() is None
    assert all(r[4] == codec for r in job.results())
    emulated()
    engine = C.Engine(16 * MIB, MIB, pinned=True)
    on_device = np.zeros(src.nbytes, dtype=np.uint8)
    on_host = np.zeros(src.nbytes, dtype=np.uint8)
    reads = []
    for (o, s, r, c, k, _), off in zip(job.results(), range(0, src.nbytes, MIB)):
        half = r // 2  # the first half of each chunk to the "device", the rest to host memory
        reads.append((0, o, s, r, c, k, [(0, addr(on_device) + off, half, 0),
                                         (half, addr(on_host) + off + half, r - half, -1)]))
    assert engine.read([path], reads) == []
    for off in range(0, src.nbytes, MIB):
        half = MIB // 2
        assert np.array_equal(on_device[off:off + half], src[off:off + half])
        assert np.array_equal(on_host[off + half:off + MIB], src[off + half:off + MIB])
    stats = C._emulated_device_stats()
    assert stats["h2d_copies"] == 3
    assert stats["h2d_pageable"] == 0, stats


def test_each_device_waits_for_the_work_queued_on_its_own_callers_stream(C, emulated, tmp_path, rng):
    """A model spread over two GPUs of one process: the copies from device 1 must wait for the
    kernels queued on the caller's stream of device 1 (held here, as if still running), not only for
    those of device 0. Whatever those kernels write before they finish is what the checkpoint holds."""
    emulated()
    engine = C.Engine(16 * MIB, MIB, pinned=True)
    on0 = rng.integers(0, 256, MIB, dtype=np.uint8)
    on1 = rng.integers(0, 256, MIB, dtype=np.uint8)
    stream0, stream1 = 0x1000, 0x2000
    C._emulated_hold_stream(stream1, True)
    path = str(tmp_path / "two.bin")
    job = engine.save([path], [(0, 1, [(addr(on0), MIB, 0)]), (0, 1, [(addr(on1), MIB, 1)])],
                      stream=stream0, device=0, streams=[(1, stream1)])
    assert job.wait_captured(0.2) is False and not job.chunk_captured(1)
    on1[:] = 7  # the "kernel" on device 1 finishes its write ...
    C._emulated_hold_stream(stream1, False)  # ... and its stream moves past the save's event
    assert job.wait(60) and job.error() is None
    (o0, s0, r0, c0, k0, _), (o1, s1, r1, c1, k1, _) = job.results()
    out = np.zeros(2 * MIB, dtype=np.uint8)
    assert engine.read([path], [(0, o0, s0, r0, c0, k0, [(0, addr(out), r0, -1)]),
                                (0, o1, s1, r1, c1, k1, [(0, addr(out) + MIB, r1, -1)])]) == []
    assert np.array_equal(out[:MIB], on0) and bool((out[MIB:] == 7).all())
