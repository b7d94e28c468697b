"""`pyckpt export` / `pyckpt import` round trips through real files and real subprocesses."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import pyckpt

safetensors_torch = pytest.importorskip("safetensors.torch")


def _complex32(n: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")
        return torch.zeros(n, dtype=torch.complex32)


def rich_state() -> dict:
    """Every kind of leaf the format holds, and tensors safetensors cannot hold natively."""
    g = torch.Generator().manual_seed(0)
    nan_payloads = torch.tensor([0x7FC00001, 0x7F800001, -0x3FFEDD], dtype=torch.int32).view(torch.float32)
    base = torch.randn(6, 4, generator=g)
    return {
        "model": {"fc.weight": torch.randn(8, 5, generator=g), "fc.bias": torch.randn(8, generator=g).bfloat16(),
                  "emb": torch.randn(3, 2, generator=g).half()},
        "optim": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(8, 5, generator=g)}},
                  "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "eps": float("inf")}]},
        "nan": nan_payloads, "neg_zero": torch.tensor([-0.0, 0.0]),
        "ids": torch.arange(10, dtype=torch.int64), "mask": torch.tensor([True, False, True]),
        "u16": torch.arange(5, dtype=torch.int16).view(torch.uint16), "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "c32": _complex32(3), "scalar": torch.tensor(3, dtype=torch.int8), "empty": torch.empty(0, 3),
        "view": base[:, 1], "same_storage": base,  # a non-contiguous view sharing the storage of another leaf
        "epoch": 3, "name": "run-1", "raw": b"\x00\x01", "dtype": torch.float16, "size": torch.Size([2, 3]),
        "none": None,
    }


def assert_same(a, b, byte_equal, path=""):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert byte_equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], byte_equal, f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, byte_equal, f"{path}/{i}")
    else:
        assert a == b or (a != a and b != b), path


def test_safetensors_round_trip_is_bitwise(cli, tmp_path, byte_equal):
    state = rich_state()
    src = pyckpt.save(state, str(tmp_path / "src"), compress="zstd")
    out = str(tmp_path / "model.safetensors")
    r = cli("export", src, "--to", "safetensors", out, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["files"] == [out, out + ".pyckpt.json"] and doc["tensors"] == 16
    # The file is a real safetensors file other tools read: names are key paths.
    flat = safetensors_torch.load_file(out)
    assert byte_equal(flat["model/fc.weight"], state["model"]["fc.weight"])
    assert flat["c32"].dtype == torch.uint8  # no complex32 in safetensors: raw bytes + sidecar
    r = cli("import", out, str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    assert_same(pyckpt.load(str(tmp_path / "back")), pyckpt.load(src), byte_equal)
    r = cli("diff", src, str(tmp_path / "back"))
    assert r.returncode == 0 and "identical" in r.stdout, r.stdout + r.stderr


def test_flat_state_dict_exports_without_sidecar(cli, tmp_path, byte_equal):
    sd = {"a.weight": torch.randn(3, 3), "a.bias": torch.zeros(3, dtype=torch.bfloat16)}
    src = pyckpt.save(sd, str(tmp_path / "src"))
    out = str(tmp_path / "m.safetensors")
    stale = out + ".pyckpt.json"
    with open(stale, "w") as f:
        f.write("{}")  # a sidecar of an earlier export must not be applied to this one
    r = cli("export", src, "--to", "safetensors", out)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(stale)
    flat = safetensors_torch.load_file(out)
    assert sorted(flat) == sorted(sd) and all(byte_equal(flat[k], sd[k]) for k in sd)
    back = str(tmp_path / "back")
    assert cli("import", out, back).returncode == 0
    got = pyckpt.load(back)
    assert sorted(got) == sorted(sd) and all(byte_equal(got[k], sd[k]) for k in sd)


def test_torch_export_loads_with_weights_only(cli, tmp_path, byte_equal):
    state = rich_state()
    root = str(tmp_path / "root")
    ck = pyckpt.Checkpointer(root)
    ck.save(40, state).result(60)
    ck.close()
    out = str(tmp_path / "state.pt")
    r = cli("export", root, "--to", "torch", out)  # a root exports its newest checkpoint
    assert r.returncode == 0 and "step 40" in r.stdout, r.stderr
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")
        loaded = torch.load(out, weights_only=True)
    assert_same(loaded, pyckpt.load(root), byte_equal)
    r = cli("import", out, root, "--step", "41")  # into the root as a new step; old one kept
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(root)).count("step-000000040") == 1
    with pyckpt.Checkpointer(root) as ck:
        assert ck.latest().step == 41
    assert_same(pyckpt.load(root), pyckpt.load(os.path.join(root, "step-000000040")), byte_equal)


def test_numpy_values_export_to_both_formats_and_a_torch_file_says_how_to_load_it(cli, tmp_path):
    """NumPy arrays and scalars (docs/FORMAT.md §8): safetensors plus its sidecar bring them back as NumPy;
    the torch file holds them as saved, which torch.load's weights_only=True refuses, and one line says so."""
    import numpy as np

    state = {"w": torch.ones(2), "np_rng": np.random.RandomState(5).get_state(), "best": np.int64(3)}
    src = pyckpt.save(state, str(tmp_path / "src"))
    st = str(tmp_path / "m.safetensors")
    r = cli("export", src, "--to", "safetensors", st)
    assert r.returncode == 0 and "NumPy" not in r.stderr, r.stderr
    assert cli("import", st, str(tmp_path / "back")).returncode == 0
    back = pyckpt.load(str(tmp_path / "back"))
    assert type(back["best"]) is np.int64 and back["best"] == 3
    assert back["np_rng"][0] == "MT19937" and np.array_equal(back["np_rng"][1], state["np_rng"][1])
    pt = str(tmp_path / "m.pt")
    r = cli("export", src, "--to", "torch", pt)
    assert r.returncode == 0, r.stderr
    assert f"pyckpt: {pt} holds 2 NumPy value(s) ('best', ...)" in r.stderr and "weights_only=False" in r.stderr
    with pytest.raises(Exception, match="weights_only"):
        torch.load(pt, weights_only=True)
    loaded = torch.load(pt, weights_only=False)
    assert type(loaded["best"]) is np.int64 and np.array_equal(loaded["np_rng"][1], state["np_rng"][1])
    r = cli("export", src, "--to", "torch", pt, "--json")
    assert json.loads(r.stdout)["numpy_keys"] == ["best", "np_rng/1"]


def test_torch_export_of_a_dtype_torch_save_cannot_store_is_one_line_naming_it(cli, tmp_path, byte_equal):
    """torch.save has no storage type for the sub-byte integer dtypes (torch.uint1..7, int1..7), which
    pyckpt stores: the export died with torch's KeyError traceback. Now one line names the key and
    the dtype and points at safetensors, which carries them (as raw bytes and the sidecar)."""
    low = torch.tensor([1, 0, 3], dtype=torch.uint8).view(torch.uint4)
    ckpt = str(tmp_path / "c")
    pyckpt.save({"model": {"q.weight": low, "fc.weight": torch.ones(2)}}, ckpt)
    out = str(tmp_path / "state.pt")
    r = cli("export", ckpt, "--to", "torch", out)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pyckpt export:"), r.stderr
    assert "'model/q.weight'" in lines[0] and "torch.uint4" in lines[0] and "--to safetensors" in lines[0]
    assert os.listdir(tmp_path) == ["c"]  # no OUT, no temporary file
    r = cli("export", ckpt, "--to", "safetensors", str(tmp_path / "s.safetensors"))
    assert r.returncode == 0, r.stderr
    r = cli("import", str(tmp_path / "s.safetensors"), str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    assert_same(pyckpt.load(str(tmp_path / "back")), pyckpt.load(ckpt), byte_equal)


def test_export_of_rank_state(cli, tmp_path, byte_equal):
    root = str(tmp_path / "root")
    with pyckpt.Checkpointer(root) as ck:
        ck.save(3, {"w": torch.ones(2)}, rank_state={"rng": torch.arange(4)}).result(60)
    out = str(tmp_path / "rank0.pt")
    assert cli("export", root, "--to", "torch", out, "--rank", "0").returncode == 0
    assert byte_equal(torch.load(out, weights_only=True)["rng"], torch.arange(4))
    r = cli("export", root, "--to", "torch", out, "--rank", "1")
    assert r.returncode == 1 and "no rank_state for rank 1" in r.stderr


def test_import_refuses_pickled_code(cli, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    bad = str(tmp_path / "evil.pt")
    torch.save({"w": torch.ones(2), "x": Evil()}, bad)
    r = cli("import", bad, str(tmp_path / "out"))
    assert r.returncode == 1 and "weights_only" in r.stderr
    assert not os.path.exists(tmp_path / "pwned") and not os.path.exists(tmp_path / "out")


def test_import_and_export_of_missing_paths_exit_2(cli, tmp_path):
    assert cli("import", str(tmp_path / "nope.pt"), str(tmp_path / "o")).returncode == 2
    assert cli("export", str(tmp_path / "nope"), "--to", "torch", str(tmp_path / "o.pt")).returncode == 2
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world, not a model")
    r = cli("import", str(junk), str(tmp_path / "o"))
    assert r.returncode == 1 and "neither a torch.save file nor a safetensors file" in r.stderr


def test_import_over_a_checkpoint_newer_ones_reference_is_refused(cli, tmp_path, knob_env):
    """`pyckpt import FILE ROOT/step-N` must neither write into a root a job holds nor replace a
    checkpoint whose data files the newer ones reference (docs/FORMAT.md §7 step 6)."""
    knob_env(PYCKPT_CHUNK_MB=1)
    n = 1 << 18  # 1 MiB of float32: one chunk each
    root, src = str(tmp_path / "root"), str(tmp_path / "other.pt")
    frozen = torch.randn(n, generator=torch.Generator().manual_seed(0))
    torch.save({"frozen": torch.zeros(n), "t": torch.zeros(n)}, src)
    first = os.path.join(root, "step-000000001")
    with pyckpt.Checkpointer(root, keep=3) as ck:  # the job
        for s in (1, 2, 3):
            ck.save(s, {"frozen": frozen, "t": torch.full((n,), float(s))}).result(60)
        r = cli("import", src, first)
        assert r.returncode == 1 and f"is in use by pid {os.getpid()} " in r.stderr, r.stderr
    r = cli("import", src, first)  # the job has ended; its checkpoints still read step 1's data
    assert r.returncode == 1 and "step-000000003, step-000000002" in r.stderr, r.stderr
    assert sorted(i.name for i in pyckpt.list(root, verify=True) if i.sound) == [
        "step-000000001", "step-000000002", "step-000000003"]
    assert torch.equal(pyckpt.load(first)["frozen"], frozen)
