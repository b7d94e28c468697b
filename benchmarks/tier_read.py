"""Reading a memory-tier file (/dev/shm) back into memory: the two ways the engine does it (not a test).

    python benchmarks/tier_read.py [--mb 256] [--rounds 7]

A restore from the memory tier reads each chunk where it lies in its tmpfs file. Into memory the
caller drops if the read fails (new tensors: an optimizer's moments at a relaunch), the engine copies
each piece and computes the chunk's CRC32C in the same pass (``direct=True``); into the caller's live
tensors it must verify the chunk before writing a byte, so it checksums first and copies after
(``direct=False``, two passes). Both are timed here in the same run, alternating, into destination
memory never touched before (fresh anonymous pages: each 4 KiB page faults on its first write, as a
relaunch's new tensors do) and into memory already touched. Prints medians (the first round dropped)
and the ratio of the two ways.
"""
from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time
import uuid

import numpy as np

from pyckpt import _native


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=256, help="bytes of state, MiB")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--chunk-mb", type=int, default=64)
    args = ap.parse_args()
    C = _native.native()
    chunk = args.chunk_mb << 20
    engine = C.Engine(chunk * 2, chunk, io_threads=4, copy_threads=2)
    src = np.random.default_rng(0).standard_normal(args.mb << 18, dtype=np.float32)
    n = src.nbytes
    offsets = list(range(0, n, chunk))
    path = os.path.join("/dev/shm", f"pyckpt-bench-{uuid.uuid4().hex}.bin")
    try:
        job = engine.save([path], [(0, 4, [(src.ctypes.data + o, min(chunk, n - o), -1)]) for o in offsets],
                          map_files=True)
        if not job.wait(120) or job.error():
            raise SystemExit(f"save failed: {job.error()}")
        results = job.results()
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for memory in ("fresh", "touched"):
                for way in ("one pass (direct=True)", "verify, then copy (direct=False)"):
                    buf = mmap.mmap(-1, n)  # anonymous, never touched: page faults on first write
                    dst = np.frombuffer(buf, dtype=np.float32)
                    if memory == "touched":
                        dst[:] = 0
                    specs = [(0, off, stored, raw, crc, codec, [(0, dst.ctypes.data + o, raw, -1)])
                             for o, (off, stored, raw, crc, codec, _raw_crc) in zip(offsets, results)]
                    t0 = time.perf_counter()
                    errors = engine.read([path], specs, True, direct=way.startswith("one pass"))
                    took = time.perf_counter() - t0
                    if errors or not np.array_equal(dst, src):
                        raise SystemExit(f"read back wrong: {errors}")
                    times.setdefault((memory, way), []).append(took)
                    del dst
                    buf.close()
    finally:
        if os.path.exists(path):
            os.unlink(path)
    print(f"{args.mb} MiB, chunks of {args.chunk_mb} MiB, {args.rounds} rounds (first dropped), medians:\n")
    print("| destination | one pass (direct=True) | verify, then copy (direct=False) | one pass / two |")
    print("|---|---:|---:|---:|")
    for memory in ("fresh", "touched"):
        one = statistics.median(times[(memory, "one pass (direct=True)")][1:])
        two = statistics.median(times[(memory, "verify, then copy (direct=False)")][1:])
        print(f"| {memory} | {one * 1e3:.1f} ms ({n / one / 1e9:.2f} GB/s) | {two * 1e3:.1f} ms "
              f"({n / two / 1e9:.2f} GB/s) | {one / two:.2f} |")


if __name__ == "__main__":
    main()
