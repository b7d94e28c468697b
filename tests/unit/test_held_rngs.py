"""pyckpt/held_rngs.py: the generators a loader's parts hold deeper than ``generators``' named shapes, under
keys ``loader_state`` follows back (``lazy_slot``), within the walk's bounds."""
from __future__ import annotations

import functools
import random
import threading

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pyckpt import held_rngs, loader_state


class Box:
    def __init__(self, inner=None, rng=None):
        self.inner, self.rng = inner, rng


class Aug:
    """Not callable: a dataset's helper drawing through a method."""

    def __init__(self, inner):
        self.noise = inner

    def apply(self, x):
        return x


class DS(Dataset):
    def __init__(self, aug=None):
        self.aug = aug

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.tensor(float(i))


def keys(loader):
    return [k for k, _, _ in loader_state.generators(loader)]


def test_generators_an_object_further_down_holds_are_found_under_the_path_to_them():
    g = np.random.default_rng(1)
    ds = DS(Aug(Box(Box(rng=g))))
    assert keys(DataLoader(ds)) == ["dataset.aug.noise.inner.rng"]
    # Found in a worker's copy too (no loader): the same key, so the main process's and the workers' agree.
    assert [k for k, _, x in loader_state.generators(None, ds) if x is g] == ["dataset.aug.noise.inner.rng"]

    def made(box):
        return lambda x: (box, x)[1]
    ds.aug = Aug(made(Box(rng=random.Random(2))))  # a function's closure holding the object that holds it
    assert keys(DataLoader(ds)) == ["dataset.aug.noise.closure.box.rng"]


def scaled(x, rng):
    return x


def test_what_a_partial_binds_and_a_bound_methods_object_are_looked_into():
    aug = Aug(None)
    aug.rng = random.Random(1)
    ds = DS([functools.partial(scaled, rng=torch.Generator()), aug.apply])
    assert keys(DataLoader(ds)) == ["dataset.aug.0.keywords.rng", "dataset.aug.1.__self__.rng"]
    ds.aug = functools.partial(scaled, np.random.default_rng(2))
    assert keys(DataLoader(ds)) == ["dataset.aug.args.0"]


def test_a_key_found_by_the_named_shapes_keeps_its_key_and_a_generator_is_listed_once():
    t = torch.Generator()
    ds = DS(Box(rng=t))  # ``Box`` is not callable: not one of ``generators``' named shapes
    ds.rng = t  # the dataset's own attribute (a named shape) holds the same generator
    ds.more = Box(Box(rng=random.Random(0)))
    assert keys(DataLoader(ds)) == ["dataset.rng", "dataset.more.inner.rng"]


class Helped(Sampler):
    def __init__(self, helper):
        self.helper = helper

    def __iter__(self):
        return iter(range(4))

    def __len__(self):
        return 4


def test_a_samplers_helpers_helper_and_the_relaunchs_none_in_its_place():
    sampler = Helped(Box(Box(rng=torch.Generator())))
    loader = DataLoader(DS(), sampler=sampler)
    assert keys(loader) == ["sampler.0.helper.inner.rng"]
    # Made at the first __iter__ (None in a relaunch that skipped the epochs): a generator is put there by key.
    sampler.helper.inner.rng = None
    slot = loader_state.lazy_slot(loader, "sampler.0.helper.inner.rng", "torch")
    assert slot[0] is sampler.helper.inner and slot[1] == "rng" and isinstance(slot[2], torch.Generator)
    # The same through a closure's cell (``_owner_of`` follows ``closure.<name>``).
    box = Box()
    sampler.helper = Box(inner=lambda: box)
    slot = loader_state.lazy_slot(loader, "sampler.0.helper.inner.closure.box.rng", "random")
    assert slot[0] is box and slot[1] == "rng" and isinstance(slot[2], random.Random)


def test_the_walk_stays_within_its_hops_and_budget_and_out_of_threads_modules_and_big_containers():
    deep = Box(rng=random.Random(1))
    for _ in range(held_rngs.HOPS):  # one attribute more than the walk follows
        deep = Box(deep)
    assert keys(DataLoader(DS(deep))) == []
    near = Box(rng=random.Random(1))
    for _ in range(held_rngs.HOPS - 2):
        near = Box(near)
    assert keys(DataLoader(DS(near))) == ["dataset.aug" + ".inner" * (held_rngs.HOPS - 2) + ".rng"]
    # A cycle of objects ends (each object is looked into once).
    a = Box()
    a.inner = Box(a, rng=random.Random(3))
    assert keys(DataLoader(DS(a))) == ["dataset.aug.inner.rng"]
    # Not looked into: a list longer than HELD_MAX (a dataset's samples), a module, a thread, an nn.Module.
    ds = DS([Box(rng=random.Random(i)) for i in range(held_rngs.HELD_MAX + 1)])
    ds.np, ds.th = np, threading.Thread(target=print)
    ds.th.rng = random.Random(4)
    ds.net = torch.nn.Linear(1, 1)
    ds.net.rng = random.Random(5)
    assert keys(DataLoader(ds)) == []
    # The budget: objects looked into per call, breadth first. In a worker (no loader) the dataset is the only
    # root: it (1), its list, ``tail`` and its class (a script class: 4), the list's boxes (36), then
    # ``tail.inner``, which holds one.
    ds = DS([Box() for _ in range(held_rngs.HELD_MAX)])
    ds.tail = Box(Box(rng=random.Random(6)))
    found = [k for k, _, _ in loader_state.generators(None, ds)]
    assert found == ["dataset.tail.inner.rng"]
    old = held_rngs.BUDGET
    try:
        held_rngs.BUDGET = 4 + held_rngs.HELD_MAX + 1
        assert [k for k, _, _ in loader_state.generators(None, ds)] == found
        held_rngs.BUDGET -= 1
        assert [k for k, _, _ in loader_state.generators(None, ds)] == []
    finally:
        held_rngs.BUDGET = old
