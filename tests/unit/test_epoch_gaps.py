"""The random states of the gaps between epochs (pyckpt/epoch_gaps.py) and rng.restore_some."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pyckpt import epoch_gaps, rng


def _raw() -> tuple:
    return random.getstate(), torch.get_rng_state(), np.random.get_state()


def test_only_the_streams_drawn_in_the_gap_are_kept_as_they_were_at_the_epochs_end():
    end = _raw()
    expected = np.random.rand(3)  # the gap's code draws from NumPy only
    state = epoch_gaps.drawn_between(end, _raw())
    assert set(state) == {"numpy"}
    assert epoch_gaps.drawn_between(end, end) is None
    rng.restore_some(state)
    assert (np.random.rand(3) == expected).all()


def test_a_gap_that_takes_only_numpys_cached_normal_is_seen_drawing():
    # NumPy's legacy normal() makes two values per two words and caches the second: the next normal()
    # takes it without moving the position or the key words, only has_gauss changes.
    np.random.seed(3)
    np.random.normal()
    end = _raw()
    assert end[2][3] == 1
    expected = np.random.normal()  # the gap's code: the cached value
    state = epoch_gaps.drawn_between(end, _raw())
    assert state is not None and set(state) == {"numpy"}
    np.random.seed(4)
    rng.restore_some(state)
    assert np.random.normal() == expected


def test_restore_some_leaves_the_other_streams_alone():
    end = _raw()
    py_next, np_next = random.random(), np.random.rand()
    torch.rand(1)
    state = epoch_gaps.drawn_between(end, _raw())
    assert set(state) == {"python", "torch", "numpy"}
    random.seed(5)
    before_np = np.random.get_state()
    rng.restore_some({"python": state["python"]})
    assert random.random() == py_next
    after_np = np.random.get_state()
    assert (before_np[1] == after_np[1]).all() and before_np[2] == after_np[2]  # NumPy's not touched
    rng.restore_some({"numpy": state["numpy"]})
    assert np.random.rand() == np_next


def test_gaps_beyond_the_kept_number_are_dropped_and_the_ones_that_drew_counted(monkeypatch):
    monkeypatch.setattr(epoch_gaps, "KEPT", 3)
    gaps = epoch_gaps.Gaps()
    for k in range(5):  # gaps 0..4; gap 1 drew nothing, gap 2 ended by break, gap 4 drew from all three
        end = _raw()
        if k != 1:
            random.random()
        if k == 4:
            torch.rand(1)
            np.random.rand()
        gaps.close(None if k == 2 else end, _raw())
    assert gaps.first == 2 and gaps.lost == 1 and len(gaps.states) == 3
    assert gaps.state_of(0) == (None, True)  # gap 0 drew and is gone
    assert gaps.state_of(1) == (None, True)
    assert gaps.state_of(2) == (None, False) and set(gaps.state_of(3)[0]) == {"python"}
    assert gaps.state_of(9) == (None, False)
    stored = gaps.stored()
    assert stored["drew"] == ["", "p", "ptn"] and stored["python"]["words"].shape == (2, 625)
    assert stored["torch"].shape[0] == 1 and stored["numpy"]["keys"].shape == (1, 624)
    again = epoch_gaps.Gaps.parse(tree_round_trip(stored))
    assert (again.first, again.lost) == (2, 1)
    draw = {"python": random.random, "torch": lambda: torch.rand(1).item(), "numpy": np.random.rand}
    for gap in (3, 4):  # what the checkpoint keeps puts the same streams back
        mine, theirs = gaps.state_of(gap)[0], again.state_of(gap)[0]
        assert mine.keys() == theirs.keys()
        rng.restore_some(mine)
        expected = {k: draw[k]() for k in mine}
        rng.restore_some(theirs)
        assert {k: draw[k]() for k in theirs} == expected


def test_a_torch_state_from_any_row_of_the_stored_table_is_put_back():
    # Rows after the first are views into the table (a storage offset): torch.set_rng_state read such a view
    # from the wrong place and crashed the process (a resume whose per-epoch code drew from torch in two gaps).
    gaps, expected = epoch_gaps.Gaps(), []
    for _ in range(3):
        end = _raw()
        torch.rand(1)
        gaps.close(end, _raw())
        rng.restore_some(gaps.state_of(len(gaps.states) - 1)[0])
        expected.append(torch.rand(4))
    again = epoch_gaps.Gaps.parse(tree_round_trip(gaps.stored()))
    assert again.stored()["torch"].shape[0] == 3
    for gap in (2, 1, 0):
        rng.restore_some(again.state_of(gap)[0])
        assert torch.equal(torch.rand(4), expected[gap])


def tree_round_trip(value):
    from pyckpt import tree

    enc, tensors, _ = tree.flatten({"v": value})
    return tree.unflatten(enc, lambda i, into, path: tensors[i].clone())["v"]


@pytest.mark.parametrize("bad", [
    None, [], {"first": -1, "lost": 0, "drew": []}, {"first": 0, "lost": True, "drew": []},
    {"first": 0, "lost": 0, "drew": ["x"]}, {"first": 0, "lost": 0, "drew": "p"},
    {"first": 0, "lost": 0, "drew": ["p"]},  # a row missing
    {"first": 0, "lost": 0, "drew": ["t"], "torch": torch.zeros(2, 5056, dtype=torch.uint8)},  # one too many
    {"first": 0, "lost": 0, "drew": ["t"], "torch": torch.zeros(1, 5056)},  # not bytes
])
def test_a_malformed_saved_form_is_not_used(bad):
    assert epoch_gaps.Gaps.parse(bad) is None
