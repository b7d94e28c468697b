"""Every long engine call releases the GIL.

With the switch interval set to an hour, a thread holding the GIL keeps it
until it blocks or releases it explicitly. A Python thread that increments a
counter (sleeping briefly between increments) can therefore only advance
while the main thread is inside a native call if that call released the GIL.
"""
from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

from native_helpers import bf16_normal, plan, read_chunks, save_chunks

CHUNK = 1 << 20


@pytest.fixture
def ticker():
    state = {"n": 0, "stop": False}

    def run():
        while not state["stop"]:
            state["n"] += 1
            time.sleep(0.0002)

    old = sys.getswitchinterval()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(0.01)
    sys.setswitchinterval(3600)
    try:
        yield state
    finally:
        sys.setswitchinterval(old)
        state["stop"] = True
        t.join()


def advanced_during(ticker, fn) -> int:
    before = ticker["n"]
    fn()
    return ticker["n"] - before


def test_wait_releases_the_gil(make_engine, tmp_path, rng, ticker):
    engine = make_engine(chunk_bytes=CHUNK, io_threads=1)
    src = rng.standard_normal(4 * CHUNK // 8)
    job = engine.save([str(tmp_path / "a.bin")], save_chunks(plan([src], CHUNK), [src]), write_delay_us=50_000)
    assert advanced_during(ticker, lambda: job.wait(30)) > 0
    assert job.error() is None


def test_read_and_crc_release_the_gil(C, make_engine, tmp_path, rng, ticker):
    engine = make_engine(staging_bytes=4 * CHUNK, chunk_bytes=CHUNK)
    arrays = [bf16_normal(rng, 24 * CHUNK // 2)]
    layout = plan(arrays, CHUNK)
    path = str(tmp_path / "a.bin")
    job = engine.save([path], save_chunks(layout, arrays), codec=1)
    assert job.wait(60) and job.error() is None
    dests = [np.zeros_like(arrays[0])]
    chunks = read_chunks(layout, job.results(), dests)
    assert advanced_during(ticker, lambda: engine.read([path], chunks)) > 0
    assert np.array_equal(dests[0], arrays[0])
    big = rng.bytes(256 << 20)
    assert advanced_during(ticker, lambda: C.crc32c(big)) > 0
