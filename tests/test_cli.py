"""The `pyckpt` command line, run as a real subprocess."""
import os
import subprocess
import sys

import pytest
import torch

import pyckpt


def cli(*args):
    return subprocess.run([sys.executable, "-m", "pyckpt.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_for_every_verb(capsys):
    r = cli("--help")
    assert r.returncode == 0 and "ls" in r.stdout and "verify" in r.stdout
    from pyckpt.cli import main

    for verb, word in (("ls", "incomplete"), ("verify", "CRC32C")):
        with pytest.raises(SystemExit) as ei:
            main([verb, "--help"])
        assert ei.value.code == 0 and word in capsys.readouterr().out


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


def test_ls_of_a_missing_dir_fails(tmp_path):
    assert cli("ls", str(tmp_path / "nope")).returncode == 2


def test_verify_root_and_dir(ckpt_root):
    ck = pyckpt.Checkpointer(ckpt_root)
    path = ck.save(7, {"t": torch.arange(10)}).result(60)
    for target in (ckpt_root, path):
        r = cli("verify", target)
        assert r.returncode == 0 and "step 7" in r.stdout and path in r.stdout


def test_verify_of_an_empty_root_fails(tmp_path):
    r = cli("verify", str(tmp_path))
    assert r.returncode == 1 and "no complete checkpoint" in r.stderr
