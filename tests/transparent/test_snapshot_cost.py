"""Snapshots do not scan the heap: discovery pays once, then the constructor hooks keep it current.

The script below runs under PYCKPT_DIR with ``gc.get_objects`` and ``gc.collect`` wrapped by
counters in its own process (an observation of what each snapshot calls, not a stand-in for
anything pyckpt does), and prints the calls made inside each snapshot. Objects created after the
first snapshot (a new module wrapped in another, its new optimizer, a deep copy) must still be
in the next checkpoint.
"""
from __future__ import annotations

import json

from pyckpt import layout
from pyckpt.api import load

from transparent_helpers import run_script

SCRIPT = r"""
import copy, gc, json, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

calls = {"get_objects": 0, "collect": 0}
_get, _collect = gc.get_objects, gc.collect
def get_objects(*a, **k):
    calls["get_objects"] += 1
    return _get(*a, **k)
def collect(*a, **k):
    if (a[0] if a else k.get("generation", 2)) == 2:  # a full pass walks the heap; a young one, young objects
        calls["collect"] += 1
    return _collect(*a, **k)
gc.get_objects, gc.collect = get_objects, collect

import pyckpt.activation as activation
session = activation._SESSION
take = session._snapshot
log = []
def snapshot():  # records the heap scans made inside each snapshot
    before = dict(calls)
    take()
    log.append([session.step] + [calls[k] - before[k] for k in ("get_objects", "collect")])
session._snapshot = snapshot

class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, x):
        return self.inner(x)

junk = [[i] for i in range(200_000)]  # live objects a heap scan would have to walk
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
opts = [torch.optim.Adam(model.parameters(), lr=1e-2)]
loader = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)
late = []
for step, (x,) in enumerate(loader, 1):
    loss = model(x).sum() + sum(m(x).sum() for m in late)
    for o in opts:
        o.zero_grad()
    loss.backward()
    for o in opts:
        o.step()
    if step == 3:  # after the first snapshot (step 2): a new model, wrapped, and its optimizer
        late.append(Wrapper(nn.Linear(4, 1)))
        opts.append(torch.optim.SGD(late[-1].parameters(), lr=0.1))
    if step == 7:  # a deep copy (made by __setstate__, not __init__) with its own optimizer
        late.append(copy.deepcopy(late[0]))
        opts.append(torch.optim.SGD(late[-1].parameters(), lr=0.1))
    if step == 11:  # a bare parameter no module owns: one scan for this change, then none
        bare = nn.Parameter(torch.zeros(1))
        opts.append(torch.optim.SGD([bare], lr=0.1))
        late.append(lambda x, p=bare: (x * p).sum())
session.flush()
print("LOG", json.dumps(log))
"""


def test_snapshots_scan_no_heap_and_pick_up_late_objects(tmp_path):
    (tmp_path / "s.py").write_text(SCRIPT)
    ckpt = tmp_path / "ck"
    r = run_script(["s.py"], tmp_path, PYCKPT_DIR=ckpt, PYCKPT_EVERY_STEPS="2", PYCKPT_KEEP="20")
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("LOG "))[4:])
    steps = [s for s, _, _ in log]
    assert steps == list(range(2, 17, 2)), log
    scans = {s: (g, c) for s, g, c in log}
    # The only heap walk after start-up: the snapshot right after the bare parameter appeared.
    assert {s: v for s, v in scans.items() if v != (0, 0)} == {12: (1, 0)}, log

    def saved(step: int):
        return load(ckpt / layout.step_dir_name(step))

    assert len(saved(2)["optimizers"]) == 1 and len(saved(2)["modules"]) == 1
    s4 = saved(4)
    assert len(s4["optimizers"]) == 2
    assert sorted(s4["modules"]["1"]) == ["inner.bias", "inner.weight"]  # the wrapper is the root
    s8 = saved(8)
    assert len(s8["optimizers"]) == 3 and len(s8["modules"]) == 3
    s16 = saved(16)
    assert len(s16["optimizers"]) == 4 and len(s16["modules"]) == 3


GC_SCRIPT = r"""
import gc, json, threading, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pyckpt.activation as activation
session = activation._SESSION
take = session._snapshot
main = threading.get_ident()
passes = []
def on_gc(phase, info):
    if phase == "start" and threading.get_ident() == main:
        passes.append(info["generation"])
log = []
def snapshot():  # collector passes started on the training thread inside each snapshot
    gc.callbacks.append(on_gc)
    try:
        take()
    finally:
        gc.callbacks.remove(on_gc)
    log.append([session.step, list(passes)])
    passes.clear()
session._snapshot = snapshot

torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(300)])  # 600 parameters, 2400 tensors with Adam
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for (x,) in DataLoader(TensorDataset(torch.randn(24, 4)), batch_size=4):
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
session.flush()
print("LOG", json.dumps(log))
"""


def test_snapshots_of_thousands_of_tensors_start_no_collector_passes(tmp_path):
    # A full pass walks every object of a process that imported torch (~0.2 s here); before, a
    # snapshot of this state started dozens of passes, some of them full.
    (tmp_path / "s.py").write_text(GC_SCRIPT)
    r = run_script(["s.py"], tmp_path, PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="2")
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("LOG "))[4:])
    assert [s for s, _ in log] == [2, 4, 6], log
    # At most one young pass (the script's young objects', as the block starts: gcpause.paused), none full.
    assert all(len(p) <= 1 and all(g < 2 for g in p) for _, p in log), log
