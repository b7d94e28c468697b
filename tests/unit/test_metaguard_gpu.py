"""pyckpt/metaguard.py with CUDA tensors (run where a GPU exists): a tensor moved between the host and
a GPU, or between GPUs, is refused, so the planner never reuses a layout across devices."""
import pytest
import torch

from pyckpt import metaguard, planner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_device_changes_are_refused():
    x = torch.randn(4, 6, device="cuda")
    g = metaguard.make([x])
    assert g is not None and g.same([torch.zeros(4, 6, device="cuda")])
    assert not g.same([x.cpu()])
    if torch.cuda.device_count() > 1:
        assert not g.same([x.to("cuda:1")])


def test_a_reused_cuda_layout_is_described_afresh_on_the_host():
    ts = [torch.randn(8, device="cuda"), torch.randn(3, 3, device="cuda")]
    first = planner.describe(ts, ["a", "b"])
    second = planner.describe(ts, ["a", "b"], reuse=first)  # the guard is made here
    assert second.storages is first.storages and second.columns.guard
    host = [t.cpu() for t in ts]
    third = planner.describe(host, ["a", "b"], reuse=second)
    assert third.storages is not first.storages and [e["device"] for e in third.entries] == ["cpu", "cpu"]
