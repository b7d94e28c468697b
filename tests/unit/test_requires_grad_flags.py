"""discovery.requires_grad_of / load_requires_grad: the flags of optimizer parameters a script flips in
its loop (unfreezing) go with a snapshot and come back at the restore; a record that does not fit this
run's parameters changes nothing and says why."""
from __future__ import annotations

import torch
from torch import nn

from pyckpt import discovery


def _tracked() -> tuple[discovery.Tracked, nn.Sequential]:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[1].parameters()}], lr=0.1)
    return discovery.Tracked(optimizers=[opt], modules=[model]), model


def test_flags_follow_param_groups_order_and_come_back():
    t, model = _tracked()
    model[0].bias.requires_grad_(False)
    saved = discovery.requires_grad_of(t)
    assert saved == {"0": "1011"}  # weight, bias of layer 0 then of layer 1
    t2, model2 = _tracked()  # the relaunch: everything trainable as built
    assert discovery.load_requires_grad(t2, saved) is None
    assert [p.requires_grad for p in model2.parameters()] == [True, False, True, True]


def test_a_record_of_other_parameters_changes_nothing_and_says_why():
    for bad in ({"0": "101"}, {"0": "10x1"}, {"1": "1111"}, ["1111"], {"0": 1111}):
        t, model = _tracked()
        why = discovery.load_requires_grad(t, bad)
        assert why is not None and "requires_grad" in why
        assert all(p.requires_grad for p in model.parameters())


def test_a_checkpoint_without_flags_leaves_them():
    t, model = _tracked()
    model[1].weight.requires_grad_(False)
    assert discovery.load_requires_grad(t, None) is None
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, True]
