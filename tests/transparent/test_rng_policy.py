"""RNG capture/restore and the snapshot policy (step trigger, time trigger agreement)."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.distributed import HashStore

from pyckpt import policy as policy_mod
from pyckpt import rng, tree
from pyckpt.policy import Policy, StoreAgreement


def _draws():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist(), random.gauss(0, 1),
            float(np.random.randn()))


def test_rng_streams_round_trip_through_the_state_tree():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draws()
    state = rng.capture()
    # The state must survive the checkpoint encoding (no pickle).
    encoded, tensors, _ = tree.flatten(state)
    state = tree.unflatten(encoded, lambda i, into, path: tensors[i].clone())
    expected = _draws()
    _draws()
    rng.restore(state)
    assert _draws() == expected


def test_step_trigger_fires_on_multiples():
    p = Policy(every_steps=4, every_seconds=None)
    assert [s for s in range(1, 13) if p.due(s)] == [4, 8, 12]


def test_time_trigger_single_process():
    assert Policy(every_steps=None, every_seconds=0.0).due(1)
    assert not Policy(every_steps=None, every_seconds=1e9).due(1)


def test_time_trigger_agreement_picks_one_future_step_on_every_rank(monkeypatch):
    """Two ranks in lock step; only rank 0's timer fires. Both must pick the same step."""
    monkeypatch.setattr(policy_mod, "POLL_S", 0.0)
    store = HashStore()
    ranks = [Policy(every_steps=None, every_seconds=1e9) for _ in range(2)]
    for r, p in enumerate(ranks):
        p.set_agreement(StoreAgreement(store, r, 2))
    ranks[0].deadline = 0.0  # rank 0's clock says "now"
    fired: dict[int, int] = {}
    for step in range(1, 12):
        for r, p in enumerate(ranks):
            p.next_poll = 0.0
            if p.due(step):
                fired.setdefault(r, step)
    assert fired[0] == fired[1] and fired[0] >= 3


def test_forced_request_from_one_rank_reaches_the_other(monkeypatch):
    monkeypatch.setattr(policy_mod, "POLL_S", 0.0)
    store = HashStore()
    a, b = (Policy(every_steps=None, every_seconds=1e9) for _ in range(2))
    a.set_agreement(StoreAgreement(store, 0, 2))
    b.set_agreement(StoreAgreement(store, 1, 2))
    b.force()  # SIGTERM on rank 1 only
    fired = {}
    for step in range(1, 10):
        for name, p in (("a", a), ("b", b)):
            p.next_poll = 0.0
            if p.due(step):
                fired.setdefault(name, step)
    assert fired["a"] == fired["b"]
