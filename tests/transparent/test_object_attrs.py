"""Modules' state outside state_dict() (pyckpt/object_attrs.py), captured and restored with the loop state
in-process: a "run" captures at a point, the state then changes as a relaunch would have it, and the
restore at the same point puts the captured flags and attributes back (through the checkpoint format)."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from pyckpt import loopstate, tree
from pyckpt.errors import PyckptError
from transparent_helpers import harness_hook


def through_format(t: dict) -> dict:
    enc, tensors, _ = tree.flatten(t)
    return tree.unflatten(enc, lambda i, into, path: tensors[i].clone())


class Meter:  # a plain object of the script held by a layer: followed in place
    def __init__(self):
        self.seen = 0


class Counted(nn.Module):  # the script's own layer: every attribute is its state
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.calls, self.tau, self.cache, self.meter = 0, 1.0, None, Meter()
        self.fn = torch.tanh  # a function: left out quietly
        self.register_buffer("table", None, persistent=False)
        self.register_buffer("mask", torch.ones(3), persistent=False)


class LibraryLayer(nn.Module):  # stands for a library's class (its module is no script file)
    def __init__(self):
        super().__init__()
        self.seq_len_cached = 0


LibraryLayer.__module__ = "somelibrary.layers"


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.1), Counted(), LibraryLayer())


def _point(hook, i: int) -> None:
    hook(i, sys._getframe())


def _twice(hook) -> None:
    """Calls ``hook(i, frame)`` twice from the same instruction of two frames of the same code: the capture
    point, then the restore point (the relaunch's)."""
    hook = harness_hook(hook)  # (the hook's own closure is no state of the code under test)
    _point(hook, 0)
    _point(hook, 1)


def _run(model_then, change, model_now=None, max_bytes: int = 1 << 20):
    """Capture ``model_then`` at the point, apply ``change`` to it (what the relaunch has), then prepare and
    apply the restore into ``model_now`` (default: the same model). Returns (capture, plan)."""
    got = {}

    def hook(i, frame):
        if i == 0:
            got["cap"] = loopstate.capture([frame], "step", max_bytes, [model_then])
            got["tree"] = through_format(got["cap"].tree)
            change(model_then)
        else:
            got["plan"] = loopstate.prepare(got["tree"], [frame], "step", None, [model_now or model_then])
            got["plan"].apply()

    _twice(hook)
    return got["cap"], got["plan"]


def _relaunch_state(m: nn.Sequential) -> None:
    """What a relaunch holds at the restore point: flags and attributes as the script made them at start."""
    m.train()
    m[2].p = 0.1
    m[1].momentum = 0.1
    c = m[3]
    c.calls, c.tau, c.cache, c.meter.seen, c.table = 0, 1.0, None, 0, None
    c.mask.fill_(1)
    m[4].seq_len_cached = 0


def test_flags_attributes_and_non_persistent_buffers_are_put_back():
    m = _model()
    m.train()
    m[1].eval()  # BatchNorm frozen at some step
    m[2].p = 0.4  # a dropout schedule
    m[1].momentum = 0.05
    c = m[3]
    c.calls, c.tau, c.cache, c.meter.seen = 7, 0.25, torch.arange(4.0), 3
    c.table = torch.full((2,), 1.5)  # made in forward
    c.mask.mul_(2)  # changed in place
    m[4].seq_len_cached = 64
    mask_object = c.mask
    cap, plan = _run(m, _relaunch_state)
    assert not cap.warnings, cap.warnings
    assert plan.warnings == []
    assert m.training and not m[1].training and m[0].training and m[2].training
    assert m[2].p == 0.4 and m[1].momentum == 0.05
    assert (c.calls, c.tau, c.meter.seen) == (7, 0.25, 3)
    assert torch.equal(c.cache, torch.arange(4.0)) and torch.equal(c.table, torch.full((2,), 1.5))
    assert "table" in c._buffers and "table" not in c.state_dict()  # still a non-persistent buffer
    assert c.mask is mask_object and torch.equal(c.mask, torch.full((3,), 2.0))  # copied in place
    assert c.fn is torch.tanh
    assert m[4].seq_len_cached == 0  # a library layer: its flag only


def test_a_model_in_eval_mode_with_one_layer_in_train_mode_comes_back_so():
    m = _model()
    m.eval()
    m[2].train()
    _run(m, lambda x: x.train())
    assert [x.training for x in m.modules()] == [False, False, False, True, False, False, False]


def test_a_layer_of_another_class_refuses_the_resume_before_anything_is_written():
    then, now = _model(), _model()
    now[3] = nn.Linear(3, 3)
    then[2].p = 0.4
    then.eval()
    now.train()
    with pytest.raises(PyckptError, match=r"model\[0\]\.3 is a Linear now, the checkpoint holds a Counted"):
        _run(then, lambda x: None, now)
    assert now.training and now[2].p == 0.1  # nothing written


def test_a_layer_this_run_lacks_is_said_and_the_rest_restored():
    then, now = _model(), nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.1))
    then.train()
    then[2].eval()
    then[3].eval()
    then[1].momentum = 0.3
    _, plan = _run(then, lambda x: None, now)
    assert plan.warnings == ["model[0].3 (and 1 submodule(s) more) is not in this run's model: its train()/eval() "
                             "flag and attributes are not restored"]  # 3 and 3.lin
    assert not now[2].training and now[1].training and now[1].momentum == 0.3


class WithBig(Counted):
    def __init__(self):
        super().__init__()
        self.register_buffer("big", torch.zeros(64), persistent=False)  # 256 bytes, over a 200-byte cap


def test_large_buffers_never_changed_are_left_to_the_relaunch_changed_ones_are_said():
    m = _model()
    m[3] = c = WithBig()
    cap, _ = _run(m, lambda x: None, max_bytes=200)
    assert not [k for k in cap.warnings if "big" in k], cap.warnings
    assert [k for k in cap.skipped if k.endswith(".big")], cap.skipped
    c.big.add_(1)
    cap, _ = _run(m, lambda x: None, max_bytes=200)
    assert [v for k, v in cap.warnings.items() if k == "model[0].3.big" and "over" in v], cap.warnings


def test_a_malformed_module_section_is_refused_with_pyckpt_error():
    m = _model()
    got = {}

    def hook(i, frame):
        if i == 0:
            t = through_format(loopstate.capture([frame], "step", 1 << 20, [m]).tree)
            t["modules"][0]["flip"] = [3]
            got["t"] = t
        else:
            with pytest.raises(PyckptError, match="malformed"):
                loopstate.prepare(got["t"], [frame], "step", None, [m])

    _twice(hook)


class Wrapper(nn.Module):  # stands for a library's wrapper with machinery of its own (DDP's _lazy_init_ran)
    def __init__(self, inner):
        super().__init__()
        self.inner, self._ran, self.sync = inner, False, True


Wrapper.__module__ = "somelibrary.parallel"


class MyWrapper(Wrapper):  # a script subclass of it: only what the script's code assigns is its state
    def __init__(self, inner):
        super().__init__(inner)
        self.seen = 0


def test_a_script_subclass_of_a_library_class_keeps_the_library_s_attributes_out():
    m = MyWrapper(nn.Linear(2, 2))
    m._ran, m.sync, m.seen = True, False, 4

    def relaunch(x):
        x._ran, x.sync, x.seen = False, True, 0

    cap, _ = _run(m, relaunch)
    assert set(cap.tree["modules"][0]["attrs"][""]["attrs"]) == {"seen"}
    assert (m._ran, m.sync, m.seen) == (False, True, 4)


def test_the_models_attributes_share_one_cap():
    # Each layer's 240-byte activation kept for logging is under a 400-byte cap, both together are not:
    # the second is left out, and said (every layer's would be copied at every snapshot).
    m = nn.Sequential(Counted(), Counted())
    m[0].cache, m[1].cache = torch.zeros(60), torch.ones(60)
    cap, _ = _run(m, lambda x: None, max_bytes=400)
    assert "model[0].0.cache" not in cap.warnings
    assert "with the model's other attributes" in cap.warnings["model[0].1.cache"], cap.warnings


class Counting(torch.optim.SGD):  # an optimizer of the script's class with state outside state_dict()
    def __init__(self, params):
        super().__init__(params, lr=0.1)
        self.updates, self.meter = 0, Meter()


def _run_opts(then, change, now=None):
    got = {}

    def hook(i, frame):
        if i == 0:
            got["cap"] = loopstate.capture([frame], "step", 1 << 20, [], optimizers=then)
            got["tree"] = through_format(got["cap"].tree)
            change()
        else:
            got["plan"] = loopstate.prepare(got["tree"], [frame], "step", None, [], now or then)
            got["plan"].apply()

    _twice(hook)
    return got["cap"]


def test_an_optimizer_of_the_script_s_class_gets_its_attributes_back_library_ones_are_not_looked_at():
    p = nn.Parameter(torch.zeros(2))
    mine, theirs = Counting([p]), torch.optim.Adam([p])
    mine.updates, mine.meter.seen = 5, 2
    theirs.extra = 7  # a library class: left alone

    def change():
        mine.updates, mine.meter.seen, theirs.extra = 0, 0, 0

    cap = _run_opts([mine, theirs], change)
    assert cap.tree["optimizers"][1] is None
    assert set(cap.tree["optimizers"][0]["attrs"]) == {"updates"}  # meter: followed as a plain object
    assert (mine.updates, mine.meter.seen, theirs.extra) == (5, 2, 0)


def test_an_optimizer_of_another_class_refuses_the_resume():
    p = nn.Parameter(torch.zeros(2))
    mine = Counting([p])
    mine.updates = 3
    with pytest.raises(PyckptError, match=r"optimizer\[0\] is a SGD now, the checkpoint holds a Counting"):
        _run_opts([mine], lambda: None, [torch.optim.SGD([p], lr=0.1)])


class Holder(nn.Module):  # a layer holding a plain object of the script (its settings)
    def __init__(self):
        super().__init__()
        self.cfg = Meter()


class Trainer:
    def __init__(self):
        self.state = Meter()


def _capture_with(trainer, model):
    return loopstate.capture([sys._getframe()], "step", 1 << 20, [model])


def test_the_script_s_own_objects_come_before_the_layers_and_objects_past_the_limit_are_said():
    # 300 layers each holding an object: the trainer's nested state (found from the frame) is followed
    # first; the layers' objects past the limit are left out, and said (they used to be dropped quietly).
    model = nn.Sequential(*[Holder() for _ in range(300)])
    cap = _capture_with(Trainer(), model)
    paths = [o["at"] for o in cap.tree["objects"]]
    assert ["l", 0, "trainer", "state"] in paths and ["m", 0, "0", "cfg"] in paths
    assert len(paths) == loopstate.MAX_OBJECTS
    assert "are not followed" in cap.warnings["plain objects"]


class Focal(nn.Module):  # a loss of the script's class: no state_dict() entries, a gamma annealed by the loop
    def __init__(self):
        super().__init__()
        self.gamma, self.calls = 2.0, 0


def _hold(criterion, focal, hook, i):
    hook(i, sys._getframe())


def test_a_loss_function_held_by_the_script_gets_its_settings_and_flag_back_in_place():
    # nn.CrossEntropyLoss's label_smoothing set at some step, a script loss's gamma: neither is a part of
    # the model nor has state_dict() entries, so both were left out ("a module without state of its own").
    criterion, focal = nn.CrossEntropyLoss(), Focal()
    got = {}

    def hook(i, frame):
        if i == 0:
            criterion.label_smoothing, focal.gamma, focal.calls = 0.1, 0.5, 9
            focal.eval()
            got["t"] = through_format(loopstate.capture([frame], "step", 1 << 20, []).tree)
            criterion.label_smoothing, focal.gamma, focal.calls = 0.0, 2.0, 0
            focal.train()
        else:
            loopstate.prepare(got["t"], [frame], "step", None, []).apply()

    held = (criterion, focal)
    hook = harness_hook(hook)
    _hold(*held, hook, 0)
    _hold(*held, hook, 1)
    assert criterion.label_smoothing == 0.1 and (focal.gamma, focal.calls, focal.training) == (0.5, 9, False)


class Tempered(nn.Module):  # reads a temperature the training loop sets (its own code never assigns it)
    def forward(self, x):
        return x / self.temperature


def test_an_attribute_the_loop_sets_and_the_layer_reads_is_kept():
    m = nn.Sequential(Tempered())
    m[0].temperature = 0.5
    m[0].note_from_outside = 3  # neither assigned nor read by the class: not its state

    def relaunch(x):
        x[0].temperature, x[0].note_from_outside = 2.0, 0

    _run(m, relaunch)
    assert m[0].temperature == 0.5 and m[0].note_from_outside == 0
