"""The script's ``torch.save`` calls before a relaunch's restore point (pyckpt/held_writes.py). Its per-epoch code runs
again there from the state before the restore: a "save the best model" step (``best_acc`` starts at 0) and a file per
epoch wrote the freshly built model over the files the run wrote, and a script that loads its best model and its
per-epoch files at the end finished with those, silently. Such writes to existing files are now left undone."""
from __future__ import annotations

import io
import os
import re
import shutil
import signal

import torch

from pyckpt import held_writes
from pyckpt.hooks import HookSet

from transparent_helpers import load, run_script, tree_equal

SCRIPT = r'''
import os, shutil, signal, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
x = torch.randn(64, 6)
loader = DataLoader(TensorDataset(x, (x.sum(1) > 0).long()), batch_size=8, shuffle=True)
val = DataLoader(TensorDataset(x[:16] + 0.5, (x[:16].sum(1) > 0).long()), batch_size=16)
model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
best_acc, step = 0.0, 0
for epoch in range(4):
    for g in opt.param_groups:  # trained in epochs 0-1 only: no later epoch is the best
        g["lr"] = 0.05 if epoch < 2 else 0.0
    for xb, yb in loader:
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(); loss.backward(); opt.step()
        step += 1
        if str(step) == os.environ.get("KILL_AT") and not os.path.exists(os.environ["KILL_MARK"]):
            open(os.environ["KILL_MARK"], "w").close(); os.kill(os.getpid(), signal.SIGKILL)
    with torch.no_grad():
        acc = sum((model(xb).argmax(1) == yb).float().mean().item() for xb, yb in val)
    torch.save(model.state_dict(), f"epoch{epoch}.pt")
    if acc > best_acc:
        torch.save(model.state_dict(), "best.pt")
    # PyTorch's ImageNet example: the latest state, copied to the best model's file when it is the best so far
    torch.save({"epoch": epoch, "model": model.state_dict()}, "checkpoint.pth.tar")
    if acc > best_acc:
        best_acc = acc
        shutil.copyfile("checkpoint.pth.tar", "model_best.pth.tar")
    # an atomic save: a temporary name, then a rename over the file
    torch.save({"epoch": epoch, "model": model.state_dict()}, "last.pt.tmp")
    os.replace("last.pt.tmp", "last.pt")
torch.save({"best": torch.load("best.pt"), "epochs": [torch.load(f"epoch{e}.pt") for e in range(4)],
            "model_best": torch.load("model_best.pth.tar"), "last": torch.load("last.pt"),
            "model": model.state_dict()}, sys.argv[1])
'''


def _runs(tmp_path, remove_before_relaunch: bool):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    (tmp_path / "plain").mkdir()
    plain = run_script([script, tmp_path / "plain.pt"], tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    work = tmp_path / "run"
    work.mkdir()
    env = dict(PYCKPT_DIR=work / "ckpt", PYCKPT_EVERY_STEPS="4", KILL_AT="28", KILL_MARK=work / "mark")
    first = run_script([script, tmp_path / "out.pt"], work, **env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert (work / "epoch1.pt").exists()  # written by the run before it was killed in epoch 3
    if remove_before_relaunch:  # the relaunch on another node: the run's files are not there
        for f in [*work.glob("*.pt"), *work.glob("*.pth.tar")]:
            f.unlink()
    second = run_script([script, tmp_path / "out.pt"], work, **env)
    assert second.returncode == 0, second.stderr
    assert re.search(r"resumed from step (20|24) \(epoch 2, ", second.stderr), second.stderr
    return second, load(tmp_path / "plain.pt"), load(tmp_path / "out.pt")


def test_the_files_the_run_wrote_are_not_overwritten_with_the_state_before_the_restore(tmp_path):
    second, plain, out = _runs(tmp_path, remove_before_relaunch=False)
    # The best model, every per-epoch file, the copied best and the atomically saved file: the uninterrupted run's.
    assert tree_equal(out, plain)
    lines = [ln for ln in second.stderr.splitlines() if "left as the run wrote it" in ln]
    assert len(lines) == 1 and lines[0].startswith("pyckpt: epoch0.pt: "), second.stderr
    assert not (tmp_path / "run" / "last.pt.tmp").exists()  # the held rename's temporary file: removed
    assert "written before the restore point" not in second.stderr, second.stderr


def test_a_file_the_run_wrote_elsewhere_is_written_with_a_warning(tmp_path):
    second, plain, out = _runs(tmp_path, remove_before_relaunch=True)
    lines = [ln for ln in second.stderr.splitlines() if "written before the restore point from the state" in ln]
    assert len(lines) == 1 and lines[0].startswith("pyckpt: warning: "), second.stderr
    # Said at the restore point: best.pt, checkpoint.pth.tar, epoch0.pt, epoch1.pt, last.pt (renamed from the
    # temporary file), model_best.pth.tar (copied).
    assert f"{tmp_path / 'run' / 'best.pt'} and 5 other file(s);" in lines[0], lines
    # Written as asked (the script reads it back at its end), from the state before the restore: not the run's.
    assert tree_equal(out["model"], plain["model"]) and tree_equal(out["epochs"][2:], plain["epochs"][2:])
    assert not tree_equal(out["epochs"][0], plain["epochs"][0])


def test_only_the_runs_files_are_held_and_only_while_the_restore_is_pending(tmp_path):
    runs, new, other = tmp_path / "run.pt", tmp_path / "new.pt", tmp_path / "other"
    torch.save(torch.ones(2), runs)  # as the run wrote it
    other.write_text("other")
    pending, said, hooks = [True], [], HookSet()
    held = held_writes.HeldWrites(lambda: pending[0], lambda msg, level: said.append((level, msg)))
    held.install(hooks)
    try:
        torch.save(torch.zeros(2), runs)  # the run's: left
        torch.save(torch.zeros(2), str(runs))
        shutil.copyfile(other, runs)  # a copy onto it: left
        torch.save(torch.zeros(2), new)  # not there: written
        torch.save(torch.full((2,), 2.0), new)  # written here before: written again
        buf = io.BytesIO()
        torch.save(torch.zeros(2), buf)  # a buffer: written
        shutil.copy(other, tmp_path / "c")  # a new file: copied
        os.replace(tmp_path / "c", tmp_path / "d")  # (a copy's): renamed
        torch.save(torch.zeros(2), tmp_path / "tmp")
        os.replace(tmp_path / "tmp", runs)  # an atomic save over the run's file: the temporary file removed
        assert torch.equal(torch.load(runs), torch.ones(2)) and torch.equal(torch.load(new), torch.full((2,), 2.0))
        assert buf.getbuffer().nbytes > 0 and (tmp_path / "d").read_text() == "other"
        assert not (tmp_path / "tmp").exists() and not (tmp_path / "c").exists()
        assert [level for level, _ in said] == ["info"] and str(runs) in said[0][1], said
        pending[0] = False
        torch.save(torch.zeros(2), runs)
        assert torch.equal(torch.load(runs), torch.zeros(2))
        held.drop()
        # Said at the restore point: the files written from the state before the restore that are still there.
        assert [level for level, _ in said] == ["info", "warning"], said
        assert f"{tmp_path / 'd'} and 1 other file(s);" in said[1][1], said  # d, new.pt
        assert torch.save.__module__ == "torch.serialization" and os.replace.__module__ == "posix"
        assert not hasattr(shutil.copyfile, "__wrapped__")
    finally:
        hooks.remove_all()


def test_safetensors_writes_are_held_however_save_file_was_imported(tmp_path):
    import safetensors.torch
    from safetensors.torch import load_file
    from safetensors.torch import save_file as bound_before  # as transformers and accelerate import it

    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, path)  # as the run wrote it
    pending, said, hooks = [True], [], HookSet()
    held = held_writes.HeldWrites(lambda: pending[0], lambda msg, level: said.append((level, msg)))
    held.install(hooks)
    try:
        bound_before({"w": torch.zeros(2)}, str(path))  # the run's: left
        safetensors.torch.save_file({"w": torch.zeros(2)}, path)
        assert torch.equal(load_file(path)["w"], torch.ones(2))
        assert [level for level, _ in said] == ["info"] and "model.safetensors" in said[0][1], said
        held.drop()
        bound_before({"w": torch.zeros(2)}, str(path))
        assert torch.equal(load_file(path)["w"], torch.zeros(2))
    finally:
        hooks.remove_all()
