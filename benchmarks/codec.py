"""Measure the zstd/1 chunk codec on typical weights, and CRC32C.

    python benchmarks/codec.py [--chunk-mb 4] [--repeat 20]

Prints, per data kind, the stored/raw ratio and single-thread encode/decode
throughput of ``pyckpt._C.encode``/``decode`` per core, from thread CPU time
(Python call overhead and the copy into a ``bytes`` result included).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from pyckpt import _native


def _bf16_normal(rng: np.random.Generator, nbytes: int) -> bytes:
    # bf16 = the high half of an fp32 (round-toward-zero is fine for a benchmark)
    f = rng.standard_normal(nbytes // 2, dtype=np.float32) * 0.02
    return (f.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def _kinds(rng: np.random.Generator, nbytes: int) -> dict[str, tuple[bytes, int]]:
    return {
        "bf16 normal": (_bf16_normal(rng, nbytes), 2),
        "fp32 normal": ((rng.standard_normal(nbytes // 4, dtype=np.float32) * 0.02).tobytes(), 4),
        "fp32 adam v": ((rng.standard_normal(nbytes // 4, dtype=np.float32) ** 2 * 1e-6).tobytes(), 4),
        "random bytes": (rng.bytes(nbytes), 4),
        "zeros": (bytes(nbytes), 4),
    }


def _time(fn, repeat: int) -> float:
    """Seconds of this thread's CPU time per call: per-core throughput that
    other processes competing for the cores do not distort (much)."""
    fn()
    t0 = time.thread_time()
    for _ in range(repeat):
        fn()
    return (time.thread_time() - t0) / repeat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk-mb", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    C = _native.native()
    if not _native.zstd_available():
        raise SystemExit("zstd is not available")
    rng = np.random.default_rng(0)
    n = args.chunk_mb << 20
    print(f"{'data':14s} {'codec':5s} {'ratio':>6s} {'enc GB/s':>9s} {'dec GB/s':>9s}")
    for name, (data, es) in _kinds(rng, n).items():
        codec, stored = C.encode(data, es)
        assert C.decode(stored, codec, len(data)) == data
        enc = _time(lambda: C.encode(data, es), args.repeat)
        dec = _time(lambda: C.decode(stored, codec, len(data)), args.repeat)
        print(f"{name:14s} {codec:5d} {len(stored) / n:6.3f} {n / enc / 1e9:9.2f} {n / dec / 1e9:9.2f}")
    data = rng.bytes(n)
    hw = _time(lambda: C.crc32c(data), args.repeat)
    sw = _time(lambda: C.crc32c_software(data), max(1, args.repeat // 4))
    print(f"CRC32C: {n / hw / 1e9:.2f} GB/s ({'SSE4.2' if C.hw_crc32c() else 'table'}), "
          f"{n / sw / 1e9:.2f} GB/s table fallback")


if __name__ == "__main__":
    main()
