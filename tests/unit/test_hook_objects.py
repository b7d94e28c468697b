"""pyckpt/hook_objects.py: the script's stateful hooks torch holds, found by path and followed back."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pyckpt import hook_objects
from pyckpt.errors import PyckptError


class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1


def _script(v):
    return isinstance(v, Counting)


def test_hooks_of_layers_parameters_and_optimizers_are_found_and_resolved_by_their_place():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lib = model[1][1].register_forward_hook(lambda *a: None)  # not the script's state: no place taken
    fwd, pre = Counting(), Counting()
    model[1][1].register_forward_hook(fwd)
    model.register_forward_pre_hook(pre)
    grad = Counting()
    model[0].bias.register_hook(grad)
    step = Counting()
    opt.register_step_post_hook(step)
    found = hook_objects.find([model], [opt], _script)
    assert [p for p, _ in found] == [["mh", 0, "", "_forward_pre_hooks", 0], ["ph", 0, "0.bias", "_backward_hooks", 0],
                                     ["mh", 0, "1.1", "_forward_hooks", 0], ["oh", 0, "_optimizer_step_post_hooks", 0]]
    assert [h for _, h in found] == [pre, grad, fwd, step]
    assert all(hook_objects.resolve(p, [model], [opt], _script) is h for p, h in found)
    assert hook_objects.label(found[2][0]) == "model[0].1.1 _forward_hooks[0]"
    assert hook_objects.label(found[3][0]) == "optimizer[0] _optimizer_step_post_hooks[0]"
    # Kept while no hook was registered or removed: the same list, without looking at the layers again.
    assert hook_objects.find([model], [opt], _script) is found
    lib.remove()  # a library's hook removed: the script's keep their places, the list holds
    assert hook_objects.find([model], [opt], _script) is found
    more = Counting()
    handle = model[0].register_forward_pre_hook(more)  # registered later: looked at again, found
    again = hook_objects.find([model], [opt], _script)
    assert [h for _, h in again] == [pre, more, grad, fwd, step]
    handle.remove()  # the script's removed: its place is no longer its hook, looked at again
    assert [h for _, h in hook_objects.find([model], [opt], _script)] == [pre, grad, fwd, step]
    # A relaunch without the hook at that place: None, and must_resolve names it.
    fresh = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 1)))
    assert hook_objects.resolve(found[2][0], [fresh], [opt], _script) is None
    with pytest.raises(PyckptError, match=r"the hook model\[0\]\.1\.1 _forward_hooks\[0\] does not exist"):
        hook_objects.must_resolve(found[2][0], [fresh], [opt], _script)
    # Malformed paths (read from a checkpoint) resolve to nothing.
    for bad in (["mh", 5, "", "_forward_hooks", 0], ["mh", 0, "nope", "_forward_hooks", 0],
                ["mh", 0, "", "__dict__", 0], ["oh", 0, "_optimizer_step_post_hooks", "0"], ["xx"], []):
        assert hook_objects.resolve(bad, [model], [opt], _script) is None


def test_a_lambda_schedulers_closures_are_found_and_its_callable_objects_are_left_to_its_state_dict():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    count = [0]

    def closure(_):
        return 1.0 + 0 * count[0]
    counter = Counting()  # a callable object: LambdaLR's state_dict() keeps its attributes itself
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [closure])
    other = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0),
                                              lambda _: counter(_) or 1.0)
    found = hook_objects.find([], [opt], lambda v: True, [sched, other])
    assert [p for p, _ in found] == [["sh", 0, "lr_lambdas", 0], ["sh", 1, "lr_lambdas", 0]]
    assert found[0][1] is closure and hook_objects.label(found[0][0]) == "lr_scheduler[0] lr_lambdas[0]"
    assert hook_objects.resolve(found[1][0], [], [opt], lambda v: True, [sched, other]) is other.lr_lambdas[0]
    assert hook_objects.resolve(found[1][0], [], [opt], lambda v: True, [sched]) is None
    objs = torch.optim.lr_scheduler.LambdaLR(opt, Factor())
    assert hook_objects.find([], [opt], lambda v: True, [objs]) == []


class Factor:
    def __call__(self, epoch):
        return 1.0
