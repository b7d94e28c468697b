"""Fixtures for the native-engine tests: the compiled module and engines."""
from __future__ import annotations

import pytest

from pyckpt import _native


@pytest.fixture(scope="session")
def C():
    """The compiled extension ``pyckpt._C`` (zstd loaded by _native)."""
    return _native.native()


@pytest.fixture
def make_engine(C):
    """Factory for engines; every engine made is destroyed (and its jobs
    waited for) at the end of the test."""
    engines = []

    def make(staging_bytes=8 << 20, chunk_bytes=1 << 20, io_threads=2, copy_threads=2):
        e = C.Engine(staging_bytes, chunk_bytes, io_threads=io_threads, copy_threads=copy_threads)
        engines.append(e)
        return e

    yield make
    engines.clear()


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(1234)
