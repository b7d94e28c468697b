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


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_new_gpu_tensors_are_read_straight_into_device_memory_and_checked(tmp_path, compress):
    """Tensors loaded as new GPU tensors are read by the engine into device memory (through its
    page-locked buffers): several chunks per tensor, a storage shared by views, a CPU-saved tensor
    mapped to the GPU, and a damaged chunk refused with the file named."""
    big = torch.randn(3, 2_500_000, device="cuda").to(torch.bfloat16)  # 15 MB: several 4 MiB chunks
    state = {"big": big, "row": big[1], "ints": torch.arange(5_000_000, device="cuda"),
             "cpu": torch.randn(1_000_000)}
    pyckpt.save(state, tmp_path / "c", compress=compress)
    out = pyckpt.load(tmp_path / "c")
    assert out["big"].is_cuda and out["ints"].is_cuda and not out["cpu"].is_cuda
    for k in state:
        assert torch.equal(out[k], state[k])
    assert out["row"].untyped_storage().data_ptr() == out["big"].untyped_storage().data_ptr()
    mapped = pyckpt.load(tmp_path / "c", map_location="cuda")
    assert all(v.is_cuda and torch.equal(v.cpu(), state[k].cpu()) for k, v in mapped.items())
    data = max((p for p in (tmp_path / "c").rglob("*.bin")), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(pyckpt.CorruptCheckpointError, match=data.name):
        pyckpt.load(tmp_path / "c")
    # into= targets on the GPU: staged in device memory, and a damaged chunk still writes none of them.
    targets = {k: torch.zeros_like(v) for k, v in state.items() if k not in ("row", "cpu")}
    with pytest.raises(pyckpt.CorruptCheckpointError, match=data.name):
        pyckpt.load(tmp_path / "c", into=targets, strict=False)
    assert all(not bool(v.any()) for v in targets.values())


def test_gpu_into_targets_are_filled_exactly_whether_staged_on_the_device_or_not(tmp_path, monkeypatch):
    from pyckpt import reader

    state = {"w": torch.randn(4, 1_500_000, device="cuda"), "b": torch.randn(77, device="cuda").half()}
    pyckpt.save(state, tmp_path / "c")
    for headroom in (reader._GPU_HEADROOM_BYTES, 1 << 50):  # the second leaves no room: through the host
        monkeypatch.setattr(reader, "_GPU_HEADROOM_BYTES", headroom)
        targets = {k: torch.zeros_like(v) for k, v in state.items()}
        ptrs = {k: v.data_ptr() for k, v in targets.items()}
        pyckpt.load(tmp_path / "c", into=targets)
        assert all(torch.equal(targets[k], state[k]) and targets[k].data_ptr() == ptrs[k] for k in state)
