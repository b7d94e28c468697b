"""GPU capture and restore through the engine (CUDA build + a device needed).

These run on GPU machines only (`-m gpu`); CPU CI skips them.
"""
from __future__ import annotations

import os

import pytest

from native_helpers import proc_kib

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

CHUNK = 1 << 20


@pytest.fixture
def cuda(C):
    if not (C.cuda_available() and torch.cuda.is_available()):
        pytest.skip("needs a CUDA build of pyckpt._C and a visible GPU")
    return torch.device("cuda", 0)


def test_device_round_trip_with_zstd(C, cuda, tmp_path):
    engine = C.Engine(8 * CHUNK, CHUNK, pinned=True)
    src = torch.randn(3 * CHUNK // 2, dtype=torch.bfloat16, device=cuda)
    nbytes = src.numel() * 2
    files = [str(tmp_path / "d.bin")]
    chunks, off = [], 0
    while off < nbytes:
        n = min(CHUNK, nbytes - off)
        chunks.append((0, 2, [(src.data_ptr() + off, n, 0)]))
        off += n
    stream = torch.cuda.current_stream().cuda_stream
    job = engine.save(files, chunks, codec=1, stream=stream, device=0)
    assert job.wait(60) and job.error() is None
    dst = torch.empty_like(src)
    reads, off = [], 0
    for (f, _, _), (o, s, r, c, k, _) in zip(chunks, job.results()):
        reads.append((f, o, s, r, c, k, [(0, dst.data_ptr() + off, r, 0)]))
        off += r
    assert engine.read(files, reads) == []
    assert torch.equal(dst, src)


def test_capture_sees_work_queued_before_save(C, cuda, tmp_path):
    """Kernels queued on the caller's stream before save() must be visible
    to the capture, even if they are still running when save() is called."""
    engine = C.Engine(8 * CHUNK, CHUNK, pinned=True)
    x = torch.zeros(CHUNK // 4, device=cuda)
    big = torch.randn(4096, 4096, device=cuda)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(20):  # keep the stream busy
            big = big @ big / 64
        x.fill_(7.0)
        job = engine.save([str(tmp_path / "e.bin")], [(0, 4, [(x.data_ptr(), CHUNK, 0)])],
                          stream=stream.cuda_stream, device=0)
    assert job.wait(60) and job.error() is None
    out = torch.empty(CHUNK // 4)
    (o, s, r, c, k, _), = job.results()
    assert engine.read([str(tmp_path / "e.bin")], [(0, o, s, r, c, k, [(0, out.data_ptr(), r, -1)])]) == []
    assert bool((out == 7.0).all())


def test_pinned_slabs_are_huge_pages_page_locked_in_place(C, cuda, tmp_path):
    """On a GPU the staging slabs are the pool's own mappings on huge pages, page-locked by
    cudaHostRegister (tests/native/test_staging_pool.py checks the same on the emulated device).
    Fails where the driver refused to page-lock them and cudaHostAlloc's 4 KiB pages were used."""
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        if "[never]" in f.read():
            pytest.skip("the kernel grants no transparent huge pages here")

    def huge_kib() -> int:
        return proc_kib("/proc/self/smaps", "AnonHugePages")

    chunk = 4 * CHUNK
    engine = C.Engine(4 * chunk, chunk, pinned=True)
    src = torch.randn(4 * chunk // 4, device=cuda)
    before = huge_kib()
    chunks = [(0, 4, [(src.data_ptr() + i * chunk, chunk, 0)]) for i in range(4)]
    job = engine.save([str(tmp_path / "h.bin")], chunks, stream=torch.cuda.current_stream().cuda_stream, device=0)
    assert job.wait(60) and job.error() is None
    assert engine.staging_bytes_allocated() == 4 * chunk
    assert huge_kib() - before >= 2048
