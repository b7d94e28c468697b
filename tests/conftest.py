"""Shared fixtures for the whole test suite."""
from __future__ import annotations

import os

# One intra-op thread in this process and every child it starts (torchrun's default for its workers,
# and examples/_harness.py's): two pytest workers, each running several training processes, would
# otherwise put two spinning OpenMP threads per process on two cores. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every child (mp.spawn ranks, zygote children, scripts) prints its threads' Python stacks if it dies by
# a fatal signal: a rare abort on the loaded CI machine then says where it happened.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

import pytest

import zygote as zygote_module


@pytest.fixture(autouse=True)
def _isolated_pyckpt_env():
    """No test may leak PYCKPT_* settings into later tests or their subprocesses
    (a stray PYCKPT_DIR would turn transparent mode on in every child Python)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("PYCKPT_")}
    yield
    for k in [k for k in os.environ if k.startswith("PYCKPT_")]:
        if k not in saved:
            del os.environ[k]
    os.environ.update(saved)


@pytest.fixture
def zygote():
    """The session's ``zygote.Zygote``: forks real child processes that have torch and pyckpt imported
    already (crash and CLI tests start dozens of short-lived children; each saves the start-up)."""
    return zygote_module.shared()


def pytest_sessionfinish(session, exitstatus):
    zygote_module.close_shared()


@pytest.fixture
def ckpt_root(tmp_path):
    """An empty directory to use as a checkpoint root."""
    root = tmp_path / "ckpts"
    root.mkdir()
    return str(root)


@pytest.fixture
def knob_env():
    """Set PYCKPT_* settings for one test and rebuild the engine so it sees them.

    Usage: ``knob_env(PYCKPT_CHUNK_MB=1, PYCKPT_STAGING_MB=8)``. Everything is
    restored (and the engine rebuilt again) after the test."""
    from pyckpt import _native, knobs

    saved: dict[str, str | None] = {}

    def set_knobs(**values):
        for k, v in values.items():
            if k not in knobs.KNOBS:
                raise KeyError(k)
            saved.setdefault(k, os.environ.get(k))
            os.environ[k] = str(v)
        _native.reset_engine()

    yield set_knobs
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _native.reset_engine()


@pytest.fixture
def byte_equal():
    """``byte_equal(a, b)``: see ``_byte_equal``."""
    return _byte_equal


def _byte_equal(a, b) -> bool:
    """Bitwise equality of two tensors' elements plus dtype/shape (NaN payloads included)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    sz = a.element_size()
    if sz in ints:
        return torch.equal(a.contiguous().view(ints[sz]), b.contiguous().view(ints[sz]))
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.fixture
def flip_data_byte():
    """``flip_data_byte(ckpt_dir, offset=10)``: invert one byte of rank 0's data file (bit rot)."""

    def flip(ckpt_dir, offset=10):
        p = os.path.join(ckpt_dir, "rank-00000", "data-000.bin")
        with open(p, "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ 0xFF]))

    return flip
