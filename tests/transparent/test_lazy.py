"""Lazy capture (pyckpt/lazy.py): a snapshot armed at the consistent point holds the values of that point.

A real training script runs under PYCKPT_DIR in a subprocess; right after the fetch at which a snapshot
is taken it records the model's state (the consistent point's values) and, in some scenarios, changes
a parameter in place before the copy can be known to be done. Afterwards each checkpoint is read back
and compared bitwise with the recorded values: a checkpoint either holds exactly them or does not
exist (discarded with one warning line); it never holds a later value.
"""
from __future__ import annotations

import json
import shutil
import sys
import threading

import pytest

from transparent_helpers import run_script

SCRIPT = r"""
import json, os, sys, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import pyckpt.activation as activation
import pyckpt.lazy as lazy

SC = os.environ["SCENARIO"]
captures = []
if SC == "shm":  # every engine capture, by the directory it writes (the memory tier's or storage's)
    import pyckpt.writer as writer
    real_start = writer.start
    writer.start = lambda *a, **k: captures.append(str(a[2])) or real_start(*a, **k)
if SC == "guard":
    lazy.EAGER_MAX_BYTES = 0  # buffers are then guarded by version counters instead of copied at once
torch.manual_seed(0)
ALIAS = SC in ("data", "numpy", "dlpack")  # writes through an alias whose version counter is not the tensor's
W = 1024 if ALIAS else 16  # 8 MB of state, so its copy is still running after the fetch
model = nn.Sequential(nn.Linear(8, W), nn.BatchNorm1d(W), nn.Linear(W, W), nn.Linear(W, 1))
opt = torch.optim.SGD(model.parameters(), lr=1e-3 if ALIAS else 0.1, momentum=0.9)  # (no NaNs at 1024)
loader = DataLoader(TensorDataset(torch.randn(64, 8), torch.randn(64, 1)), batch_size=8)
session = activation._SESSION
expected, armed, gated, step = {}, {}, {}, 0
for x, y in loader:
    if step in (2, 4, 6):  # the snapshot of `step` was taken at the fetch that just returned
        armed[step] = session.lazy.armed is not None
        expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
        if SC == "bn":  # numpy of memory no guarded tensor views (the batch, an activation): no wait
            x.numpy(), model[0](x).detach().numpy()
            gated[step] = lazy._ALIAS_GATE.armed is not None
        if SC == "mutate" and step in (2, 4):
            with torch.no_grad():
                model[0].weight.add_(1.0)  # in place, right after arming
        if SC == "data" and step in (2, 4):
            for p in model.parameters():
                p.data.mul_(0.5)  # through .data: the version counter does not move
        if SC == "numpy" and step in (2, 4):
            for p in model.parameters():
                a = p.detach().numpy()  # numpy's writes move no version counter either
                a *= 0.5
        if SC == "dlpack" and step in (2, 4):
            for p in model.parameters():  # an interop round trip (CuPy, JAX): a tensor with its own counter
                torch.from_dlpack(p.detach()).mul_(0.5)
    loss = ((model(x) - y) ** 2).mean()  # forward updates the BatchNorm running stats in place
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
activation.disable()

import pyckpt
def tensors(v, path, out):
    if isinstance(v, torch.Tensor):
        out[path] = v
    elif isinstance(v, dict):
        for k, x in v.items():
            tensors(x, f"{path}/{k}", out)
result = {"armed": armed, "gated": gated, "equal": {}, "captures": captures, "requires_grad": []}
with pyckpt.Checkpointer(os.environ["PYCKPT_DIR"]) as ck:
    for s, exp in expected.items():
        try:
            r = ck.restore(s)
        except pyckpt.CheckpointNotFoundError:
            result["equal"][s] = None
            continue
        saved = {}
        tensors(r.state, "", saved)
        tensors(r.rank_state, "", saved)
        result["requires_grad"] += [p for p, t in saved.items() if t.requires_grad]  # as state_dict() gives them
        ok = True
        for k, v in exp.items():
            hits = [t for p, t in saved.items() if p.endswith("/" + k) and "optimizers" not in p]
            ok = ok and len(hits) == 1 and torch.equal(hits[0], v)
        result["equal"][s] = ok
print("RESULT " + json.dumps(result))
"""


def _run(tmp_path, scenario: str, **env: str) -> tuple[dict, list[str]]:
    (tmp_path / "train.py").write_text(SCRIPT)
    r = run_script(["train.py"], tmp_path, SCENARIO=scenario, PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="2",
                   PYCKPT_KEEP="10", **env)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    warnings = [x for x in r.stderr.splitlines() if x.startswith("pyckpt: warning")]
    return res, warnings


@pytest.mark.parametrize("scenario,env", [("bn", {}), ("off", {"PYCKPT_LAZY": "0"})])
def test_lazy_snapshot_holds_the_consistent_point_values_bn_buffers_included(tmp_path, scenario, env):
    res, warnings = _run(tmp_path, scenario, **env)
    assert warnings == []
    # lazy: armed (copy in flight) while forward mutates BatchNorm buffers; PYCKPT_LAZY=0: copied at once
    assert res["armed"] == {s: scenario == "bn" for s in ("2", "4", "6")}
    if scenario == "bn":  # .numpy() of the batch or an activation left the alias gate closed: no wait
        assert res["gated"] == {"2": True, "4": True, "6": True}
    assert res["equal"] == {"2": True, "4": True, "6": True}
    assert res["requires_grad"] == []  # the parameters were handed over undetached, recorded as state_dict()'s


def test_memory_tier_captures_once_and_storage_holds_the_consistent_point_values(tmp_path):
    from pyckpt import shm_tier

    try:
        res, warnings = _run(tmp_path, "shm", PYCKPT_SHM_MB="64", PYCKPT_STORAGE_EVERY="1")
    finally:
        shutil.rmtree(shm_tier.shm_path(str(tmp_path / "ck")), ignore_errors=True)
    assert warnings == []
    assert res["equal"] == {"2": True, "4": True, "6": True}  # storage's copies, read back bitwise
    assert res["requires_grad"] == []
    # Each snapshot was captured once, by the memory tier; storage's checkpoint was copied from it.
    assert len(res["captures"]) >= 3 and all(c.startswith(shm_tier.SHM_ROOT) for c in res["captures"])


def test_parameter_changed_after_arming_discards_the_checkpoint_then_eager(tmp_path):
    res, warnings = _run(tmp_path, "mutate")
    assert res["armed"] == {"2": True, "4": False, "6": False}  # lazy is off after the torn copy
    assert res["equal"] == {"2": None, "4": True, "6": True}  # never the later value
    assert len(warnings) == 1, warnings
    assert "checkpoint of step 2 discarded" in warnings[0] and "0.weight" in warnings[0]
    assert "eager" in warnings[0]


@pytest.mark.parametrize("alias", ["data", "numpy", "dlpack"])
def test_a_write_through_an_alias_right_after_arming_waits_for_the_copy(tmp_path, alias):
    # `.data`, `.numpy()` and DLPack aliases share no version counter with their tensor, so the guards
    # cannot see a write through one: while a snapshot is being copied, making such an alias of a
    # guarded tensor waits for the copy to finish first (as eager capture would).
    res, warnings = _run(tmp_path, alias, PYCKPT_STAGING_MB="1", PYCKPT_CHUNK_MB="1")
    assert warnings == []
    assert res["armed"] == {"2": True, "4": True, "6": True}
    assert res["equal"] == {"2": True, "4": True, "6": True}  # the consistent point's values, never later


def test_guarded_buffer_changed_by_forward_is_never_saved_torn(tmp_path):
    # Buffers over the eager-copy size are guarded by version counters: forward changes them -> discarded.
    res, warnings = _run(tmp_path, "guard")
    assert res["equal"] == {"2": None, "4": True, "6": True}
    assert len(warnings) == 1, warnings
    assert "discarded" in warnings[0] and ("running_" in warnings[0] or "num_batches_tracked" in warnings[0])


# -- the snapshot point's protection of an encoded state (lazy._protect), in process ------------------
class _NeedsArgs(dict):
    """A dict subclass that cannot be rebuilt empty (``type(d)()`` fails)."""

    def __init__(self, items):
        super().__init__(items)


def test_protect_copies_small_tensors_no_optimizer_owns_into_the_encoding_and_guards_the_rest():
    import torch
    from pyckpt import lazy, tree

    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(4)
    opt.step()
    buf = torch.full((3,), 2.0)  # a BatchNorm-like buffer: forward changes it in place
    big = torch.zeros(lazy.EAGER_MAX_BYTES // 4 + 1)  # over the eager-copy size: guarded
    shared = torch.arange(6.0)
    state = {"model": {"w": p.detach(), "b": buf, "big": big, "v": [shared[:3], shared[3:]]},
             "opt": opt.state_dict(), "custom": _NeedsArgs({"x": torch.ones(2)})}
    flat = tree.flatten(state)
    tracker = lazy._OwnedStorages()
    owned = tracker.storages([opt])
    # The optimizer's own tensor objects (its momentum buffer) are known by identity, without a storage read.
    assert id(opt.state[p]["momentum_buffer"]) in tracker.ids and id(p) in tracker.ids
    for ids in (frozenset(), tracker.ids):
        out, guards = lazy._protect(flat, owned, "state", ids)
        assert out.tree is flat.tree and out.paths is flat.paths
        copied = {path for path, a, b in zip(flat.paths, flat.tensors, out.tensors) if a is not b}
        assert copied == {"model/b", "custom/x"}
        before = buf.clone()
        buf.add_(1.0)
        assert torch.equal(out.tensors[flat.paths.index("model/b")], before)  # the snapshot point's
        assert guards.changed() == []
        with torch.no_grad():
            p.add_(1.0)
            big.add_(1.0)
            opt.state[p]["momentum_buffer"].add_(1.0)
        assert sorted(guards.changed()) == ["state/model/big", "state/model/w", "state/opt/state/0/momentum_buffer"]


def test_owned_storages_are_read_again_when_a_parameter_moves():
    import torch
    from pyckpt import lazy

    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1)
    owned = lazy._OwnedStorages()
    assert p.untyped_storage().data_ptr() in owned.storages([opt])
    old = p.untyped_storage().data_ptr()
    keep = p.data  # the old memory stays allocated, so its address cannot be reused by the new one
    p.data = torch.zeros(4)
    now = owned.storages([opt])
    assert p.untyped_storage().data_ptr() in now and old not in now and keep is not None


# -- the alias gate's life cycle ---------------------------------------------------------------------
GATE = r'''
import json, os, sys, torch, numpy as np
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import pyckpt, pyckpt.activation as activation, pyckpt.lazy as lazy
SC = os.environ["SCENARIO"]
NAMES = ("data", "numpy", "__dlpack__")
if SC == "userpatch":  # another library wraps Tensor.numpy / __dlpack__ after pyckpt started
    real_numpy, real_dl = torch.Tensor.numpy, torch.Tensor.__dlpack__
    def my_numpy(self, *a, **k): return real_numpy(self, *a, **k)
    def my_dlpack(self, *a, **k): return real_dl(self, *a, **k)
    torch.Tensor.numpy, torch.Tensor.__dlpack__ = my_numpy, my_dlpack
BEFORE = {n: torch.Tensor.__dict__.get(n) for n in NAMES}
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 2048), nn.Linear(2048, 2048), nn.Linear(2048, 1))
opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
loader = DataLoader(TensorDataset(torch.randn(64, 8), torch.randn(64, 1)), batch_size=8)
session = activation._SESSION
res = {}
for x, y in loader:
    if session.step == 2 and "armed" not in res:
        res["armed"] = lazy._ALIAS_GATE.armed is not None
        b = model[2].bias                         # smallest guarded tensor: copied last
        expected = b.detach().clone()
        if SC in ("disable", "torn_disable"):
            if SC == "torn_disable":
                with torch.no_grad():
                    b.add_(100.0)                 # moves the version counter: must be discarded, with a warning
            pyckpt.disable()
            break
    if SC == "userpatch" and session.step == 5:
        break
    loss = ((model(x) - y) ** 2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
activation.disable()
res["restored"] = {n: torch.Tensor.__dict__.get(n) is BEFORE[n] for n in NAMES}
with pyckpt.Checkpointer(os.environ["PYCKPT_DIR"]) as ck:
    try:
        r = ck.restore(2)
        hits = []
        def walk(v, path=""):
            if isinstance(v, torch.Tensor):
                if path.endswith("/2.bias") and "optimizers" not in path: hits.append(v)
            elif isinstance(v, dict):
                for k, x in v.items(): walk(x, f"{path}/{k}")
        walk(r.state)
        res["ckpt2"] = "consistent" if torch.equal(hits[0], expected) else (
            "LATER" if torch.equal(hits[0], expected + 100.0) else "other")
    except pyckpt.CheckpointNotFoundError:
        res["ckpt2"] = "discarded"
print("RESULT " + json.dumps(res), flush=True)
'''


def _gate_run(tmp_path, scenario: str) -> tuple[dict, list[str]]:
    (tmp_path / "gate.py").write_text(GATE)
    r = run_script(["gate.py"], tmp_path, SCENARIO=scenario, PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="2",
                   PYCKPT_KEEP="10", PYCKPT_STAGING_MB="1", PYCKPT_CHUNK_MB="1")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    return res, [x for x in r.stderr.splitlines() if x.startswith("pyckpt: warning")]


def test_disable_while_a_snapshot_is_armed_gives_torch_tensor_back(tmp_path):
    # disable() settles the armed snapshot through its future (flush): the gate was left on torch.Tensor.
    res, _ = _gate_run(tmp_path, "disable")
    assert res["armed"] and res["restored"] == {"data": True, "numpy": True, "__dlpack__": True}
    assert res["ckpt2"] == "consistent"


def test_a_torn_snapshot_settled_by_disable_is_discarded_with_its_line(tmp_path):
    res, warnings = _gate_run(tmp_path, "torn_disable")
    assert res["ckpt2"] == "discarded"
    assert [w for w in warnings if "checkpoint of step 2 discarded" in w and "'state/" in w], warnings


def test_a_librarys_own_numpy_and_dlpack_wrappers_are_put_back_after_the_gate(tmp_path):
    res, _ = _gate_run(tmp_path, "userpatch")
    assert res["restored"] == {"data": True, "numpy": True, "__dlpack__": True}


FORK = r'''
import sys, torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
class EvalSet(Dataset):
    def __len__(self): return 4
    def __getitem__(self, i):
        t = torch.full((8,), float(i))
        return t.data * 2          # `.data` in the dataset, on the worker's own tensor
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 1))
opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
loader = DataLoader(TensorDataset(torch.randn(64, 8), torch.randn(64, 1)), batch_size=8)
for step, (x, y) in enumerate(loader):
    if step == 2:    # evaluation at the top of an iteration (the snapshot of this fetch is armed)
        ev = DataLoader(EvalSet(), batch_size=2, num_workers=1, timeout=20)   # worker forked now
        print("eval", [b.sum().item() for b in ev], flush=True)
    loss = ((model(x) - y) ** 2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
print("DONE", flush=True)
'''


def test_a_loader_worker_forked_while_a_snapshot_is_armed_does_not_wait_for_it(tmp_path):
    # The child inherits the closed gate; `.data` there waited for a copy only the parent's engine makes.
    (tmp_path / "fork.py").write_text(FORK)
    r = run_script(["fork.py"], tmp_path, PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="2", timeout=90)
    assert r.returncode == 0 and "DONE" in r.stdout, r.stderr[-2000:]
    assert "eval [16.0, 80.0]" in r.stdout, r.stdout  # items 2i: (0 + 1) * 16, (2 + 3) * 16


class _Done:  # a copy that is done (the gate's futures need only captured())
    def captured(self, timeout=None):
        return True


class _InFlight:
    def __init__(self):
        self.ev = threading.Event()

    def captured(self, timeout=None):
        return self.ev.wait(timeout)


def test_a_stale_wait_does_not_open_the_next_snapshots_gate():
    # A thread reading `.data` (a monitor, an EMA) paused inside wait() while the training thread settles
    # snapshot 1 and arms snapshot 2 (forced with sys.settrace): it must not open snapshot 2's gate.
    import torch
    from pyckpt import lazy

    gate = lazy._ALIAS_GATE
    a1 = lazy.Armed(1, [_Done()], [], threading.current_thread())
    gate.close(a1)
    reached, go = threading.Event(), threading.Event()

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code is lazy._AliasGate.open.__code__:
            reached.set()
            go.wait(10)
        return None

    def reader():  # e.g. a monitoring thread doing p.data.norm()
        sys.settrace(tracer)
        try:
            gate.wait()
        finally:
            sys.settrace(None)

    t = threading.Thread(target=reader)
    t.start()
    assert reached.wait(10)
    # training thread meanwhile: snapshot 1 settled (Lazy.settle -> open), snapshot 2 armed (close)
    gate.open()
    inflight = _InFlight()
    a2 = lazy.Armed(2, [inflight], [], threading.current_thread())
    gate.close(a2)
    go.set()
    t.join(10)
    try:
        assert gate.armed is a2, "snapshot 2's copy is in flight but its alias gate was opened by a stale wait"
        assert torch.Tensor.__dict__.get("numpy") is gate._attrs["numpy"]
    finally:
        inflight.ev.set()
        gate.open()
