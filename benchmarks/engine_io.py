"""Measure Engine.save / Engine.read end to end on this machine (not a test).

    python benchmarks/engine_io.py [--mb 256] [--dir /tmp] [--codec none|zstd]

Saves one bf16-like array through the engine (fsync included), reads it back
and verifies it, and prints the capture, save and read throughput.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from pyckpt import _native


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--codec", default="zstd", choices=list(_native.CODEC_IDS))
    ap.add_argument("--io-threads", type=int, default=4)
    args = ap.parse_args()
    C = _native.native()
    chunk = 4 << 20
    engine = C.Engine(256 << 20, chunk, io_threads=args.io_threads, copy_threads=2)
    f = (np.random.default_rng(0).standard_normal(args.mb << 18, dtype=np.float32) * 0.02).view(np.uint32)
    src = (f >> 16).astype(np.uint16)
    n = src.nbytes
    chunks = [(0, 2, [(src.ctypes.data + o, min(chunk, n - o), -1)]) for o in range(0, n, chunk)]
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = os.path.join(d, "data.bin")
        for attempt in ("warm-up", "measured"):
            t0 = time.perf_counter()
            job = engine.save(
                [path], chunks, codec=_native.CODEC_IDS[args.codec]
            )
            job.wait_captured()
            t_cap = time.perf_counter() - t0
            assert job.wait() and job.error() is None, job.error()
            t_save = time.perf_counter() - t0
        results = job.results()
        dst = np.empty_like(src)
        reads = [(0, o, s, r, c, k, [(0, dst.ctypes.data + i * chunk, r, -1)]) for i, (o, s, r, c, k, _) in enumerate(results)]
        t0 = time.perf_counter()
        assert engine.read([path], reads) == []
        t_read = time.perf_counter() - t0
        assert np.array_equal(dst, src)
        stored = sum(r[1] for r in results)
    gb = n / 1e9
    print(f"{args.mb} MiB bf16, codec {args.codec}: stored/raw {stored / n:.3f}")
    print(f"capture {gb / t_cap:.2f} GB/s, save+fsync {gb / t_save:.2f} GB/s, read+verify {gb / t_read:.2f} GB/s")


if __name__ == "__main__":
    main()
