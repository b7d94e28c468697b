"""Arguments a verb cannot act on are refused as usage errors (exit 2, no traceback) before anything
is read or written; the counts that are taken mean what their help says."""
from __future__ import annotations

import json
import os

import pytest
import torch

import pyckpt
from pyckpt import Checkpointer


@pytest.fixture
def root(tmp_path):
    """A Checkpointer root with three committed saves (steps 1, 2, 3) and their metrics lines."""
    ck = Checkpointer(str(tmp_path / "root"))
    for step in (1, 2, 3):
        ck.save(step, {"w": torch.full((4,), float(step)), "b": torch.zeros(2)}).result()
    ck.close()
    return str(tmp_path / "root")


def _usage_error(r, option: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert option in r.stderr, r.stderr


@pytest.mark.parametrize("args, option", [
    (["inspect", "{root}", "--max-leaves", "-5"], "--max-leaves"),
    (["stats", "{root}", "--rows", "0"], "--rows"),
    (["stats", "{root}", "--rows", "-3"], "--rows"),
    (["export", "{root}", "--to", "torch", "{tmp}/out.pt", "--rank", "-1"], "--rank"),
    (["diff", "{root}", "{root}", "--rank", "-1"], "--rank"),
    (["import", "{tmp}/f.pt", "{tmp}/new", "--step", "-3"], "--step"),
    (["import", "{tmp}/f.pt", "{tmp}/new", "--step", str(1 << 63)], "--step"),
], ids=["max-leaves<0", "rows=0", "rows<0", "export-rank<0", "diff-rank<0", "import-step<0", "import-step>int64"])
def test_a_count_out_of_its_range_is_a_usage_error_that_writes_nothing(cli, root, tmp_path, args, option):
    torch.save({"x": torch.ones(2)}, str(tmp_path / "f.pt"))
    before = sorted(os.listdir(tmp_path))
    r = cli(*[a.format(root=root, tmp=tmp_path) for a in args])
    _usage_error(r, option)
    assert sorted(os.listdir(tmp_path)) == before  # the import made no root (it used to leave one with a lock)


def _plotted(stdout: str) -> list[str]:
    """The steps of the plot's rows: the lines after its header ("step  stall s ... durable s")."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:3] == ["step", "stall", "s"])
    return [line.split()[0] for line in lines[head + 1:]]


def test_stats_rows_plots_exactly_the_last_n_saves(cli, root):
    for rows, steps in (("1", ["3"]), ("2", ["2", "3"]), ("30", ["1", "2", "3"])):
        r = cli("stats", root, "--rows", rows)
        assert r.returncode == 0, r.stderr
        assert _plotted(r.stdout) == steps, r.stdout


def test_inspect_max_leaves_zero_lists_no_leaf_and_says_how_many(cli, root):
    r = cli("inspect", root, "--max-leaves", "0")
    assert r.returncode == 0, r.stderr
    assert "... (2 more leaves; use --json)" in r.stdout
    assert "w  " not in r.stdout and "b  " not in r.stdout


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_export_to_a_directory_or_no_name_is_refused_before_loading(cli, root, tmp_path, fmt):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    target = tmp_path / "exports"
    target.mkdir()
    r = cli("export", root, "--to", fmt, str(target))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"{target} is a directory" in r.stderr and "name the file" in r.stderr
    assert os.listdir(target) == [] and not any(n.startswith("exports.tmp") for n in os.listdir(tmp_path))
    r = cli("export", root, "--to", fmt, "")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "OUT is an empty string" in r.stderr
    # a file name inside that directory is what it asks for, and works
    r = cli("export", root, "--to", fmt, str(target / "model.bin"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["step"] == 3
    assert os.path.isfile(target / "model.bin")


def test_an_import_step_in_range_is_taken(cli, tmp_path):
    torch.save({"x": torch.arange(3.0)}, str(tmp_path / "f.pt"))
    r = cli("import", str(tmp_path / "f.pt"), str(tmp_path / "new"), "--step", str((1 << 63) - 1))
    assert r.returncode == 0, r.stderr
    assert torch.equal(pyckpt.load(str(tmp_path / "new"))["x"], torch.arange(3.0))
    assert os.path.isdir(tmp_path / "new" / f"step-{(1 << 63) - 1:09d}")
