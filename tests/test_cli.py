"""The `pyckpt` command line, run as a real subprocess (forked by the session's zygote; the entry
points themselves from a fresh interpreter in test_version_and_python_dash_m)."""
import os
import subprocess
import sys

import pytest
import torch

import pyckpt
import zygote


def cli(*args):
    """``python -m pyckpt.cli ARGS``, finished: ``returncode``, ``stdout``, ``stderr``."""
    return zygote.shared().run_module("pyckpt.cli", list(args), env=dict(os.environ), timeout=120)


def test_help_for_every_verb(capsys):
    r = cli("--help")
    verbs = ("ls", "verify", "inspect", "export", "import", "diff", "gc", "stats")
    assert r.returncode == 0 and all(v in r.stdout for v in verbs)
    from pyckpt.cli import main

    words = {"ls": "incomplete", "verify": "CRC32C", "inspect": "dtype", "export": "sidecar",
             "import": "weights_only", "diff": "max |a-b|", "gc": "tmp-", "stats": "metrics.jsonl"}
    for verb in verbs:
        with pytest.raises(SystemExit) as ei:
            main([verb, "--help"])
        out = capsys.readouterr().out
        assert ei.value.code == 0 and words[verb] in out, (verb, out)
        if verb not in ("ls", "verify"):
            assert "--json" in out


def test_version_and_python_dash_m():
    for cmd in ([sys.executable, "-m", "pyckpt", "--version"], [sys.executable, "-m", "pyckpt.cli", "--version"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == f"pyckpt {pyckpt.__version__}", r
    r = subprocess.run([sys.executable, "-m", "pyckpt"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "VERB" in r.stderr  # no verb: usage error, not a traceback


def test_ls_of_one_checkpoint_dir_lists_it(tmp_path):
    path = pyckpt.save({"t": torch.zeros(4)}, str(tmp_path / "single"))
    r = cli("ls", path)
    assert r.returncode == 0, r.stderr
    assert "no checkpoints" not in r.stdout
    rows = [ln.split() for ln in r.stdout.splitlines()[1:]]
    assert len(rows) == 1 and rows[0][-2:] == ["complete", "single"]


def test_ls_verify_flags_a_damaged_checkpoint(ckpt_root):
    ck = pyckpt.Checkpointer(ckpt_root, keep=5, incremental=False)  # step 2 holds its own data
    ck.save(1, {"t": torch.arange(1000)}).result(60)
    bad = ck.save(2, {"t": torch.arange(1000)}).result(60)
    data = os.path.join(bad, "rank-00000", "data-000.bin")
    with open(data, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    r = cli("ls", "--verify", ckpt_root)
    assert r.returncode == 1
    status = {ln.split()[-1]: ln.split()[-2] for ln in r.stdout.splitlines()[1:]}
    assert status == {"step-000000001": "sound", "step-000000002": "DAMAGED"}
    assert "step-000000002 is damaged" in r.stderr


def test_ls_lists_complete_and_incomplete(ckpt_root):
    ck = pyckpt.Checkpointer(ckpt_root, keep=5)
    ck.save(100, {"t": torch.zeros(300_000)}).result(60)
    ck.save(2000, {"t": torch.zeros(10)}).result(60)
    os.makedirs(os.path.join(ckpt_root, "step-000003000.tmp-1x1"))
    r = cli("ls", ckpt_root)
    assert r.returncode == 0, r.stderr
    lines = [ln.split() for ln in r.stdout.splitlines()[1:]]
    assert [(ln[0], ln[-2], ln[-1]) for ln in lines] == [
        ("100", "complete", "step-000000100"), ("2000", "complete", "step-000002000"),
        ("3000", "incomplete", "step-000003000.tmp-1x1")]
    assert lines[0][3:5] == ["1.1", "MiB"]  # 1.2 MB of zeros (+ JSON) on disk
    assert "data not read" in r.stderr and "--verify" in r.stderr  # "complete" is not mistaken for "sound"


def test_ls_of_a_missing_dir_fails(tmp_path):
    assert cli("ls", str(tmp_path / "nope")).returncode == 2


def test_verify_root_and_dir(ckpt_root):
    ck = pyckpt.Checkpointer(ckpt_root)
    path = ck.save(7, {"t": torch.arange(10)}).result(60)
    for target in (ckpt_root, path):
        r = cli("verify", target)
        assert r.returncode == 0 and "step 7" in r.stdout and path in r.stdout


def test_verify_of_an_empty_root_fails(tmp_path):
    # Nothing to verify is "not found" (2), kept apart from "damaged" (1).
    r = cli("verify", str(tmp_path))
    assert r.returncode == 2 and "no complete checkpoint" in r.stderr


def test_verify_of_a_missing_path_exits_2_and_damage_exits_1(ckpt_root, tmp_path):
    r = cli("verify", str(tmp_path / "missing"))
    assert r.returncode == 2 and "missing" in r.stderr and "FAILED" not in r.stderr
    path = pyckpt.save({"t": torch.arange(100)}, str(tmp_path / "c"))
    os.truncate(os.path.join(path, "rank-00000", "data-000.bin"), 10)
    r = cli("verify", path)
    assert r.returncode == 1 and "FAILED" in r.stderr
