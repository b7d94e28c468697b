"""A relaunch whose modules do not have the checkpoint's structure (a parameter, buffer or submodule
added or removed while training, a layer widened in an edited script) is refused with one line and
exit status 2, on every rank, before anything is loaded; what legitimately differs is not refused."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from pyckpt import discovery, layout, transparent
from pyckpt.checkpointer import Checkpointer
from pyckpt.errors import PyckptError
from pyckpt.reader import IntoMismatchError

from transparent_helpers import clean_env, load, run_script, tree_equal

# Both scripts kill themselves at step 15 after the snapshot the test expects has committed: commits are
# asynchronous, and on a loaded machine the newest snapshot before the kill may be written steps later.
WAIT_FOR_COMMIT = (Path(__file__).parent / "commit_wait.py").read_text()

# 24 steps; checkpoints every 8. CHANGE happens at step 4 (before the step-8 checkpoint, so the
# relaunch's fast-forward skips it) or at step 10 ("later": after it, so the relaunch replays it).
STRUCT = WAIT_FOR_COMMIT + r"""
import os, signal, sys, time, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

if "WORLD_SIZE" in os.environ:  # ranks training on their own (no DDP): each rank's state is its own
    torch.distributed.init_process_group("gloo")
change, width = os.environ.get("CHANGE", ""), int(os.environ.get("WIDTH", "32"))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(16, width), nn.Linear(width, 4)
        self.register_buffer("calib", torch.zeros(3))
    def forward(self, x):
        return self.head(torch.relu(self.body(x)))

torch.manual_seed(0)
loader = DataLoader(TensorDataset(torch.randn(96, 16), torch.randn(96, 4)), batch_size=4)
model = Net()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for step, (x, y) in enumerate(loader, 1):
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    if step == 4:
        if change == "buffer":
            model.head.register_buffer("seen", torch.tensor(step))
        elif change == "parameter":
            model.head.register_parameter("scale", nn.Parameter(torch.ones(4), requires_grad=False))
        elif change == "submodule":
            model.add_module("head2", nn.Linear(4, 4))
            opt.add_param_group({"params": list(model.head2.parameters())})
        elif change == "removed":
            del model.calib
        elif change == "later":  # not part of the state: a resume must not mind it
            model.register_buffer("scratch", torch.ones(2), persistent=False)
    if step == 10 and change == "later":
        model.add_module("head2", nn.Linear(4, 4))
        opt.add_param_group({"params": list(model.head2.parameters())})
    time.sleep(0.05)  # a real step's time
    if step == 15 and os.environ.get("KILL") and not os.path.exists("mark"):
        open("mark", "w").close()
        every = int(os.environ["PYCKPT_EVERY_STEPS"])
        wait_for_commit(os.environ["PYCKPT_DIR"], 15 // every * every)
        os.kill(os.getpid(), signal.SIGKILL)
torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f"out{os.environ.get('RANK', '')}.pt")
print("TRAINED")
"""


def _refusals(r: subprocess.CompletedProcess) -> list[str]:
    """The relaunch's refusal lines, after checking it was refused (exit 2, no traceback, no training)."""
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "TRAINED" not in r.stdout, r.stderr[-3000:]
    return [x for x in r.stderr.splitlines() if x.startswith("pyckpt: cannot resume")]


@pytest.mark.parametrize("change,named", [
    ("buffer", "'head.seen'"),          # register_buffer on an existing submodule: a key the relaunch lacks
    ("parameter", "'head.scale'"),      # a frozen parameter (no optimizer group changes)
    ("submodule", "'head2.weight'"),    # add_module + add_param_group: named by key, not only by group count
    ("removed", "'calib'"),             # the mirror case: the relaunch has a key the checkpoint lacks
])
def test_a_module_changed_while_training_is_refused_with_one_line_naming_its_keys(tmp_path, change, named):
    (tmp_path / "train.py").write_text(STRUCT)
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="8", CHANGE=change)
    first = run_script(["train.py"], tmp_path, KILL="1", **env)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    second = run_script(["train.py"], tmp_path, **env)
    lines = _refusals(second)
    assert len(lines) == 1, second.stderr
    line = lines[0]
    assert "module 0 (Net)" in line and named in line, line
    assert "pyckpt.Checkpointer" in line and "PYCKPT_RESUME=never" in line, line


def test_an_edited_script_with_a_wider_layer_is_refused_in_one_process(tmp_path):
    # One process: the live parameters are the read's targets. The module check runs on the shapes the
    # checkpoint's tree records, before any tensor is read, so the refusal is discovery's one line (the
    # reader's own check used to refuse first, with each tensor on a line of its own, no mention of the
    # explicit API, and the way out at the end of the last line).
    (tmp_path / "train.py").write_text(STRUCT)
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="8")
    first = run_script(["train.py"], tmp_path, KILL="1", **env)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    second = run_script(["train.py"], tmp_path, WIDTH="64", **env)
    lines = _refusals(second)
    assert len(lines) == 1, second.stderr
    assert [x for x in second.stderr.splitlines() if not x.startswith("pyckpt: ")] == [], second.stderr
    line = lines[0]
    assert "module 0 (Net)" in line and "'body.weight': checkpoint (32, 16), this run (64, 16)" in line, line
    assert "3 entries" in line and "'head.weight': checkpoint (4, 32), this run (4, 64)" in line, line
    assert "pyckpt.Checkpointer" in line and "PYCKPT_RESUME=never" in line, line


def test_another_script_on_the_same_directory_is_refused_naming_both_scripts(tmp_path):
    """A fine-tuning script started on the pre-training run's PYCKPT_DIR: the refusal says which script
    wrote the checkpoint, not only that this run does not replay it."""
    (tmp_path / "train.py").write_text(STRUCT)
    other = STRUCT.replace("torch.randn(96, 16), torch.randn(96, 4)), batch_size=4",
                           "torch.randn(64, 16), torch.randn(64, 4)), batch_size=8")
    assert other != STRUCT
    (tmp_path / "finetune.py").write_text(other)
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="8")
    first = run_script(["train.py"], tmp_path, KILL="1", **env)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    second = run_script(["finetune.py"], tmp_path, **env)
    lines = _refusals(second)
    assert len(lines) == 1, second.stderr
    assert "the checkpoint was written by train.py, this is finetune.py" in lines[0], lines[0]
    assert "PYCKPT_RESUME=never" in lines[0], lines[0]
    # The same code under another name: the loader is the same, the script's frames are not.
    (tmp_path / "copy.py").write_text(STRUCT)
    lines = _refusals(run_script(["copy.py"], tmp_path, **env))
    assert len(lines) == 1 and "<module> (copy.py" in lines[0] and "has <module> (train.py)" in lines[0], lines
    again = run_script(["train.py"], tmp_path, **env)  # the script that wrote it still resumes
    assert again.returncode == 0 and "pyckpt: resumed from step " in again.stderr, again.stderr[-3000:]


def _damage(ckpt) -> None:
    """Flip the first bytes of every data file: a read of any tensor fails its checksum."""
    for f in ckpt.rglob("data-*.bin"):
        with open(f, "r+b") as fh:
            head = fh.read(16)
            fh.seek(0)
            fh.write(bytes(b ^ 0xFF for b in head))


def _saved_checkpoint(tmp_path, model: nn.Module):
    """A one-process transparent-style checkpoint of ``model`` (buffers per rank), its data damaged."""
    sd = model.state_dict()
    names = {n for n, _ in model.named_buffers()}
    with Checkpointer(str(tmp_path / "ck")) as ckpt:
        ckpt.save(8, {"modules": {"0": {k: v for k, v in sd.items() if k not in names}}},
                  rank_state={"buffers": {"0": {k: v for k, v in sd.items() if k in names}}}).wait()
        path = ckpt.latest().path
    _damage(tmp_path / "ck")
    return types.SimpleNamespace(path=path, rank_state={"buffers": {"0": {k: sd[k] for k in names}}})


def test_a_changed_module_is_refused_from_the_checkpoints_tree_before_any_tensor_is_read(tmp_path):
    # The data is damaged: had a tensor been read, its checksum would have failed first. The buffers
    # (per rank, BatchNorm's) come from the rank state: without them the same module would be refused.
    torch.manual_seed(0)
    src = _saved_checkpoint(tmp_path, nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32)))
    same = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32))
    opt = torch.optim.SGD(same.parameters(), lr=0.1)
    transparent._check_modules_before_read(discovery.Tracked(optimizers=[opt], modules=[same]), src)
    wider = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64))
    opt = torch.optim.SGD(wider.parameters(), lr=0.1)
    with pytest.raises(PyckptError, match=r"module 0 \(Sequential\).*'0\.weight': checkpoint \(32, 16\), "
                                          r"this run \(64, 16\)") as e:
        transparent._check_modules_before_read(discovery.Tracked(optimizers=[opt], modules=[wider]), src)
    assert "4 entries" in str(e.value) and "\n" not in str(e.value) and "pyckpt.Checkpointer" in str(e.value)


FSDP_WIDER = r"""
import sys, types, torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from pyckpt import Checkpointer, discovery, transparent
from pyckpt.errors import PyckptError
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}/rdv", rank=0, world_size=1)
def build(width):
    m = nn.Sequential(nn.Linear(5, width), nn.Linear(width, 3))
    fully_shard(m, mesh=init_device_mesh("cpu", (1,)))
    return m, torch.optim.AdamW(m.parameters())
m, opt = build(7)
with Checkpointer(sys.argv[1] + "/ck") as ckpt:
    ckpt.save(8, {"modules": {"0": m.state_dict()}}).wait()
    path = ckpt.latest().path
for f in __import__("pathlib").Path(sys.argv[1], "ck").rglob("data-*.bin"):
    f.write_bytes(bytes(b ^ 0xFF for b in f.read_bytes()))
src = types.SimpleNamespace(path=path, rank_state={})
m, opt = build(7)
transparent._check_modules_before_read(discovery.Tracked(optimizers=[opt], modules=[m]), src)
m, opt = build(9)
try:
    transparent._check_modules_before_read(discovery.Tracked(optimizers=[opt], modules=[m]), src)
except PyckptError as e:
    print("REFUSED", e)
dist.destroy_process_group()
"""


@pytest.mark.dist
def test_a_wider_fsdp2_layer_is_refused_at_its_global_shape_before_any_tensor_is_read(tmp_path):
    # FSDP2's tensors are not in the checkpoint's tree (their shards are placed by key): the check sees
    # them at their global shape, the live DTensors' too. The data is damaged, so nothing was read.
    (tmp_path / "fsdp.py").write_text(FSDP_WIDER)
    r = run_script(["fsdp.py", tmp_path], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("REFUSED"))
    assert "'0.weight': checkpoint (7, 5), this run (9, 5)" in line and "'1.weight'" in line, line


def test_a_refusal_of_many_lines_is_said_on_one():
    e = IntoMismatchError("cannot load X into the given targets; 2 problem(s):\n  'a': one\n  'b': two", [], [], [])
    assert transparent._with_hint(e) == ("cannot load X into the given targets; 2 problem(s): 'a': one; 'b': two; "
                                         "set PYCKPT_RESUME=never (or use a new PYCKPT_DIR) to start over")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(tmp_path, world: int = 2, **env: str) -> list[subprocess.CompletedProcess]:
    """The script on ``world`` ranks (what torchrun would start, without its agent's own output)."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "train.py"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=clean_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=world, LOCAL_WORLD_SIZE=world,
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env))
             for r in range(world)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_a_wider_layer_is_refused_with_one_line_on_every_rank_without_ddp(tmp_path):
    # Without DDP each rank's modules are stored with its own state and loaded by load_state_dict,
    # which raised "size mismatch" as a multi-line RuntimeError traceback on every rank.
    (tmp_path / "train.py").write_text(STRUCT)
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="8")
    assert all(r.returncode == 0 for r in _ranks(tmp_path, **env))
    older = tmp_path / "ck" / layout.step_dir_name(16)
    for r in _ranks(tmp_path, WIDTH="64", PYCKPT_RESUME=str(older), **env):
        lines = _refusals(r)
        assert len(lines) == 1, r.stderr
        assert "module 0 (Net)" in lines[0] and "'body.weight': checkpoint (32, 16), this run (64, 16)" in lines[0]
        assert "PYCKPT_RESUME=never" in lines[0], lines[0]


def test_what_is_not_in_the_state_or_made_after_the_checkpoint_is_not_refused(tmp_path):
    # A non-persistent buffer (not in state_dict()) registered before the checkpoint, and a submodule
    # with its optimizer group added after it (the relaunch replays that): the resume is exact.
    (tmp_path / "train.py").write_text(STRUCT)
    plain = run_script(["train.py"], tmp_path, CHANGE="later")
    assert plain.returncode == 0, plain.stderr[-3000:]
    (tmp_path / "out.pt").rename(tmp_path / "plain.pt")
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="8", CHANGE="later")
    first = run_script(["train.py"], tmp_path, KILL="1", **env)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    second = run_script(["train.py"], tmp_path, **env)
    assert second.returncode == 0 and "pyckpt: resumed from step 8 " in second.stderr, second.stderr[-3000:]
    assert tree_equal(load(tmp_path / "out.pt"), load(tmp_path / "plain.pt"))


def _tracked() -> tuple[discovery.Tracked, dict]:
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    opt = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.1, momentum=0.9)
    opt.zero_grad()
    b(a(torch.randn(4, 3))).sum().backward()
    opt.step()
    t = discovery.Tracked(optimizers=[opt], modules=[a, b])
    state = discovery.state_of(t)  # as a checkpoint would hold it: module tensors not the live ones
    state["modules"] = {k: {n: v.clone() for n, v in sd.items()} for k, sd in state["modules"].items()}
    return t, state


def test_load_refuses_a_changed_module_before_it_loads_any_object():
    t, state = _tracked()
    state["modules"]["0"]["weight"] = state["modules"]["0"]["weight"] + 1  # would be loaded first
    state["modules"]["1"]["1.extra"] = torch.zeros(1)                       # the second module differs
    before = t.modules[0].weight.detach().clone()
    with pytest.raises(PyckptError, match=r"module 1 \(Sequential\).*'1\.extra'") as e:
        discovery.load(t, state)
    assert "\n" not in str(e.value)
    assert torch.equal(t.modules[0].weight, before)  # nothing loaded: not even module 0


def test_load_accepts_what_strict_load_state_dict_accepts():
    # A non-persistent buffer is in neither state_dict(); a 0-dim parameter takes a saved 1-element
    # tensor (torch's own compatibility rule).
    t, state = _tracked()
    t.modules[1].register_buffer("scratch", torch.ones(5), persistent=False)
    t.modules[0].register_parameter("gain", nn.Parameter(torch.tensor(1.0)))
    state["modules"]["0"]["gain"] = torch.tensor([2.0])
    discovery.load(t, state)
    assert t.modules[0].gain.item() == 2.0


class _Picky(nn.Linear):
    """A module whose own _load_from_state_dict refuses a value its keys and shapes cannot show."""

    def _load_from_state_dict(self, state_dict, prefix, *args):
        super()._load_from_state_dict(state_dict, prefix, *args)
        if bool((state_dict[prefix + "weight"] == 0).all()):
            args[-1].append("all-zero weights refused")  # error_msgs


def test_a_refusal_of_load_state_dict_itself_is_one_line():
    torch.manual_seed(0)
    m = _Picky(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    t = discovery.Tracked(optimizers=[opt], modules=[m])
    state = {"modules": {"0": {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}},
             "optimizers": {"0": opt.state_dict()}, "schedulers": {}, "scalers": {}}
    with pytest.raises(PyckptError, match=r"module 0 \(_Picky\) does not take .*all-zero weights refused") as e:
        discovery.load(t, state)
    assert "\n" not in str(e.value) and "PYCKPT_RESUME=never" in str(e.value)


def test_a_module_cast_to_another_dtype_is_refused_not_loaded_with_a_silent_cast(tmp_path):
    # An edited script that builds the model in float64: torch's load_state_dict would cast the saved
    # float32 state into it without a word, a resume that is not the saved state. Refused with one
    # line, by both checks: the per-rank load's (discovery.load) and the one before any read.
    torch.manual_seed(0)
    saved_model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    live = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    before = {k: v.clone() for k, v in live.state_dict().items()}
    opt = torch.optim.SGD(live.parameters(), lr=0.1)
    tracked = discovery.Tracked(optimizers=[opt], modules=[live])
    state = {"modules": {"0": saved_model.state_dict()}, "optimizers": {"0": opt.state_dict()},
             "schedulers": {}, "scalers": {}}
    with pytest.raises(PyckptError, match=r"module 0 \(Sequential\).*dtypes differ: .*'0\.weight': checkpoint "
                                          r"torch\.float32, this run torch\.float64") as e:
        discovery.load(tracked, state)
    assert "\n" not in str(e.value) and "PYCKPT_RESUME=never" in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in live.state_dict().items())  # nothing was loaded
    src = _saved_checkpoint(tmp_path, saved_model)  # its data damaged: a read would fail its checksum
    with pytest.raises(PyckptError, match=r"module 0 \(Sequential\).*dtypes differ"):
        transparent._check_modules_before_read(tracked, src)


REASSIGNED = WAIT_FOR_COMMIT + r"""
import os, signal, time, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(16, 32), nn.Linear(32, 4)
        self.register_buffer("seen", torch.tensor(0))  # int64, a float32 once forward adds to it
        self.register_buffer("active", torch.ones(32))  # float, a bool mask after step 2
        self.best = 0  # extra state: torch.tensor(0) (int64) at first, float32 once set from a loss
    def get_extra_state(self):
        return torch.tensor(self.best)
    def set_extra_state(self, s):
        self.best = s.item()
    def forward(self, x):
        self.seen = self.seen + float(x.shape[0])
        return self.head(torch.relu(self.body(x)) * self.active)

torch.manual_seed(0)
loader = DataLoader(TensorDataset(torch.randn(96, 16), torch.randn(96, 4)), batch_size=4)
model = Net()
opt = torch.optim.SGD(model.parameters(), lr=1e-2)
for step, (x, y) in enumerate(loader, 1):
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    if step == 2:
        model.active = model.body.weight.abs().sum(1) > 2.2
    model.best = max(model.best, round(float(loss), 3))
    time.sleep(0.05)
    if step == 15 and os.environ.get("KILL") and not os.path.exists("mark"):
        open("mark", "w").close()
        every = int(os.environ["PYCKPT_EVERY_STEPS"])
        wait_for_commit(os.environ["PYCKPT_DIR"], 15 // every * every)
        os.kill(os.getpid(), signal.SIGKILL)
torch.save(model.state_dict(), os.environ["OUT"])
"""


def test_buffers_and_extra_state_the_script_reassigns_with_another_dtype_resume_exactly(tmp_path):
    # The module at the restore point is as the script builds it: buffers it later reassigns (a counter
    # that becomes a float, a mask that becomes bool) and its extra state have their first dtype there.
    # They get the saved tensors back (not cast into the old ones, not refused as an edited script).
    (tmp_path / "train.py").write_text(REASSIGNED)
    plain = run_script(["train.py"], tmp_path, OUT="plain.pt")
    assert plain.returncode == 0, plain.stderr[-3000:]
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="4", OUT="resumed.pt")
    first = run_script(["train.py"], tmp_path, KILL="1", **env)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    second = run_script(["train.py"], tmp_path, **env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "pyckpt: resumed from step 12" in second.stderr, second.stderr[-3000:]
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("plain.pt", "resumed.pt"))
    assert a.keys() == b.keys() and a["seen"].dtype == torch.float32 and a["active"].dtype == torch.bool
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), \
        {k: (a[k], b[k]) for k in a if not torch.equal(a[k], b[k])}


def test_a_reassigned_buffer_is_put_back_with_its_saved_dtype_and_shape_by_the_per_rank_load():
    # The per-rank path (discovery.load): load_state_dict would cast the float counter into the int one
    # (0.5 -> 0) and refuse the per-channel statistics that grew from one element to four.
    saved_model, live = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    saved_model.register_buffer("seen", torch.tensor(2.5))
    saved_model.register_buffer("scale", torch.arange(4.0))
    live.register_buffer("seen", torch.tensor(0))
    live.register_buffer("scale", torch.ones(1))
    opt = torch.optim.SGD(live.parameters(), lr=0.1)
    state = {"modules": {"0": saved_model.state_dict()}, "optimizers": {"0": opt.state_dict()},
             "schedulers": {}, "scalers": {}}
    discovery.load(discovery.Tracked(optimizers=[opt], modules=[live]), state)
    assert live.seen.dtype == torch.float32 and float(live.seen) == 2.5
    assert torch.equal(live.scale, torch.arange(4.0))
    assert live.scale is not state["modules"]["0"]["scale"]  # a copy: the checkpoint's tensor stays its own


def test_optimizer_parameters_outside_modules_are_found_refused_when_missing_and_put_back_in_place():
    from pyckpt.hooks import Registry

    model, temp, shift = nn.Linear(3, 1), nn.Parameter(torch.zeros(())), torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([{"params": model.parameters()}, {"params": [temp, shift]}], lr=0.1)
    opts = Registry()
    opts.add(opt)
    t = discovery.Discovery(opts, Registry(), Registry()).discover()
    assert t.modules == [model] and list(t.loose) == ["0.1.0", "0.1.1"]
    assert t.loose["0.1.0"] is temp and t.loose["0.1.1"] is shift
    # A checkpoint without them (written before they were saved) or with other shapes: refused, not ignored.
    with pytest.raises(PyckptError, match=r"2 parameter\(s\) no module owns \(0\.1\.0, 0\.1\.1;.*holds 0 \(none\)"):
        discovery.check_loose(t, None)
    # A checkpoint holding more of them: a group added while training (the relaunch has not made it yet).
    with pytest.raises(PyckptError, match=r"holds 3 \(0\.1\.0, 0\.1\.1, 0\.2\.0\).*optimizer\.add_param_group"
                                          r".*explicit API"):
        discovery.check_loose(t, {"0.1.0": torch.ones(()), "0.1.1": torch.ones(2), "0.2.0": torch.ones(1)})
    with pytest.raises(PyckptError, match=r"parameter 0\.1\.1 \(outside modules\) is torch.float32 \(3,\)"):
        discovery.check_loose(t, {"0.1.0": torch.ones(()), "0.1.1": torch.ones(3)})
    saved = {"0.1.0": torch.tensor(0.5), "0.1.1": torch.tensor([1.0, 2.0])}
    discovery.check_loose(t, saved)
    discovery.load_loose(t, saved)  # in place: the optimizer and the script keep these very tensors
    assert opt.param_groups[1]["params"][0] is temp and temp.item() == 0.5 and temp.requires_grad
    assert torch.equal(shift.detach(), torch.tensor([1.0, 2.0])) and shift.requires_grad
