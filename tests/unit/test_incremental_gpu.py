"""Incremental chunks on CUDA tensors: the fingerprint kernel equals the CPU definition, and an
unchanged GPU chunk is neither copied to the host nor written (needs a CUDA build and a GPU)."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

import pyckpt
from pyckpt import knobs
from pyckpt._native import native

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    C = native()
    if not (C.cuda_available() and torch.cuda.is_available()):
        pytest.skip("needs a CUDA build of pyckpt._C and a visible GPU")
    return torch.device("cuda", 0)


def test_kernel_fingerprint_equals_the_cpu_one_at_any_size_and_alignment(cuda):
    C = native()
    g = torch.Generator().manual_seed(0)
    host = torch.randint(0, 256, ((8 << 20) + 77,), dtype=torch.uint8, generator=g)
    dev = host.to(cuda)
    torch.cuda.synchronize()
    for off in (0, 1, 3, 8, 16, 40):
        for n in (0, 1, 31, 32, 33, 100, 4096, 65537, (8 << 20) - 3):
            want = C.fingerprint(host[off:off + n].numpy().tobytes())
            assert C.fingerprint_addr(dev.data_ptr() + off, n, 0) == want, (off, n)


def _part(step_dir: str) -> dict:
    with open(os.path.join(step_dir, "rank-00000.json"), "rb") as f:
        return json.loads(f.read())


def test_unchanged_gpu_chunks_are_referenced_and_collisions_caught(cuda, tmp_path, caplog):
    frozen = torch.randn(3 << 20, device=cuda)  # 12 MiB: three 4 MiB chunks
    moving = torch.randn(1 << 18, device=cuda)
    state = {"frozen": frozen, "moving": moving}
    with pyckpt.Checkpointer(str(tmp_path / "a")) as ck:
        ck.save(1, state).result(60)
        moving.add_(1.0)
        second = ck.save(2, state).result(60)
    part = _part(second)
    assert sum(c["file"].startswith("../") for c in part["chunks"]) == 3
    out = pyckpt.load(second)
    assert out["frozen"].device == cuda and torch.equal(out["frozen"], frozen) and torch.equal(out["moving"], moving)
    # Forced collisions: the device-side CRC check (copy to staging, no write) still catches them.
    with knobs.override(PYCKPT_TEST_FINGERPRINT="constant", PYCKPT_INCREMENTAL_VERIFY="all"), \
            pyckpt.Checkpointer(str(tmp_path / "b")) as ck:
        ck.save(1, state).result(60)
        if ck._baseline._precheck is not None:  # a moved chunk is expected only once its reference is checked
            ck._baseline._precheck.join(60)
        moving.add_(1.0)
        with caplog.at_level(logging.WARNING, logger="pyckpt"):
            second = ck.save(2, state).result(60)
    assert any("fingerprint collision" in r.getMessage() for r in caplog.records)
    out = pyckpt.load(second)
    assert torch.equal(out["moving"], moving) and torch.equal(out["frozen"], frozen)
