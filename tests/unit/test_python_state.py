"""Python's random.getstate(), built again only when the generator moved (pyckpt/python_state.py)."""
from __future__ import annotations

import random

from pyckpt import python_state


def _moves():
    """Python's generator moved in every way a script moves it, one at a time."""
    yield "seeded", lambda: random.seed(21)
    yield "drawn", random.random
    yield "past 624 words", lambda: [random.getrandbits(32) for _ in range(700)]
    yield "a normal cached", lambda: random.gauss(0.0, 1.0)
    yield "the cached normal taken (only gauss_next moves)", lambda: random.gauss(0.0, 1.0)
    yield "set by hand", lambda: random.setstate((3, tuple(range(1, 624)) + (5, 9), -0.0))
    yield "the same words, gauss_next 0.0 (not -0.0)", lambda: random.setstate((3, tuple(range(1, 624)) + (5, 9), 0.0))


def test_every_move_of_the_generator_is_seen_and_an_unmoved_one_gives_the_same_tuple():
    saved = random.getstate()
    try:
        for name, move in _moves():
            before = python_state.getstate()
            move()
            now = python_state.getstate()
            assert repr(now) == repr(random.getstate()), name  # (repr: 0.0 and -0.0 are equal floats)
            assert repr(now) != repr(before), name
            assert python_state.getstate() is now, name  # not moved since: the tuple taken then
            raw = python_state.raw()
            assert repr(python_state.from_raw(raw)) == repr(now), name  # the bytes read in place, made a tuple
            assert python_state.same(raw, now) and not python_state.same(raw, before), name
        assert python_state._layout_ok
    finally:
        random.setstate(saved)


def test_where_the_layout_does_not_match_getstate_itself_is_called_each_time(monkeypatch):
    monkeypatch.setattr(python_state, "_layout_ok", None)
    monkeypatch.setattr(python_state, "_check", lambda inst: False)  # another build of Python
    a, b = python_state.getstate(), python_state.getstate()
    assert a == b == random.getstate() and a is not b
