"""The state-tree encoder's C++ common cases (csrc/state_tree.cpp) against the Python encoder.

``tree.flatten`` encodes exact dicts, OrderedDicts, lists, scalars and plain tensors in C++ and hands
everything else back to the Python encoder; these tests hold it to ``tree.flatten_python`` on the
same states: the same tree (types and key order included), the same tensors in the same order, the
same key paths, the same errors with the same messages."""
import enum
import math
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch

from pyckpt import tree
from pyckpt.errors import UnsupportedStateError


def test_this_build_encodes_natively(monkeypatch):
    """Else every comparison below would compare the Python encoder with itself."""
    native, calls = tree._native_encode, []
    assert native is not None
    monkeypatch.setattr(tree, "_native_encode", lambda *a: calls.append(a) or native(*a))
    assert tree.flatten({"w": torch.ones(1)}).paths == ["w"] and len(calls) == 1


def _same(a, b, where="") -> None:
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, (where, a, b)


def _agree(state) -> tree.Flat:
    try:
        want = tree.flatten_python(state)
    except Exception as e:  # noqa: BLE001 (the native encoder must raise the same)
        with pytest.raises(type(e)) as got:
            tree.flatten(state)
        assert str(got.value) == str(e)
        assert getattr(got.value, "key", None) == getattr(e, "key", None)
        return None
    got = tree.flatten(state)
    _same(got.tree, want.tree)
    assert got.paths == want.paths
    assert len(got.tensors) == len(want.tensors) and all(a is b for a, b in zip(got.tensors, want.tensors))
    return got


class Colour(enum.IntEnum):
    RED = 1


class Name(str):
    pass


class Sub(dict):
    pass


class Tagged(torch.Tensor):
    pass


class Opaque:
    pass


def _leaf(rng):
    return rng.choice([
        lambda: rng.randint(-5, 2**70), lambda: rng.random() < 0.5, lambda: None, lambda: "s", lambda: Name("n"),
        lambda: rng.choice([1.5, -0.0, math.inf, -math.inf, math.nan]), lambda: np.float64(2.5),
        lambda: torch.zeros(rng.randint(0, 3)), lambda: torch.nn.Parameter(torch.ones(2)),
        lambda: torch.ones(1).as_subclass(Tagged), lambda: Colour.RED, lambda: torch.Size([2, 3]),
        lambda: torch.float16, lambda: torch.device("cpu"), lambda: b"\x00\x01",
    ])()


def _state(rng, depth=0):
    if depth > 5 or rng.random() < 0.25:
        return _leaf(rng)
    n = rng.randint(0, 5)
    kind = rng.randrange(9)
    if kind == 0:
        return {f"k{i}": _state(rng, depth + 1) for i in range(n)}
    if kind == 1:  # an optimizer's state: int keys to dicts of str keys
        return {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2), "lr": 0.1, "k": _state(rng, depth + 2)}
                for i in range(n)}
    if kind == 2:  # a module's state_dict, its order changed after insertion
        od = OrderedDict((f"layer.{i}.weight", _state(rng, depth + 1)) for i in range(n))
        if n > 1:
            od.move_to_end(next(iter(od)))
        od._metadata = {"": {"version": 1}}
        return od
    if kind == 3:  # keys the encoder tags: the tag key itself, None, bool, float, tuple, an int subclass
        keys = list(range(n)) + [rng.choice([tree.TAG, None, True, 1.5, (1, "a"), Colour.RED, "x"])]
        return {k: _state(rng, depth + 1) for k in keys}
    if kind == 4:
        return Sub({f"s{i}": _state(rng, depth + 1) for i in range(n)})
    if kind == 5:
        return tuple(_state(rng, depth + 1) for _ in range(n))
    if kind == 6:
        return [rng.choice([1, "a", None, True]) for _ in range(n)]  # an optimizer's parameter ids
    if kind == 7:
        return {"nested": {"deeper": {f"t{i}": torch.ones(1) for i in range(n)}}, 3: _state(rng, depth + 1)}
    return [_state(rng, depth + 1) for _ in range(n)]


def test_random_states_encode_alike():
    rng = random.Random(11)
    encoded = 0
    for _ in range(1500):
        if _agree({"root": _state(rng), "model": OrderedDict(w=torch.ones(2))}) is not None:
            encoded += 1
    assert encoded > 1000  # most states are encodable: the comparison is not only of errors


@pytest.mark.parametrize("bad", [Opaque(), {"a": [1, Opaque()]}, {0: {"x": Opaque()}}, {Opaque(): 1},
                                 OrderedDict(a={"b": [{"c": Opaque()}]}), [np.array(["x"])],
                                 {"f": np.array([object()])}])
def test_unsupported_values_raise_the_same_error(bad):
    with pytest.raises(UnsupportedStateError):
        tree.flatten_python(bad)
    _agree(bad)


def test_numpy_values_encode_alike():
    """NumPy arrays and scalars (and a scalar as a dict key) take the Python encoder from the native
    walk; each flatten wraps the array in a new tensor, so the tensors are compared by value."""
    state = {"a": [np.int64(3), np.arange(3.0)], 0: {"f": np.float32(1.0)}, np.int16(2): np.ones((2, 2), "u2")}
    want, got = tree.flatten_python(state), tree.flatten(state)
    _same(got.tree, want.tree)
    assert got.paths == want.paths == ["a/0", "a/1", "0/f", "2", "2"]  # the key's entry, then its value's
    assert len(got.tensors) == 5 and all(torch.equal(a, b) for a, b in zip(got.tensors, want.tensors))


@pytest.mark.parametrize("container", ["list", "str", "int", "od", "opt"])
def test_the_depth_limit_is_the_same(container):
    """Around the limit (below, at, past it) for each container the C++ side walks itself; "opt" nests
    two levels at a time, an optimizer's int-keyed state of str-keyed dicts."""
    wrap = {"list": lambda v: [v], "str": lambda v: {"k": v}, "int": lambda v: {0: v},
            "od": lambda v: OrderedDict(k=v), "opt": lambda v: {0: {"state": v}}}[container]
    limit = tree.MAX_DEPTH // 2 if container == "opt" else tree.MAX_DEPTH
    errors = 0
    for levels in range(limit - 2, limit + 3):
        for leaf in (torch.ones(1), 7, [1, 2], {"a": torch.ones(1)}, {}, []):
            v = leaf
            for _ in range(levels):
                v = wrap(v)
            errors += _agree(v) is None
    assert errors > 0  # the limit was passed


def test_a_training_state_encodes_alike():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    got = _agree({"model": model.state_dict(keep_vars=True), "opt": opt.state_dict(), "step": 1})
    assert len(got.tensors) == len(model.state_dict()) + 3 * len(list(model.parameters()))
