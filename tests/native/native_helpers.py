"""Helpers shared by the tests in tests/native: build save/read chunk lists
for numpy buffers, and independent reference implementations."""
from __future__ import annotations

import json
import os
import textwrap
import time
from dataclasses import dataclass, field

import numpy as np

CRC32C_POLY = 0x82F63B78
HERE = os.path.dirname(os.path.abspath(__file__))


def run_child(body: str, env: dict[str, str] | None = None) -> dict:
    """Run ``body`` in a forked child with native_helpers importable; returns the JSON it prints last."""
    import zygote  # tests/zygote.py; only the parent test process starts children

    script = f"import json, os, sys, time\nsys.path.insert(0, {HERE!r})\n" + textwrap.dedent(body)
    r = zygote.shared().run(script, env=dict(os.environ, **(env or {})))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    """CRC32C computed one bit at a time, straight from the definition."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ CRC32C_POLY if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def addr(a: np.ndarray) -> int:
    assert a.flags["C_CONTIGUOUS"]
    return a.ctypes.data


@dataclass
class Layout:
    """Where every array's bytes went: chunk -> [(array index, byte offset in array, nbytes)]."""

    chunk_bytes: int
    chunks: list = field(default_factory=list)  # (file_idx, elem_size, [(arr, off, n)])


def plan(arrays: list[np.ndarray], chunk_bytes: int, nfiles: int = 1) -> Layout:
    """Pack arrays into chunks: large arrays span chunks, small ones share one.
    Chunks are spread round-robin over `nfiles` files."""
    layout = Layout(chunk_bytes)
    cur: list = []
    cur_bytes = 0
    cur_es = None

    def flush() -> None:
        nonlocal cur, cur_bytes
        if cur:
            layout.chunks.append((len(layout.chunks) % nfiles, cur_es, cur))
        cur, cur_bytes = [], 0

    for i, a in enumerate(arrays):
        es = a.itemsize if a.itemsize in (1, 2, 4, 8) else 1
        if es != cur_es:
            flush()
            cur_es = es
        off = 0
        while off < a.nbytes:
            take = min(a.nbytes - off, chunk_bytes - cur_bytes)
            cur.append((i, off, take))
            cur_bytes += take
            off += take
            if cur_bytes == chunk_bytes:
                flush()
    flush()
    return layout


def save_chunks(layout: Layout, arrays: list[np.ndarray]) -> list:
    return [
        (f, es, [(addr(arrays[i]) + off, n, -1) for i, off, n in pieces])
        for f, es, pieces in layout.chunks
    ]


def slab_engine(C, kind: str, budget: int, chunk: int = 4 << 20):
    """(engine, save(path, array) -> ok, registered() -> int) with staging slabs of ``kind``: "host",
    or "pinned" for chunks on the emulated device (csrc/device_emulator.cpp stands in for the CUDA
    runtime: page-locking is recorded, not done; it stays on for the rest of the process). ``save``
    writes the array in whole chunks, one slab each, and waits for it."""
    pinned = kind == "pinned"
    if pinned:
        C._emulate_device(True)
    engine = C.Engine(budget, chunk, io_threads=2, copy_threads=2, pinned=pinned)

    def save(path: str, a: np.ndarray) -> bool:
        layout = Layout(chunk, [(0, 1, [(0, off, chunk)]) for off in range(0, a.nbytes, chunk)])
        chunks = save_chunks(layout, [a])
        if pinned:
            chunks = [(f, es, [(p, n, 0) for p, n, _ in pieces]) for f, es, pieces in chunks]
            job = engine.save([path], chunks, stream=0, device=0)
        else:
            job = engine.save([path], chunks)
        return job.wait(60) and job.error() is None

    return engine, save, (lambda: C._emulated_device_stats()["registered"]) if pinned else (lambda: 0)


def proc_kib(path: str, field: str) -> int:
    """The kB figures of ``field`` in a /proc file (``/proc/self/smaps``: summed over mappings)."""
    with open(path) as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def read_chunks(layout: Layout, results: list, dests: list[np.ndarray]) -> list:
    out = []
    for (f, _es, pieces), (offset, stored, raw, crc, codec, _raw_crc) in zip(layout.chunks, results):
        read_pieces, pos = [], 0
        for i, off, n in pieces:
            read_pieces.append((pos, addr(dests[i]) + off, n, -1))
            pos += n
        out.append((f, offset, stored, raw, crc, codec, read_pieces))
    return out


def bf16_normal(rng: np.random.Generator, n: int) -> np.ndarray:
    """n bf16 values (as uint16) of N(0, 0.02): the top half of float32."""
    f = (rng.standard_normal(n, dtype=np.float32) * 0.02).view(np.uint32)
    return (f >> 16).astype(np.uint16)


def mixed_state(rng: np.random.Generator, scale: int = 1) -> list[np.ndarray]:
    """A model-like state: a few big tensors of several dtypes plus many small ones."""
    arrays = [
        rng.standard_normal(60_000 * scale, dtype=np.float32),
        bf16_normal(rng, 70_001 * scale),
        rng.standard_normal(9_999 * scale),
        rng.integers(0, 255, 33_333 * scale, dtype=np.uint8),
    ]
    arrays += [rng.standard_normal(int(rng.integers(1, 300)), dtype=np.float32) for _ in range(40)]
    return arrays


def nice_of_threads() -> dict[int, int]:
    """tid -> nice value of every thread of this process (Linux keeps one per thread)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a thread that just ended
            continue
        out[int(tid)] = int(fields[16])  # proc(5): field 19 is nice; fields[0] is field 3
    return out


def names_of_threads(tids) -> dict[int, str]:
    """tid -> the thread's name (/proc/self/task/<tid>/comm) for those of ``tids`` still running."""
    out = {}
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                out[int(tid)] = f.read().strip()
        except FileNotFoundError:
            continue
    return out


def names_once_set(tids, prefix: str = "pyckpt", timeout: float = 10.0) -> list[str]:
    """The sorted names of ``tids`` once every one of them starts with ``prefix`` (a new thread names
    itself as it starts, a moment after it appears in /proc), or at the timeout, as they are."""
    deadline = time.monotonic() + timeout
    while True:
        names = sorted(names_of_threads(tids).values())
        if all(n.startswith(prefix) for n in names) or time.monotonic() > deadline:
            return names
        time.sleep(0.01)


def new_threads(before: set[int], want: int, niced: tuple[int, int] = (0, 0), timeout: float = 10.0) -> dict[int, int]:
    """tid -> nice of the threads not in ``before``, once ``want`` of them are there and, with
    ``niced=(n, value)``, ``n`` of them at ``value`` (a worker lowers itself as it starts); or at the
    timeout, when the caller's assertion shows what there was."""
    n, value = niced
    deadline = time.monotonic() + timeout
    while True:
        now = {t: v for t, v in nice_of_threads().items() if t not in before}
        if (len(now) >= want and sum(v == value for v in now.values()) >= n) or time.monotonic() > deadline:
            return now
        time.sleep(0.01)
