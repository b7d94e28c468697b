"""`pyckpt ls` and `pyckpt gc` on a root where retention retired a checkpoint whose data newer
checkpoints still reference (incremental chunks, docs/FORMAT.md §14): such a directory has no
MANIFEST.json, like an interrupted save, but deleting it breaks the checkpoints that reference it."""
from __future__ import annotations

import json
import os
import shutil

import torch

import pyckpt
from pyckpt import layout

DEAD_PID = 2 ** 22 + 12345  # above the kernel's pid limit: never a running process


def _retired_root(root: str, keep: int = 2, steps: int = 4) -> dict:
    """Incremental saves of steps 1..``steps`` of a frozen base and a changing adapter: the base is
    written by step 1 only. With the defaults retention retires step 1 (no manifest) and keeps its
    data for steps 3 and 4; step 2's own data is referenced by nobody and goes. Returns the last state."""
    base = torch.randn(600_000, generator=torch.Generator().manual_seed(0))
    adapter = torch.zeros(5000)
    with pyckpt.Checkpointer(root, keep=keep) as ck:
        for step in range(1, steps + 1):
            adapter.add_(1.0)
            ck.save(step, {"base": base, "adapter": adapter}).result(60)
    return {"base": base.clone(), "adapter": adapter.clone()}


def _rows(stdout: str) -> dict[str, list[str]]:
    """``pyckpt ls`` text rows by directory name: STEP, DATE, TIME, SIZE (number, unit), STATUS, NAME."""
    out = {}
    for ln in stdout.splitlines()[1:]:
        f = ln.split()
        if len(f) >= 7 and f[0].isdigit():
            out[f[6]] = f
    return out


def test_ls_labels_a_retired_but_referenced_checkpoint_and_names_its_referrers(cli, ckpt_root):
    _retired_root(ckpt_root)
    retired = layout.step_dir_name(1)
    # The set-up is what the test is about: step 1 lost its manifest but its data stayed.
    assert os.path.isdir(os.path.join(ckpt_root, retired))
    assert not os.path.exists(os.path.join(ckpt_root, retired, layout.MANIFEST))
    referrers = [e.name for e in layout.committed(ckpt_root)]
    assert sorted(referrers) == [layout.step_dir_name(3), layout.step_dir_name(4)]
    interrupted = f"{layout.step_dir_name(9)}.tmp-{DEAD_PID}x0123456789"
    os.makedirs(os.path.join(ckpt_root, interrupted))

    r = cli("ls", ckpt_root)
    assert r.returncode == 0, r.stderr
    rows = _rows(r.stdout)
    assert set(rows) == {retired, *referrers, interrupted}, r.stdout
    status = {name: f[5] for name, f in rows.items()}
    assert status[interrupted] == "incomplete"  # a real interrupted save keeps its label
    assert status[retired] not in ("incomplete", "complete"), r.stdout
    assert status[retired] == "referenced"
    assert all(n in " ".join(rows[retired][7:]) for n in referrers), rows[retired]  # names what needs the data
    assert "referenced" in r.stderr  # the legend says what the label means

    doc = json.loads(cli("ls", ckpt_root, "--json").stdout)
    by_name = {c["name"]: c for c in doc["checkpoints"]}
    assert by_name[retired]["complete"] is False
    assert sorted(by_name[retired]["referenced_by"]) == sorted(referrers)
    assert by_name[interrupted]["referenced_by"] == []

    # --verify checks the referrers (which read step 1's data) and flags nothing.
    r = cli("ls", "--verify", ckpt_root)
    assert r.returncode == 0, r.stderr
    assert _rows(r.stdout)[retired][5] == "referenced"
    assert {_rows(r.stdout)[n][5] for n in referrers} == {"sound"}


def test_ls_of_the_retired_directory_itself_says_it_is_referenced(cli, ckpt_root):
    _retired_root(ckpt_root)
    retired = os.path.join(ckpt_root, layout.step_dir_name(1))
    r = cli("ls", retired, "--json")
    assert r.returncode == 0, r.stderr
    [c] = json.loads(r.stdout)["checkpoints"]
    assert c["name"] == layout.step_dir_name(1) and c["complete"] is False
    assert sorted(c["referenced_by"]) == [layout.step_dir_name(3), layout.step_dir_name(4)]
    # verify / inspect cannot read it (no manifest) and say why instead of a bare "not found".
    for verb in ("verify", "inspect"):
        r = cli(verb, retired)
        assert r.returncode == 2
        assert "retired" in r.stderr and layout.step_dir_name(4) in r.stderr, (verb, r.stderr)


def test_gc_keeps_referenced_data_and_removes_it_once_unreferenced(cli, ckpt_root, byte_equal):
    last = _retired_root(ckpt_root)
    retired = layout.step_dir_name(1)
    orphan = os.path.join(ckpt_root, layout.step_dir_name(7))  # half deleted, referenced by nothing
    os.makedirs(os.path.join(orphan, "rank-00000"))
    r = cli("ls", ckpt_root)
    assert _rows(r.stdout)[layout.step_dir_name(7)][5] == "incomplete", r.stdout  # nothing needs it

    r = cli("gc", ckpt_root, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [os.path.basename(p) for p in doc["removed"]] == [layout.step_dir_name(7)]
    assert sorted(doc["kept_referenced"][retired]) == [layout.step_dir_name(3), layout.step_dir_name(4)]
    assert os.path.isdir(os.path.join(ckpt_root, retired))
    restored = pyckpt.load(ckpt_root)
    assert byte_equal(restored["base"], last["base"]) and byte_equal(restored["adapter"], last["adapter"])

    # Once the referrers are gone the directory is garbage: listed as such, and gc removes it.
    for e in layout.committed(ckpt_root):
        shutil.rmtree(e.path)
    r = cli("ls", ckpt_root, "--json")
    [c] = json.loads(r.stdout)["checkpoints"]
    assert c["name"] == retired and c["referenced_by"] == []
    assert _rows(cli("ls", ckpt_root).stdout)[retired][5] == "incomplete"
    r = cli("gc", ckpt_root)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(os.path.join(ckpt_root, retired))


def test_ls_names_the_checkpoints_that_read_a_committed_checkpoints_data(cli, ckpt_root):
    # Deleting an old committed checkpoint by hand to free space breaks the newer ones that read its
    # chunks (here the frozen base, written by step 1 only): ls has to say so on its row.
    _retired_root(ckpt_root, keep=3, steps=3)  # nothing retired: step 1 is committed and read by 2 and 3
    first, readers = layout.step_dir_name(1), [layout.step_dir_name(2), layout.step_dir_name(3)]

    r = cli("ls", ckpt_root, "--json")
    assert r.returncode == 0, r.stderr
    by_name = {c["name"]: c for c in json.loads(r.stdout)["checkpoints"]}
    assert all(c["complete"] for c in by_name.values())
    assert by_name[first]["referenced_by"] == readers
    assert by_name[readers[0]]["referenced_by"] == [] and by_name[readers[1]]["referenced_by"] == []

    rows = _rows(cli("ls", ckpt_root).stdout)
    assert rows[first][5] == "complete"  # still a checkpoint of its own, not "referenced"
    assert all(n in " ".join(rows[first][7:]) for n in readers), rows[first]
    assert rows[readers[1]][7:] == [], rows[readers[1]]
