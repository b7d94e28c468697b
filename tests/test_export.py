"""pyckpt.export: sidecar checks, optional dependencies, refusing code (library level)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import pyckpt
from pyckpt import export
from pyckpt.errors import CorruptCheckpointError, PyckptError

# Run Python with these packages made unimportable, as on a machine without them.
_BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked for the test: ' + name)
sys.meta_path.insert(0, _Block())
"""


def _run_without(blocked: set[str], code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYCKPT_DISABLE="1")
    return subprocess.run([sys.executable, "-c", _BLOCK.format(blocked=blocked) + code], capture_output=True,
                          text=True, timeout=120, env=env)


def test_package_and_cli_work_without_safetensors_and_tqdm(tmp_path):
    path = pyckpt.save({"w": torch.ones(3)}, str(tmp_path / "c"))
    code = f"""
import pyckpt
from pyckpt.cli import main
assert main(["inspect", {path!r}]) == 0
assert main(["diff", {path!r}, {path!r}, "--progress", "always"]) == 0
rc = main(["export", {path!r}, "--to", "safetensors", {str(tmp_path / 'o.safetensors')!r}])
print("rc", rc)
"""
    r = _run_without({"safetensors", "tqdm"}, code)
    assert r.returncode == 0, r.stderr
    assert "rc 1" in r.stdout
    assert "pip install safetensors" in r.stderr and "pip install tqdm" in r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "o.safetensors")


def _exported(tmp_path) -> tuple[str, dict]:
    pytest.importorskip("safetensors")
    src = pyckpt.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "meta": {"k": (1, 2)}},
                      str(tmp_path / "src"))
    out = str(tmp_path / "m.safetensors")
    done = export.export(src, "safetensors", out)
    assert done.files == [out, out + export.SIDECAR_SUFFIX]
    with open(out + export.SIDECAR_SUFFIX) as f:
        return out, json.load(f)


@pytest.mark.parametrize("tamper, words", [
    (lambda b: b["tensors"][0].update(name="nope"), "names no tensor"),
    (lambda b: b["tensors"][0].update(shape=[3, 2]), "in the sidecar"),
    (lambda b: b["tensors"][0].update(dtype="X99"), "unknown dtype code"),
    (lambda b: b["tree"].update(w={"__pyckpt__": "tensor", "id": 7}), "names tensor 7"),
    (lambda b: b["tree"].update(w={"__pyckpt__": "pickle", "data": "..."}), "unknown tag"),
    (lambda b: b.update(format="other"), "not a version-1 pyckpt sidecar"),
])
def test_a_tampered_sidecar_is_a_typed_error(tmp_path, tamper, words):
    out, body = _exported(tmp_path)
    tamper(body)
    with open(out + export.SIDECAR_SUFFIX, "w") as f:
        json.dump(body, f)
    with pytest.raises(CorruptCheckpointError, match=words):
        export.read_file(out)


def test_import_of_raw_bytes_checks_their_length(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    out = str(tmp_path / "r.safetensors")
    save_file({"x": torch.zeros(5, dtype=torch.uint8)}, out)
    body = {"format": export.SIDECAR_FORMAT, "version": 1, "tree": {"x": {"__pyckpt__": "tensor", "id": 0}},
            "tensors": [{"name": "x", "dtype": "C64", "shape": [2], "raw_bytes": True}]}
    with open(out + export.SIDECAR_SUFFIX, "w") as f:
        json.dump(body, f)
    with pytest.raises(CorruptCheckpointError, match="5 raw bytes, 16 expected"):
        export.read_file(out)


def test_export_rejects_an_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="'torch' or 'safetensors'"):
        export.export(str(tmp_path), "onnx", str(tmp_path / "o"))
    with pytest.raises(PyckptError, match="neither a torch.save file nor a safetensors file"):
        (tmp_path / "f").write_bytes(b"\x00" * 3)
        export.read_file(str(tmp_path / "f"))
