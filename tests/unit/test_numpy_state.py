"""NumPy's legacy RandomState state read in place (pyckpt/numpy_state.py) against get_state() itself."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from pyckpt import numpy_state


def _equal(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and (a[1] == b[1]).all() and tuple(a[2:]) == tuple(b[2:])


def _states(rs: np.random.RandomState):
    """The generator in several states: seeded, drawn, past a regeneration of its words, a cached normal
    (has_gauss 1) and that normal taken, a state set by hand."""
    rs.seed(11)
    yield "seeded"
    rs.rand(5)
    yield "drawn"
    rs.randint(0, 10, size=700)
    yield "past 624 words"
    rs.normal()
    yield "a normal cached"
    rs.normal()
    yield "the cached normal taken"
    key = np.arange(624, dtype=np.uint32) * 7919
    rs.set_state(("MT19937", key, 17, 1, -0.25))
    yield "set by hand"


@pytest.mark.parametrize("which", ["global", "private"])
def test_the_state_read_in_place_is_get_states_in_every_state(which):
    rs = np.random.mtrand._rand if which == "global" else np.random.RandomState(0)
    saved = rs.get_state()
    try:
        for name in _states(rs):
            fast = numpy_state.global_state(np) if which == "global" else numpy_state.get_state(rs)
            assert _equal(fast, rs.get_state()), name
        assert numpy_state._offset not in (None, False)  # read in place, not the fallback
    finally:
        rs.set_state(saved)


def test_the_key_array_returned_is_a_copy_the_caller_may_change():
    rs = np.random.RandomState(5)
    state = numpy_state.get_state(rs)
    state[1][:] = 0
    assert _equal(numpy_state.get_state(rs), np.random.RandomState(5).get_state())
    assert rs.rand() == np.random.RandomState(5).rand()


def test_a_first_read_that_differs_from_get_state_is_not_trusted(monkeypatch):
    rs = np.random.RandomState(6)
    real = numpy_state._read

    def wrong(r, address):
        memory = bytearray(real(r, address))
        memory[624 * 4] ^= 1  # the position off by one: another layout read at the same offsets
        return bytes(memory)

    assert numpy_state._check(rs, rs._bit_generator)[2] is not None
    monkeypatch.setattr(numpy_state, "_read", wrong)
    assert numpy_state._check(rs, rs._bit_generator)[2] is None
    assert _equal(numpy_state.get_state(rs), rs.get_state())  # get_state() itself


def test_where_the_offsets_are_not_found_get_state_itself_is_used(monkeypatch):
    monkeypatch.setattr(numpy_state, "_offset", None)
    monkeypatch.setattr(numpy_state, "_checked", {})
    rs = np.random.RandomState(7)
    rs.normal()
    calls = []
    monkeypatch.setattr(numpy_state, "_read", lambda *a: calls.append(a))
    assert _equal(numpy_state.get_state(rs), rs.get_state()) and calls == []


def test_a_random_state_over_another_bit_generator_gets_get_states_answer():
    rs = np.random.RandomState(np.random.PCG64(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_state() warns that legacy needs MT19937
        assert numpy_state.get_state(rs) == rs.get_state()
