"""CUDA tensors through save/load and the Checkpointer (run where a GPU exists)."""
import pytest
import torch

import pyckpt

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or not pyckpt.cuda_available(),
                                 reason="needs CUDA and an engine built with CUDA")]


def test_cuda_roundtrip_keeps_device_and_maps_to_cpu(tmp_path):
    base = torch.randn(1000, 33, device="cuda")
    state = {"w": base, "view": base[::3, 1:], "h": torch.randn(7, device="cuda").half(), "c": torch.ones(3)}
    pyckpt.save(state, tmp_path / "c", compress="zstd")
    out = pyckpt.load(tmp_path / "c")
    assert out["w"].device.type == "cuda" and out["c"].device.type == "cpu"
    for k in state:
        assert torch.equal(out[k], state[k])
    assert out["w"].untyped_storage().data_ptr() == out["view"].untyped_storage().data_ptr()
    cpu = pyckpt.load(tmp_path / "c", map_location="cpu")
    assert all(v.device.type == "cpu" and torch.equal(v, state[k].cpu()) for k, v in cpu.items())


def test_cuda_into_in_place(tmp_path):
    model = torch.nn.Linear(64, 64).cuda()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    pyckpt.save({"model": model.state_dict()}, tmp_path / "c")
    with torch.no_grad():
        model.weight.zero_()
    ptr = model.weight.data_ptr()
    pyckpt.load(tmp_path / "c", into={"model": model.state_dict()})
    assert model.weight.data_ptr() == ptr and torch.equal(model.weight, saved["weight"])


def test_checkpointer_capture_orders_after_queued_kernels(tmp_path):
    t = torch.zeros(8_000_000, device="cuda")
    t.add_(1.0)  # queued on the current stream before save(): must be in the checkpoint
    ck = pyckpt.Checkpointer(tmp_path / "root")
    fut = ck.save(1, {"t": t})
    assert fut.captured(60)
    t.add_(5.0)  # after capture: must not be in the checkpoint
    fut.result(60)
    assert torch.equal(ck.load(map_location="cpu")["t"], torch.ones(8_000_000))
