"""pyckpt.save / pyckpt.load round trips: every dtype, views, scalars, empties, into=, zstd."""
import os

import pytest
import torch

import pyckpt
from pyckpt import dtypes
from pyckpt.errors import PyckptError, UnsupportedStateError

ALL_DTYPES = sorted(dtypes.CODE_TO_DTYPE.values(), key=str)


def random_bytes_tensor(dtype, shape, seed):
    """A tensor of ``dtype`` filled with random bytes (NaN payloads, odd bools and all)."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def state_of_all_dtypes():
    return {code: random_bytes_tensor(dt, (3, 5), i) for i, (code, dt) in enumerate(sorted(dtypes.CODE_TO_DTYPE.items()))}


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_every_dtype_roundtrips_bitwise(tmp_path, compress, byte_equal):
    state = state_of_all_dtypes()
    pyckpt.save(state, tmp_path / "c", compress=compress)
    out = pyckpt.load(tmp_path / "c")
    assert set(out) == set(state)
    for k in state:
        assert byte_equal(out[k], state[k]), k
        assert out[k].stride() == state[k].stride()


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_scalars_empties_and_noncontiguous(tmp_path, compress, byte_equal):
    base = torch.randn(6, 8, dtype=torch.float64)
    state = {
        "scalar": torch.tensor(3.5), "iscalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 4), "empty2": torch.empty(3, 0, dtype=torch.bfloat16),
        "t": base.t(), "strided": base[::2, 1::3], "expanded": torch.arange(3.0).expand(4, 3),
    }
    pyckpt.save(state, tmp_path / "c", compress=compress)
    out = pyckpt.load(tmp_path / "c")
    for k, v in state.items():
        assert byte_equal(out[k], v), k
        assert out[k].stride() == v.stride(), k
    assert out["scalar"].dim() == 0


def test_views_sharing_a_storage_are_restored_sharing(tmp_path):
    base = torch.arange(100, dtype=torch.float32)
    state = {"a": base[10:30], "b": base[20:40].view(4, 5), "c": base[::10], "other": torch.ones(3)}
    pyckpt.save(state, tmp_path / "c")
    out = pyckpt.load(tmp_path / "c")
    for k in state:
        assert torch.equal(out[k], state[k])
    sa, sb, sc = (out[k].untyped_storage().data_ptr() for k in "abc")
    assert sa == sb == sc
    assert out["other"].untyped_storage().data_ptr() != sa
    out["a"][10] = -1.0  # element 20 of the base: visible through b as well, like the original
    assert out["b"][0, 0].item() == -1.0
    # only the used extent [0, 91) elements were stored, not a second copy per view
    part = (tmp_path / "c" / "rank-00000" / "data-000.bin").stat().st_size
    assert part < 100 * 4 + 3 * 4 + 4096


def test_into_loads_in_place(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    pyckpt.save({"model": model.state_dict(), "step": 5}, tmp_path / "c")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    dest = model.state_dict()
    ptrs = {k: v.data_ptr() for k, v in dest.items()}
    out = pyckpt.load(tmp_path / "c", into={"model": dest})
    assert out["step"] == 5
    for k, v in out["model"].items():
        assert v is dest[k] and v.data_ptr() == ptrs[k]
        assert torch.equal(v, saved[k])
    assert torch.equal(model[0].weight, saved["0.weight"])


def test_into_noncontiguous_and_shape_mismatch(tmp_path):
    src = torch.arange(12.0).reshape(3, 4)
    pyckpt.save({"x": src, "y": torch.ones(2)}, tmp_path / "c")
    dst = torch.zeros(4, 3).t()  # non-contiguous destination: assembled then copied
    out = pyckpt.load(tmp_path / "c", into={"x": dst}, strict=False)  # "y" has no target: a new tensor
    assert out["x"] is dst and torch.equal(dst, src)
    with pytest.raises(PyckptError, match="shape"):
        pyckpt.load(tmp_path / "c", into={"y": torch.zeros(3)})


def test_optimizer_state_roundtrips(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    pyckpt.save({"optim": sd}, tmp_path / "c")
    out = pyckpt.load(tmp_path / "c")["optim"]
    assert set(out["state"]) == {0, 1}
    assert out["param_groups"] == sd["param_groups"]
    for i in (0, 1):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(out["state"][i][k], sd["state"][i][k])
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt2.load_state_dict(out)  # accepted by torch as is


def test_requires_grad_is_restored(tmp_path):
    pyckpt.save({"p": torch.nn.Parameter(torch.ones(2)), "q": torch.ones(2)}, tmp_path / "c")
    out = pyckpt.load(tmp_path / "c")
    assert out["p"].requires_grad and not out["q"].requires_grad


def test_ten_thousand_small_tensors(tmp_path, byte_equal):
    state = {f"layer{i}": torch.full((4,), float(i)) for i in range(10_000)}
    pyckpt.save(state, tmp_path / "c")
    out = pyckpt.load(tmp_path / "c")
    assert len(out) == 10_000
    assert all(torch.equal(out[k], state[k]) for k in state)
    part = (tmp_path / "c" / "rank-00000.json").read_text()
    assert part.count('"file":') < 5  # a handful of chunks, not 10,000


def test_unsupported_value_writes_nothing(tmp_path):
    with pytest.raises(UnsupportedStateError) as ei:
        pyckpt.save({"optim": {"param_groups": [{"lr": 0.1, "foo": object()}]}, "w": torch.ones(2)}, tmp_path / "c")
    assert ei.value.key == "optim/param_groups/0/foo"
    assert os.listdir(tmp_path) == []


def test_subclasses_of_builtin_types_come_back_as_their_base_type_and_namedtuples_are_refused(tmp_path):
    """docs/FORMAT.md §8: what a dict/list/int/str/float subclass becomes after a round trip."""
    import collections
    import enum

    import numpy as np

    class Level(enum.IntEnum):
        HIGH = 3

    class Name(str, enum.Enum):
        BEE = "bee"

    class Tagged(list):
        pass

    state = {"od": collections.OrderedDict([("z", 1), ("a", torch.ones(2))]),
             "dd": collections.defaultdict(list, {"k": [1]}), "count": collections.Counter("aab"),
             "tagged": Tagged([1, 2]), "level": Level.HIGH, "name": Name.BEE, "f64": np.float64(1.5),
             "enum_key": {Level.HIGH: "x"}}
    pyckpt.save(state, str(tmp_path / "c"))
    got = pyckpt.load(str(tmp_path / "c"))
    assert {k: type(v) for k, v in got.items()} == {
        "od": dict, "dd": dict, "count": collections.Counter, "tagged": list, "level": int, "name": str, "f64": float,
        "enum_key": dict}
    assert list(got["od"]) == ["z", "a"] and torch.equal(got["od"]["a"], torch.ones(2))
    assert got["dd"] == {"k": [1]} and got["count"] == {"a": 2, "b": 1} and got["tagged"] == [1, 2]
    assert got["level"] == 3 and got["name"] == "bee" and got["f64"] == 1.5
    assert list(got["enum_key"]) == [3] and type(next(iter(got["enum_key"]))) is int
    point = collections.namedtuple("Point", "x y")
    with pytest.raises(UnsupportedStateError, match="Point"):
        pyckpt.save({"p": point(1, 2)}, str(tmp_path / "d"))
    assert not (tmp_path / "d").exists()


def test_a_multisteplr_restored_from_a_checkpoint_keeps_its_counter_of_milestones(tmp_path):
    """MultiStepLR keeps its milestones in a Counter, whose elements() its step(epoch) reads: restored as
    a plain dict (as docs/FORMAT.md §8 used to say a Counter comes back) it raised AttributeError there."""
    import collections
    import warnings

    def sched():
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, [2, 4])

    opt, s = sched()
    for _ in range(3):
        opt.step()
        s.step()
    pyckpt.save({"sched": s.state_dict(), "c": collections.Counter({(1, "a"): 2, 3: -1})}, tmp_path / "c")
    out = pyckpt.load(tmp_path / "c")
    assert type(out["c"]) is collections.Counter and out["c"] == collections.Counter({(1, "a"): 2, 3: -1})
    _, s2 = sched()
    s2.load_state_dict(out["sched"])
    assert type(s2.milestones) is collections.Counter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # step(epoch) is deprecated, and still what older scripts call
        s.step(5)
        s2.step(5)
    assert s2.get_last_lr() == s.get_last_lr()


def test_map_location(tmp_path):
    pyckpt.save({"x": torch.ones(2, dtype=torch.float16)}, tmp_path / "c")
    out = pyckpt.load(tmp_path / "c", map_location="cpu")
    assert out["x"].device.type == "cpu"
    out = pyckpt.load(tmp_path / "c", map_location=torch.device("meta"))
    assert out["x"].device.type == "meta" and out["x"].dtype == torch.float16


def test_saved_cuda_tensor_needs_map_location_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    pyckpt.save({"x": torch.ones(2)}, tmp_path / "c")
    part = tmp_path / "c" / "rank-00000.json"
    # Pretend it was saved from a GPU (the manifest checksum must follow the edit).
    text = part.read_text().replace('"device":"cpu"', '"device":"cuda:0"')
    _rewrite_part(tmp_path / "c", text)
    with pytest.raises(PyckptError, match="map_location='cpu'"):
        pyckpt.load(tmp_path / "c")
    assert torch.equal(pyckpt.load(tmp_path / "c", map_location="cpu")["x"], torch.ones(2))


def test_map_location_as_torch_loads_dict_maps_saved_devices(tmp_path):
    """torch.load's dict form ({saved device: device}), which scripts moving from torch.load pass, was
    refused with torch.device()'s list of signatures; a device it does not name keeps its tensors'."""
    pyckpt.save({"x": torch.ones(2), "y": torch.zeros(1)}, tmp_path / "c")
    part = tmp_path / "c" / "rank-00000.json"
    # "x" as if saved from a GPU (the manifest checksum follows the edit), "y" from the CPU.
    text = part.read_text().replace('"device":"cpu"', '"device":"cuda:1"', 1)
    _rewrite_part(tmp_path / "c", text)
    out = pyckpt.load(tmp_path / "c", map_location={"cuda:1": "cpu", "cuda:0": "meta"})
    assert out["x"].device.type == "cpu" and torch.equal(out["x"], torch.ones(2))
    assert out["y"].device.type == "cpu"
    out = pyckpt.load(tmp_path / "c", map_location={"cuda:1": "meta", "cpu": torch.device("meta")})
    assert out["x"].device.type == "meta" and out["y"].device.type == "meta"
    for bad in ({"cuda:1": "nowhere"}, {3: "cpu"}, lambda storage, loc: storage):
        with pytest.raises(PyckptError, match=r"a device .* or a dict \{saved device: device\}") as ei:
            pyckpt.load(tmp_path / "c", map_location=bad)
        assert "received an invalid combination" not in str(ei.value)


def test_a_device_this_torch_cannot_use_is_a_pyckpt_error_naming_the_tensor(tmp_path):
    pyckpt.save({"x": torch.ones(2)}, tmp_path / "c")
    if torch.cuda.is_available():  # a CUDA machine loads it there; the refusal is for CPU-only torch
        assert pyckpt.load(tmp_path / "c", map_location="cuda")["x"].is_cuda
        return
    with pytest.raises(PyckptError, match="cannot place tensor 'x' on cuda"):
        pyckpt.load(tmp_path / "c", map_location="cuda")


def _rewrite_part(ckpt, text):
    import json

    from pyckpt._native import native
    from pyckpt.manifest import seal

    (ckpt / "rank-00000.json").write_text(text)
    m = json.loads((ckpt / "MANIFEST.json").read_text())
    m["parts"][0].update(nbytes=len(text.encode()), crc32c=native().crc32c(text.encode()))
    (ckpt / "MANIFEST.json").write_bytes(seal(m))  # the manifest's own checksum (format 1.1)


def test_save_replaces_an_existing_checkpoint_but_not_other_dirs(tmp_path):
    pyckpt.save({"v": torch.zeros(1)}, tmp_path / "c")
    pyckpt.save({"v": torch.ones(1)}, tmp_path / "c")
    assert torch.equal(pyckpt.load(tmp_path / "c")["v"], torch.ones(1))
    assert sorted(os.listdir(tmp_path)) == ["c"]
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("x")
    with pytest.raises(PyckptError, match="refusing"):
        pyckpt.save({"v": torch.ones(1)}, tmp_path / "user")
    assert (tmp_path / "user" / "notes.txt").exists()


@pytest.fixture(scope="module")
def gib_state():
    """Over 1 GiB of random values, made once for both codecs (making it takes longer than a save)."""
    g = torch.Generator().manual_seed(11)
    state = {"f32": torch.randn(150_000_000, generator=g), "bf16": torch.randn(270_000_000, generator=g).bfloat16()}
    assert sum(t.numel() * t.element_size() for t in state.values()) > 1 << 30
    return state


@pytest.mark.slow
@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_state_over_one_gib(tmp_path, compress, gib_state):
    state = gib_state
    pyckpt.save(state, tmp_path / "c", compress=compress)
    dest = {k: torch.empty_like(v) for k, v in state.items()}
    out = pyckpt.load(tmp_path / "c", into=dest)  # in place: no third copy in memory
    for k in state:
        assert out[k] is dest[k] and torch.equal(out[k], state[k])


def test_leftovers_of_a_killed_save_are_collected(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"c.tmp-{int(dead.stdout)}xdeadbeef"
    (stale / "rank-00000").mkdir(parents=True)
    unrelated = tmp_path / "other.tmp-1x1"
    unrelated.mkdir()
    pyckpt.save({"x": torch.ones(1)}, tmp_path / "c")
    assert sorted(os.listdir(tmp_path)) == ["c", "other.tmp-1x1"]


def test_views_of_different_dtypes_share_one_storage(tmp_path, byte_equal):
    base = torch.randn(16)
    state = {"f": base, "bits": base.view(torch.int16)[4:12], "bytes": base.view(torch.uint8)[1:7]}
    pyckpt.save(state, tmp_path / "c", compress="zstd")
    out = pyckpt.load(tmp_path / "c")
    for k in state:
        assert byte_equal(out[k], state[k]), k
    assert len({out[k].untyped_storage().data_ptr() for k in state}) == 1


def test_tied_weights_load_into_a_model(tmp_path):
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied: the state_dict holds one tensor under two keys
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    saved = emb.weight.detach().clone()
    pyckpt.save({"model": model.state_dict()}, tmp_path / "c")
    with torch.no_grad():
        emb.weight.zero_()
    pyckpt.load(tmp_path / "c", into={"model": model.state_dict()})
    assert torch.equal(emb.weight, saved) and head.weight is emb.weight
    fresh = pyckpt.load(tmp_path / "c")["model"]
    assert fresh["emb.weight"].data_ptr() == fresh["head.weight"].data_ptr()
