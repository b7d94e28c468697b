"""The staging pool: chunks much smaller than a slab (a large tensor's tail, a tensor that keeps
its chunks to itself) take a block of a split slab, not a whole one, and a split slab is whole
again once all its blocks are back."""
from __future__ import annotations

import os

import numpy as np
import pytest

from native_helpers import Layout, read_chunks, run_child, save_chunks

CHUNK = 1 << 20


def _own_chunks(arrays: list[np.ndarray]) -> Layout:
    """One chunk per array, holding nothing else (as the planner does for large storages)."""
    return Layout(CHUNK, [(0, 8, [(i, 0, a.nbytes)]) for i, a in enumerate(arrays)])


def _save_and_check(engine, path: str, arrays: list[np.ndarray], **kw) -> None:
    layout = _own_chunks(arrays)
    job = engine.save([path], save_chunks(layout, arrays), **kw)
    assert job.wait(60)
    assert job.error() is None, job.error()
    dests = [np.zeros_like(a) for a in arrays]
    assert engine.read([path], read_chunks(layout, job.results(), dests)) == []
    assert all(np.array_equal(d, a) for d, a in zip(dests, arrays))


def test_small_chunks_share_slabs_so_capture_does_not_wait_for_the_disk(make_engine, tmp_path, rng):
    """Eight chunks of 0.13-0.25 MiB in a pool of two 1 MiB slabs, every write slowed to 1 s: each
    takes a quarter slab, so all are captured at once. With a whole slab each, the third waited
    for a write (1 s) past the 0.5 s staging timeout and the save was skipped."""
    engine = make_engine(staging_bytes=2 * CHUNK, chunk_bytes=CHUNK, io_threads=4)
    arrays = [rng.standard_normal((CHUNK // 4 - 16_384 * k) // 8) for k in range(8)]
    _save_and_check(engine, str(tmp_path / "a.bin"), arrays, write_delay_us=1_000_000, staging_timeout_ms=500)
    assert engine.staging_bytes_allocated() == 2 * CHUNK  # the pool did not grow
    assert engine.staging_bytes_in_use() == 0


def test_split_slabs_are_whole_again_for_full_chunks_and_other_sizes(make_engine, tmp_path, rng):
    """After the quarter blocks are back, full chunks get the same two slabs (no wait, no growth);
    then a mix of a full chunk with its tail, halves and sixteenths, all read back exactly."""
    engine = make_engine(staging_bytes=2 * CHUNK, chunk_bytes=CHUNK, io_threads=2)
    small = [rng.standard_normal(CHUNK // 4 // 8) for _ in range(8)]
    _save_and_check(engine, str(tmp_path / "a.bin"), small)
    full = [rng.standard_normal(CHUNK // 8) for _ in range(2)]
    _save_and_check(engine, str(tmp_path / "b.bin"), full, staging_timeout_ms=500)
    tail = rng.standard_normal(CHUNK // 8 + 1000)  # a full chunk and a 8,000-byte tail
    layout = Layout(CHUNK, [(0, 8, [(0, 0, CHUNK)]), (0, 8, [(0, CHUNK, tail.nbytes - CHUNK)])])
    mixed = [rng.standard_normal(n // 8) for n in (CHUNK // 2, 40_000, 60_000)]
    layout.chunks += [(0, 8, [(i + 1, 0, a.nbytes)]) for i, a in enumerate(mixed)]
    arrays = [tail, *mixed]
    path = str(tmp_path / "c.bin")
    job = engine.save([path], save_chunks(layout, arrays), staging_timeout_ms=10_000)
    assert job.wait(60) and job.error() is None, job.error()
    dests = [np.zeros_like(a) for a in arrays]
    assert engine.read([path], read_chunks(layout, job.results(), dests)) == []
    assert all(np.array_equal(d, a) for d, a in zip(dests, arrays))
    assert engine.staging_bytes_allocated() == 2 * CHUNK and engine.staging_bytes_in_use() == 0
    assert os.path.getsize(path) >= tail.nbytes + sum(a.nbytes for a in mixed)


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


@pytest.mark.skipif(_thp_mode() == "never", reason="the kernel grants no transparent huge pages here")
@pytest.mark.parametrize("kind", ["host", "pinned"])
def test_slabs_of_whole_huge_pages_are_backed_by_huge_pages(tmp_path, kind):
    """4 MiB slabs start on a 2 MiB boundary and ask for transparent huge pages, so an O_DIRECT
    write pins 512x fewer pages; pinned slabs (a GPU's staging) are such slabs page-locked in place,
    not cudaHostAlloc'd 4 KiB pages. Counted from /proc/self/smaps in a child, around the save that
    allocates the slabs (the pool keeps them); the source array exists before the first count, so
    only staging memory can change it."""
    out = run_child(f"""
        import numpy as np
        from pyckpt import _native
        from native_helpers import proc_kib, slab_engine

        engine, save, registered = slab_engine(_native.native(), {kind!r}, 16 << 20)
        src = np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8)
        before = proc_kib("/proc/self/smaps", "AnonHugePages")
        ok = save({str(tmp_path / "a.bin")!r}, src)
        print(json.dumps({{"ok": ok, "huge_kib": proc_kib("/proc/self/smaps", "AnonHugePages") - before,
                          "allocated": engine.staging_bytes_allocated(), "registered": registered()}}))
    """)
    assert out["ok"] and out["allocated"] == 16 << 20
    assert out["huge_kib"] >= 2048, out  # at least one 2 MiB page; 0 without the advice
    assert out["registered"] == (4 if kind == "pinned" else 0), out  # each pinned slab page-locked where it lies


@pytest.mark.parametrize("kind", ["host", "pinned"])
def test_a_forked_child_does_not_inherit_the_slabs(tmp_path, kind):
    """A fork-based DataLoader worker never uses the engine it inherits; were the slabs inherited,
    every fork would share them copy-on-write and the parent's next capture would copy them page by
    page while the worker lives. The child's address space is smaller by the slabs' bytes."""
    out = run_child(f"""
        import numpy as np
        from pyckpt import _native
        from native_helpers import proc_kib, slab_engine

        def vm_kib():
            return proc_kib("/proc/self/status", "VmSize")

        engine, save, _ = slab_engine(_native.native(), {kind!r}, 64 << 20)
        ok = save({str(tmp_path / "a.bin")!r}, np.arange(64 << 20, dtype=np.uint8))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, str(vm_kib()).encode())
            os._exit(0)
        os.close(w)
        child = int(os.read(r, 64))
        os.waitpid(pid, 0)
        print(json.dumps({{"ok": ok, "allocated": engine.staging_bytes_allocated(), "parent": vm_kib(),
                          "child": child}}))
    """)
    assert out["ok"] and out["allocated"] == 64 << 20
    assert out["parent"] - out["child"] >= 64 << 10, out  # KiB: all 16 slabs stayed with the parent
