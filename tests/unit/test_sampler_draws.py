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


@pytest.mark.parametrize("stream", ["python"])
def test_a_python_draw_is_seen_first_and_read_in_full_from_then_on(stream):
    # Its position is read in place before every pull; its whole state (slower to read) only once the
    # sampler drew from it, from then on, and in the epochs after.
    draw, get, put = {"python": (random.random, random.getstate, random.setstate)}[stream]
    d = sampler_draws.Draws()
    _pull(d, 3, draw)
    assert d.at == [] and d.lost == 1 and getattr(d, stream)
    for d in (d, sampler_draws.Draws(d)):  # the next epoch's iterator knows it from the start
        state = get()
        expected = draw()
        put(state)
        _pull(d, 4, draw)
        assert d.at[-1] == 4 and set(d.states[-1]) == {stream}
        rng.restore_some(d.states[-1])
        assert draw() == expected


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
