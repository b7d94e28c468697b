"""Which storages a load reads straight into GPU memory (pyckpt/reader.py ``_gpu_storages``).

The reads themselves need a GPU (tests/test_api_gpu.py); the choice does not, so it is checked here
against a stand-in card (free memory, current device) and stand-in ``into=`` targets, which only
need ``is_cuda`` and ``device``. The real tensor path runs in tests/test_api_gpu.py on a GPU machine.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pyckpt import reader

GIB = 1 << 30


@pytest.fixture
def card(monkeypatch):
    """A CUDA engine and one 80 GiB card whose free memory the test sets."""
    state = {"free": 40 * GIB}
    monkeypatch.setattr(reader, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (state["free"], 80 * GIB))
    return state


def entry(sid: int, device: str = "cuda:0") -> dict:
    return {"storage": sid, "device": device}


def gpu_target() -> SimpleNamespace:
    return SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))


def cpu_target() -> SimpleNamespace:
    return SimpleNamespace(is_cuda=False, device=torch.device("cpu"))


CUDA0 = torch.device("cuda", 0)


def test_new_gpu_tensors_and_gpu_targets_that_fit_are_read_into_the_device(card):
    entries = [entry(0), entry(1, "cpu"), entry(2), entry(3)]
    dests = {2: gpu_target(), 3: cpu_target()}
    sizes = {0: GIB, 1: GIB, 2: GIB, 3: GIB}
    assert reader._gpu_storages(entries, dests, sizes, None) == {0: CUDA0, 2: CUDA0}
    # map_location moves a CPU-saved tensor loaded as new onto the GPU, and a GPU-saved one off it.
    assert reader._gpu_storages(entries, {}, sizes, "cuda") == {0: CUDA0, 1: CUDA0, 2: CUDA0, 3: CUDA0}
    assert reader._gpu_storages(entries, {}, sizes, "cpu") == {}


def test_gpu_targets_that_do_not_fit_beside_the_headroom_go_through_the_host(card):
    entries = [entry(0), entry(1)]
    dests = {1: gpu_target()}
    sizes = {0: 4 * GIB, 1: 30 * GIB}
    # 34 GiB needed; free 40 GiB leaves 6 GiB, under a tenth of the 80 GiB card: the target is dropped,
    # the new tensor (whose memory the device must hold anyway) stays.
    assert reader._gpu_storages(entries, dests, sizes, None) == {0: CUDA0}
    card["free"] = 43 * GIB
    assert reader._gpu_storages(entries, dests, sizes, None) == {0: CUDA0, 1: CUDA0}


def test_a_storage_whose_users_disagree_is_read_into_host_memory(card):
    # One storage viewed by a GPU target and by a CPU target, or by a new tensor and a CPU target.
    entries = [entry(0), entry(0), entry(1), entry(1)]
    dests = {0: gpu_target(), 1: cpu_target(), 3: cpu_target()}
    assert reader._gpu_storages(entries, dests, {0: GIB, 1: GIB}, None) == {}
    # ... but a view loaded as new beside a GPU target of the same storage agree.
    assert reader._gpu_storages([entry(0), entry(0)], {0: gpu_target()}, {0: GIB}, None) == {0: CUDA0}


def test_nothing_is_read_into_a_device_without_a_cuda_engine(card, monkeypatch):
    monkeypatch.setattr(reader, "cuda_available", lambda: False)
    assert reader._gpu_storages([entry(0)], {}, {0: GIB}, None) == {}
