"""NumPy arrays and scalars in an explicit save's state (docs/FORMAT.md §8, tag ``ndarray``): a
hand-written loop keeps ``np.random.get_state()`` or a metric as ``np.float32`` next to its tensors, as
it did with torch.save. They come back as NumPy values of the same dtype, shape and bytes."""
import numpy as np
import pytest
import torch

import pyckpt
from pyckpt import Checkpointer
from pyckpt.errors import UnsupportedStateError

NUMERIC = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
           "float32", "float64", "complex64", "complex128"]


def _random_array(dtype: str, shape: tuple, seed: int) -> np.ndarray:
    """Random bytes of ``dtype`` (NaN payloads and all), so a conversion through float would show."""
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize,
                                               dtype=np.uint8)
    if dtype == "bool":
        raw %= 2
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_arrays_of_every_numeric_dtype_come_back_as_arrays_bitwise(tmp_path, compress):
    state = {d: _random_array(d, (3, 4), i) for i, d in enumerate(NUMERIC)}
    state["zero_d"] = np.array(7, dtype=np.int32)
    state["empty"] = np.zeros((0, 3), dtype=np.float32)
    pyckpt.save(state, tmp_path / "c", compress=compress)
    out = pyckpt.load(tmp_path / "c")
    assert set(out) == set(state)
    for k, a in state.items():
        b = out[k]
        assert type(b) is np.ndarray, (k, type(b))
        assert b.dtype == a.dtype and b.shape == a.shape, (k, b.dtype, b.shape)
        assert b.tobytes() == a.tobytes(), k


def test_views_byte_order_and_read_only_arrays_keep_their_values(tmp_path):
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    frozen = np.arange(5, dtype=np.int64)
    frozen.setflags(write=False)
    state = {"strided": base[::2, 1::2], "transposed": base.T, "big_endian": np.arange(6, dtype=">i4"),
             "frozen": frozen}
    pyckpt.save(state, tmp_path / "c")
    out = pyckpt.load(tmp_path / "c")
    for k, a in state.items():
        assert np.array_equal(out[k], a) and out[k].shape == a.shape, k
    assert out["big_endian"].dtype == np.int32  # native order, the same values
    assert out["frozen"].flags.writeable  # a new array the caller owns


def test_numpy_random_state_resumes_the_same_draws(tmp_path):
    """The hand-written loop's RNG bookkeeping: the legacy global state (a tuple holding a uint32 array)
    and a Generator's bit generator state (a dict of 128-bit integers)."""
    np.random.seed(1234)
    np.random.random(17)
    gen = np.random.default_rng(99)
    gen.random(5)
    ck = Checkpointer(tmp_path / "ck")
    try:
        ck.save(3, {"w": torch.ones(2), "np_global": np.random.get_state(), "np_gen": gen.bit_generator.state}) \
            .result(60)
        want_global, want_gen = np.random.random(8), gen.random(8)
        np.random.seed(0)
        got = ck.load()
    finally:
        ck.close()
    np.random.set_state(got["np_global"])
    fresh = np.random.default_rng()
    fresh.bit_generator.state = got["np_gen"]
    assert np.array_equal(np.random.random(8), want_global)
    assert np.array_equal(fresh.random(8), want_gen)


def test_numpy_scalars_come_back_with_their_type(tmp_path):
    """An ``np.int64`` from ``argmax`` or an ``np.float32`` metric used to be refused; ``np.float64``
    (a float subclass) still comes back as a float (§8)."""
    state = {"best_step": np.argmax([0.3, 0.9, 0.1]), "loss": np.float32(0.125), "flag": np.bool_(True),
             "half": np.float16(-2.5), "nan": np.float32("nan"), "u": np.uint64(2**64 - 1),
             "keys": {np.int64(3): "x"}, "f64": np.float64(1.5)}
    pyckpt.save(state, tmp_path / "c")
    out = pyckpt.load(tmp_path / "c")
    for k in ("best_step", "loss", "flag", "half", "u"):
        assert type(out[k]) is type(state[k]) and out[k] == state[k], (k, type(out[k]), out[k])
    assert type(out["nan"]) is np.float32 and np.isnan(out["nan"])
    (key,) = out["keys"]
    assert type(key) is np.int64 and key == 3 and out["keys"][key] == "x"
    assert type(out["f64"]) is float and out["f64"] == 1.5


def test_load_into_a_state_holding_arrays_gives_new_arrays_and_fills_its_tensors(tmp_path):
    """Arrays are values, like ints: ``into=`` (strict) does not ask for a target tensor for them."""
    w = torch.arange(4.0)
    pyckpt.save({"w": w, "hist": np.array([0.5, 0.25])}, tmp_path / "c")
    target = {"w": torch.zeros(4), "hist": np.zeros(2)}
    out = pyckpt.load(tmp_path / "c", into=target)
    assert out["w"] is target["w"] and torch.equal(target["w"], w)
    assert np.array_equal(out["hist"], [0.5, 0.25]) and out["hist"] is not target["hist"]


@pytest.mark.parametrize("value, dtype", [(np.array(["a", "b"]), "<U1"), (np.array([object()]), "object"),
                                          (np.array([1], dtype="datetime64[s]"), "datetime64[s]")])
def test_arrays_without_a_byte_layout_are_refused_by_path_before_anything_is_written(tmp_path, value, dtype):
    with pytest.raises(UnsupportedStateError) as ei:
        pyckpt.save({"meta": {"names": value}}, tmp_path / "c")
    assert ei.value.key == "meta/names" and dtype in str(ei.value), str(ei.value)
    assert not (tmp_path / "c").exists()


def test_an_array_written_after_save_returns_is_saved_as_it_was_at_the_call(tmp_path):
    """Checkpointer.save copies tensors in the background; a write to a tensor before ``captured()`` is
    caught by its version counter (TornSaveError), but a NumPy array has none. So arrays are copied
    at the call: the checkpoint holds the value the state had then."""
    hist = np.zeros(1 << 16)
    ck = Checkpointer(tmp_path / "ck")
    try:
        fut = ck.save(1, {"w": torch.zeros(1 << 20), "hist": hist})
        hist += 1.0  # the loop goes on at once
        fut.result(60)
        got = ck.load()
    finally:
        ck.close()
    assert not got["hist"].any()


def test_one_array_held_twice_loads_as_arrays_sharing_memory(tmp_path):
    """As torch.save keeps one object: ``{"buf": a, "alias": a}`` comes back as two arrays over one
    memory (written once), not as two independent copies."""
    a = np.arange(8, dtype=np.int64)
    pyckpt.save({"buf": a, "alias": a, "other": a.copy()}, tmp_path / "c")
    out = pyckpt.load(tmp_path / "c")
    assert np.shares_memory(out["buf"], out["alias"]) and not np.shares_memory(out["buf"], out["other"])
    out["buf"][0] = 99
    assert out["alias"][0] == 99 and np.array_equal(out["other"], a)
