"""Checkpoints written by pyckpt 0.1.0 (format 1.0) must load forever, with these exact values.

The expected values are written out here by hand, independently of the code
that made tests/format/v1/ (see make_golden_v1.py, never to be rerun)."""
import math
import os
import shutil

import torch

import pyckpt
import zygote

V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "v1")


def test_golden_v1_checkpointer_root_loads_exactly(tmp_path):
    root = tmp_path / "v1"
    shutil.copytree(V1, root)  # never let a test modify the golden files
    ck = pyckpt.Checkpointer(root)
    r = ck.restore()
    assert r.step == 7 and r.path.endswith("step-000000007")
    m, meta = r.state["model"], r.state["meta"]
    assert m["w"].dtype == torch.float32 and m["w"].tolist() == [[1.5, -2.0], [0.25, 3.0]]
    assert m["b"].dtype == torch.bfloat16 and m["b"].tolist() == [1.0, -0.5, 2.0]
    assert m["idx"].dtype == torch.int64 and m["idx"].tolist() == [1, -2, 3000000000]
    assert m["mask"].dtype == torch.bool and m["mask"].tolist() == [True, False, True]
    assert m["bytes"].dtype == torch.uint8 and m["bytes"].tolist() == [0, 255, 7]
    assert m["scalar"].dtype == torch.float64 and m["scalar"].shape == () and m["scalar"].item() == 2.5
    assert m["even"].dtype == torch.float16 and m["even"].tolist() == [0.0, 2.0, 4.0, 6.0]
    assert m["odd"].tolist() == [1.0, 3.0, 5.0, 7.0] and m["odd"].stride() == (2,)
    assert m["even"].untyped_storage().data_ptr() == m["odd"].untyped_storage().data_ptr()
    assert m["z"].dtype == torch.complex64 and m["z"].tolist() == [1 + 2j]
    assert meta["step"] == 7 and meta["lr"] == 0.001 and meta["name"] == "golden"
    assert meta["betas"] == (0.9, 0.999) and isinstance(meta["betas"], tuple)
    assert meta["ids"] == {0: "a", 1: "b"}
    assert meta["inf"] == math.inf
    assert meta["dtype"] is torch.float16
    assert meta["size"] == torch.Size([2, 3]) and isinstance(meta["size"], torch.Size)
    assert meta["blob"] == b"\x00\x01" and meta["none"] is None and meta["flags"] == [True, False]
    assert r.rank_state["epoch"] == 3 and r.rank_state["rng"].tolist() == [9, 8, 7]


def test_golden_v1_zstd_checkpoint_loads_exactly():
    out = pyckpt.load(os.path.join(V1, "zstd-example"))
    assert out["zeros"].dtype == torch.float32 and out["zeros"].shape == (4096,)
    assert not out["zeros"].any()
    assert out["ramp"].dtype == torch.int16 and out["ramp"].tolist() == list(range(512))


def test_golden_v1_verifies_with_the_cli():
    for path in (V1, os.path.join(V1, "zstd-example")):
        r = zygote.shared().run_module("pyckpt.cli", ["verify", path])  # a real process, torch imported
        assert r.returncode == 0, r.stderr
