"""tree.flatten / unflatten: the JSON encoding of non-tensor state."""
import json
import math
from collections import OrderedDict

import pytest
import torch

from pyckpt import tree
from pyckpt.errors import CorruptCheckpointError, UnsupportedStateError


def roundtrip(state):
    tr, tensors, paths = tree.flatten(state)
    text = json.dumps(tr, allow_nan=False)  # must be strict JSON
    return tree.unflatten(json.loads(text), lambda i, d, p: tensors[i]), paths


def test_plain_json_values_roundtrip_unchanged():
    state = {"a": 1, "b": [1.5, "x", None, True], "c": {"d": {}}, "e": [], "big": 2**70}
    out, _ = roundtrip(state)
    assert out == state
    assert type(out["big"]) is int


def test_special_values_roundtrip_with_types():
    state = {
        "t": (1, (2, "z")), "ints": {0: "a", 3: {"x": 1}}, "mixed": {1: 2, "s": 3, None: 4, (1, 2): 5},
        "fl": [math.inf, -math.inf], "dt": torch.bfloat16, "size": torch.Size([2, 3]),
        "dev": torch.device("cuda:1"), "raw": b"\x00\xffhello",
    }
    out, _ = roundtrip(state)
    assert out["t"] == (1, (2, "z")) and type(out["t"][1]) is tuple
    assert out["ints"] == {0: "a", 3: {"x": 1}} and all(type(k) is int for k in out["ints"])
    assert out["mixed"] == {1: 2, "s": 3, None: 4, (1, 2): 5}
    assert out["fl"] == [math.inf, -math.inf]
    assert out["dt"] is torch.bfloat16
    assert type(out["size"]) is torch.Size and out["size"] == torch.Size([2, 3])
    assert out["dev"] == torch.device("cuda", 1)
    assert out["raw"] == b"\x00\xffhello"


def test_nan_roundtrips():
    out, _ = roundtrip({"x": float("nan")})
    assert math.isnan(out["x"])


def test_user_dict_with_the_tag_key_is_not_mistaken_for_a_tag():
    state = {"__pyckpt__": "tensor", "id": 0}
    out, _ = roundtrip(state)
    assert out == state


def test_tensors_become_ids_and_paths_are_reported():
    a, b = torch.zeros(2), torch.ones(3)
    tr, tensors, paths = tree.flatten({"m": {"w": a}, "o": [{"s": b}]})
    assert tr == {"m": {"w": {"__pyckpt__": "tensor", "id": 0}}, "o": [{"s": {"__pyckpt__": "tensor", "id": 1}}]}
    assert tensors[0] is a and tensors[1] is b
    assert paths == ["m/w", "o/0/s"]


@pytest.mark.parametrize("bad, key", [
    ({"optim": {"param_groups": [{"lr": 1, "foo": object()}]}}, "optim/param_groups/0/foo"),
    ({"s": {1, 2}}, "s"),
    ({"f": lambda: 0}, "f"),
    ([1, (2, 3, 1j)], "1/2"),
])
def test_unsupported_values_name_their_key(bad, key):
    with pytest.raises(UnsupportedStateError) as ei:
        tree.flatten(bad)
    assert ei.value.key == key
    assert key in str(ei.value)


def test_into_is_walked_in_parallel():
    x, y = torch.zeros(1), torch.zeros(1)
    tr, tensors, _ = tree.flatten({"a": [torch.ones(1), {"b": torch.ones(1)}], "t": (torch.ones(1),)})
    seen = {}
    tree.unflatten(tr, lambda i, d, p: seen.setdefault(p, d), into={"a": [x, {"b": y}]})
    assert seen["a/0"] is x and seen["a/1/b"] is y and seen["t/0"] is None


def test_into_reaches_each_tensor_through_every_kind_of_container():
    """Plain and ordered dicts, dict subclasses, lists, tuples and int-keyed (tagged) dicts all hand
    ``make_tensor`` the target at the same key path; scalars beside them decode unchanged."""
    class Sub(dict):
        pass

    state = {"od": {"x": torch.ones(1), "lr": 0.1}, "lst": [torch.ones(1), 3, None], "tup": (torch.ones(1), "s"),
             "sub": {"y": torch.ones(1), "ok": True}, "opt": {0: {"m": torch.ones(1)}, 1: 2.5}}
    tr, _, paths = tree.flatten(state)
    dst = [torch.zeros(1) for _ in paths]
    into = {"od": OrderedDict(x=dst[0]), "lst": [dst[1]], "tup": (dst[2],), "sub": Sub(y=dst[3]),
            "opt": {0: {"m": dst[4]}}}
    seen = {}
    out = tree.unflatten(json.loads(json.dumps(tr)), lambda i, d, p: seen.setdefault(i, (d, p))[0], into)
    assert [seen[i][1] for i in range(len(paths))] == paths
    assert all(seen[i][0] is dst[i] for i in range(len(paths)))
    assert out["od"]["lr"] == 0.1 and out["lst"][1:] == [3, None] and out["tup"][1] == "s"
    assert out["sub"]["ok"] is True and out["opt"][1] == 2.5 and out["opt"][0]["m"] is dst[4]


@pytest.mark.parametrize("bad", [
    {"__pyckpt__": "pickle", "data": "x"},
    {"__pyckpt__": "float", "value": "1e400x"},
    {"__pyckpt__": "dtype", "code": "NOPE"},
    {"__pyckpt__": "bytes", "base64": "!!"},
])
def test_malformed_tags_are_corrupt_checkpoint_errors(bad):
    with pytest.raises(CorruptCheckpointError):
        tree.unflatten({"k": bad}, lambda i, d, p: None, where="part.json")


@pytest.mark.parametrize("node, tensor", [
    ({"__pyckpt__": "ndarray", "id": "0"}, torch.ones(2)),
    ({"__pyckpt__": "ndarray", "id": 0, "scalar": True}, torch.ones(2)),  # a scalar of two elements
    ({"__pyckpt__": "ndarray", "id": 0}, torch.ones(2, dtype=torch.bfloat16)),  # NumPy has no bfloat16
])
def test_malformed_numpy_nodes_are_corrupt_checkpoint_errors(node, tensor):
    with pytest.raises(CorruptCheckpointError, match="ndarray"):
        tree.unflatten({"k": node}, lambda i, d, p: tensor, where="part.json")


def test_a_numpy_node_asks_make_tensor_for_a_value_not_a_target():
    """``into=`` never supplies a target for an array (the reader then does not count it as a saved
    tensor without a target), even where ``into`` holds a tensor at its path."""
    seen = []

    def make(i, d, p):
        seen.append(d)
        return torch.arange(3)

    out = tree.unflatten({"a": {"__pyckpt__": "ndarray", "id": 0}}, make, into={"a": torch.zeros(3)})
    assert seen == [tree.ARRAY] and out["a"].tolist() == [0, 1, 2] and type(out["a"]).__module__ == "numpy"


def test_absurdly_deep_trees_are_refused_both_ways():
    deep = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(UnsupportedStateError, match="nested deeper"):
        tree.flatten(deep)
    bad = {}
    for _ in range(5000):
        bad = {"k": bad}
    with pytest.raises(CorruptCheckpointError, match="too deeply"):
        tree.unflatten(bad, lambda i, d, p: None, where="p.json")


# -- the encoder's inline paths against the rules of docs/FORMAT.md "State tree" ------------------
def _reference(v, path="", depth=0, out=None):
    """The encoding rules written out plainly, one call per node (what flatten's inline paths for
    plain scalars and tensors must agree with, including the depth limit and every key path)."""
    out = out if out is not None else ([], [])
    if depth > tree.MAX_DEPTH:
        raise UnsupportedStateError("deep", key=path)
    sub = (lambda p, k: f"{p}/{k}" if p else str(k))
    if v is None or isinstance(v, (bool, str)):
        return v, out
    if isinstance(v, int):
        return int(v), out
    if isinstance(v, float):
        return (v if math.isfinite(v) else {tree.TAG: "float", "value": repr(v)}), out
    if isinstance(v, torch.Tensor):
        out[0].append(v)
        out[1].append(path)
        return {tree.TAG: "tensor", "id": len(out[0]) - 1}, out
    if isinstance(v, dict):
        if all(type(k) is str for k in v) and tree.TAG not in v:
            return {k: _reference(x, sub(path, k), depth + 1, out)[0] for k, x in v.items()}, out
        return {tree.TAG: "dict", "items": [[_reference(k, sub(path, k), depth + 1, out)[0],
                                             _reference(x, sub(path, k), depth + 1, out)[0]]
                                            for k, x in v.items()]}, out
    if isinstance(v, list):
        return [_reference(x, sub(path, i), depth + 1, out)[0] for i, x in enumerate(v)], out
    if isinstance(v, torch.Size):
        return {tree.TAG: "size", "dims": list(v)}, out
    if type(v) is tuple:
        return {tree.TAG: "tuple", "items": [_reference(x, sub(path, i), depth + 1, out)[0]
                                             for i, x in enumerate(v)]}, out
    raise AssertionError(f"test generator made {type(v)}")


def _random_state(rng, depth=0):
    import enum

    class Colour(enum.IntEnum):
        RED = 1

    class Name(str):
        pass

    leaves = [lambda: rng.randint(-5, 2**65), lambda: rng.random() < 0.5, lambda: None,
              lambda: Name("n") if rng.random() < 0.2 else "s", lambda: rng.choice([1.5, math.inf, -math.inf]),
              lambda: torch.zeros(rng.randint(0, 3)), lambda: torch.nn.Parameter(torch.ones(2)),
              lambda: Colour.RED, lambda: torch.Size([2, rng.randint(1, 4)])]
    if depth > 4 or rng.random() < 0.3:
        return rng.choice(leaves)()
    kind = rng.randrange(5)
    n = rng.randint(0, 5)
    if kind == 0:
        return {f"k{i}": _random_state(rng, depth + 1) for i in range(n)}
    if kind == 1:  # int keys (an optimizer's state), an IntEnum key, or the tag key itself
        keys = [i for i in range(n)] + rng.choice([[], [Colour.RED], [tree.TAG], [(1, "a")]])
        return {k: _random_state(rng, depth + 1) for k in keys}
    if kind == 2:
        return tuple(_random_state(rng, depth + 1) for _ in range(n))
    return [_random_state(rng, depth + 1) for _ in range(n)]


def test_flatten_agrees_with_the_plain_rules_on_random_states():
    import random

    rng = random.Random(7)
    for _ in range(400):
        state = {"root": _random_state(rng), "model": {"w": torch.ones(2), "b": [torch.zeros(1), 3]}}
        tr, tensors, paths = tree.flatten(state)
        want, (ts, ps) = _reference(state)
        assert json.dumps(tr) == json.dumps(want)
        assert paths == ps and len(tensors) == len(ts) and all(a is b for a, b in zip(tensors, ts))


@pytest.mark.parametrize("leaf", [3, "s", None, True, torch.ones(1)])
def test_depth_limit_holds_for_every_kind_of_leaf(leaf):
    """A leaf exactly at the limit is kept; one level deeper is refused, whatever the leaf is."""
    def nest(levels, container):
        v = leaf
        for _ in range(levels):
            v = container(v)
        return v

    for container in (lambda v: [v], lambda v: {"k": v}, lambda v: {0: v}):
        kept = tree.flatten(nest(tree.MAX_DEPTH, container))[1]
        assert len(kept) == (1 if isinstance(leaf, torch.Tensor) else 0)
        with pytest.raises(UnsupportedStateError, match="deeper"):
            tree.flatten(nest(tree.MAX_DEPTH + 1, container))


@pytest.mark.parametrize("pattern", ["ls", "si", "is", "isl", "i"])
def test_depth_limit_and_key_paths_hold_when_containers_alternate(pattern):
    """Lists, str-keyed and int-keyed dicts nested in turn (an optimizer's state is int-keyed dicts of
    str-keyed dicts; its param groups lists of ints): the encoding and the refusal one level past the
    limit, with the key path it names, are the plain rules' at every mix, for leaves that are
    themselves containers of scalars too."""
    wrap = {"l": lambda v: [v], "s": lambda v: {"k": v}, "i": lambda v: {0: v}}

    def nest(levels, leaf):
        v = leaf
        for n in range(levels):
            v = wrap[pattern[n % len(pattern)]](v)
        return v

    for leaf, extra in ((torch.ones(1), 0), (7, 0), ([1, 2, None], 1), ({"a": 1, "b": torch.ones(1)}, 1)):
        levels = tree.MAX_DEPTH - extra
        tr, ts, paths = tree.flatten(nest(levels, leaf))
        want, (wts, wps) = _reference(nest(levels, leaf))
        assert json.dumps(tr) == json.dumps(want) and paths == wps and len(ts) == len(wts)
        with pytest.raises(UnsupportedStateError, match="deeper") as got:
            tree.flatten(nest(levels + 1, leaf))
        with pytest.raises(UnsupportedStateError) as ref:
            _reference(nest(levels + 1, leaf))
        assert got.value.key == ref.value.key


def test_a_container_inside_itself_is_refused_in_one_readable_line():
    """A dict holding itself nests without end: the error named all 200 levels of its key path
    (1,249 characters for this one), and not what that usually means. The line stays short; the
    error's ``key`` keeps the whole path."""
    loop: dict = {}
    loop["state"] = loop
    with pytest.raises(UnsupportedStateError) as e:
        tree.flatten({"model": loop})
    msg = str(e.value)
    assert len(msg) < 300, msg
    assert "'model/state/state" in msg and "itself" in msg, msg
    assert e.value.key.startswith("model/state/state") and e.value.key.count("/") >= 200
