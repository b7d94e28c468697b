"""What an index sampler draws from the global generators in the middle of an epoch (pyckpt/sampler_draws.py)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pyckpt import rng, sampler_draws, tree


def _pull(draws, n, draw):
    then = sampler_draws.before(draws)
    draw()
    sampler_draws.drawn(draws, n, then)


def test_a_torch_draw_is_kept_with_its_state_before_the_pull_and_goes_through_a_checkpoint():
    d = sampler_draws.Draws()
    _pull(d, 1, lambda: None)  # a pull that draws nothing keeps nothing
    state = torch.get_rng_state()
    expected = torch.rand(2)
    torch.set_rng_state(state)
    _pull(d, 2, lambda: torch.rand(2))
    assert d.at == [2] and set(d.states[0]) == {"torch"} and d.lost == 0
    enc, tensors, _ = tree.flatten({"v": d.stored()})  # as a checkpoint holds it
    again = sampler_draws.Draws.parse(tree.unflatten(enc, lambda i, into, path: tensors[i].clone())["v"])
    assert again.at == [2] and again.lost == 0 and not again.every
    # A NumPy draw inside the sampler's length: it draws per batch, from NumPy. What was learnt of the sampler
    # goes on after a resume.
    then = sampler_draws.before(d)
    np.random.rand()
    sampler_draws.drawn(d, 3, then, length=10)
    enc, tensors, _ = tree.flatten({"v": d.stored()})
    learnt = sampler_draws.Draws.parse(tree.unflatten(enc, lambda i, into, path: tensors[i].clone())["v"])
    assert (learnt.every, learnt.python, learnt.numpy, learnt.lost) == (True, False, True, 0) and learnt.at == [2, 3]
    rng.restore_some(again.replay()[2])
    assert torch.equal(torch.rand(2), expected)


def test_a_numpy_draw_is_kept_from_the_first_even_one_that_takes_only_the_cached_normal():
    # NumPy's whole state is read before each watched pull (pyckpt/numpy_state.py reads it in place).
    d = sampler_draws.Draws()
    np.random.seed(8)
    state = np.random.get_state()
    expected = np.random.rand()
    np.random.set_state(state)
    _pull(d, 3, np.random.rand)
    assert d.at == [3] and d.lost == 0 and d.numpy and set(d.states[0]) == {"numpy"}
    np.random.normal()  # the second value of the pair is cached
    state = np.random.get_state()
    cached = np.random.normal()
    np.random.set_state(state)
    _pull(d, 4, np.random.normal)  # takes the cached value: the position and key words do not move
    assert d.at == [3, 4] and d.lost == 0
    rng.restore_some(d.states[0])
    assert np.random.rand() == expected
    rng.restore_some(d.states[1])
    assert np.random.normal() == cached


def test_a_python_draw_is_kept_from_the_first_even_one_that_takes_only_the_cached_gauss():
    # Python's generator is read in place before each watched pull (pyckpt/python_state.py), as NumPy's is.
    d = sampler_draws.Draws()
    random.seed(8)
    state = random.getstate()
    expected = random.random()
    random.setstate(state)
    _pull(d, 3, random.random)
    assert d.at == [3] and d.lost == 0 and d.python and set(d.states[0]) == {"python"}
    random.gauss(0.0, 1.0)  # the second value of the pair is cached in gauss_next
    state = random.getstate()
    cached = random.gauss(0.0, 1.0)
    random.setstate(state)
    _pull(d, 4, lambda: random.gauss(0.0, 1.0))  # takes the cached value: the words do not move
    assert d.at == [3, 4] and d.lost == 0
    for kept in (d, sampler_draws.Draws(d)):  # what was learnt goes on to the next epoch's iterator
        assert kept.python
    rng.restore_some(d.states[0])
    assert random.random() == expected
    rng.restore_some(d.states[1])
    assert random.gauss(0.0, 1.0) == cached


def test_only_the_last_kept_number_of_draws_is_kept(monkeypatch):
    monkeypatch.setattr(sampler_draws, "KEPT", 2)
    d = sampler_draws.Draws()
    for n in (1, 2, 3):
        _pull(d, n, lambda: torch.rand(1))
    assert d.at == [2, 3] and d.lost == 1


@pytest.mark.parametrize("bad", [
    None, {}, {"at": [1], "lost": 0, "drew": []}, {"at": [0], "lost": 0, "drew": ["t"]},
    {"at": [1], "lost": -1, "drew": ["t"], "torch": torch.zeros(1, 5056, dtype=torch.uint8)},
    {"at": [1], "lost": 0, "drew": [""]},  # a draw with no state
    {"at": [1], "lost": 0, "drew": ["t"], "torch": torch.zeros(2, 5056, dtype=torch.uint8)},
])
def test_a_malformed_saved_form_is_not_used(bad):
    assert sampler_draws.Draws.parse(bad) is None
