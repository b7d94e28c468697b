"""Loading as new tensors: a tensor that is its storage's only view is read into the tensor itself
(no byte buffer, no view built over it) and comes back exactly as saved."""
import torch

import pyckpt
from pyckpt import reader


def test_sole_views_are_read_in_place_and_come_back_as_saved(tmp_path, monkeypatch):
    base = torch.arange(12, dtype=torch.float32)
    state = {
        "plain": torch.arange(6, dtype=torch.float64).reshape(2, 3),
        "odd_stride": torch.arange(4, dtype=torch.float32).reshape(1, 4).as_strided((1, 4), (9, 1)),
        "grad": torch.ones(3, requires_grad=True),
        "i8": torch.tensor([1, -2, 3], dtype=torch.int8),
        "v1": base[:6], "v2": base[6:],  # one storage, two views: rebuilt as views of one buffer
    }
    path = pyckpt.save(state, tmp_path / "c")
    views = []
    real = reader._view
    monkeypatch.setattr(reader, "_view", lambda buf, dt, e: views.append(e["shape"]) or real(buf, dt, e))
    out = pyckpt.load(path)
    assert views == [[6], [6]]  # only the two views of the shared storage were built over a buffer
    for k, t in state.items():
        got = out[k]
        assert got.dtype == t.dtype and got.shape == t.shape and got.stride() == t.stride(), k
        assert torch.equal(got.detach(), t.detach()), k
    assert out["grad"].requires_grad and not out["plain"].requires_grad
    assert out["v1"].untyped_storage().data_ptr() == out["v2"].untyped_storage().data_ptr()
    assert out["plain"].untyped_storage().nbytes() == 48
