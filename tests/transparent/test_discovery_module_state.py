"""discovery.module_state: a module's state_dict() built without torch's recursion where that is
exact, and torch's own calls wherever a module customizes it."""
from __future__ import annotations

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from pyckpt.discovery import module_state


class _Extra(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2, bias=False)
        self.register_buffer("scratch", torch.ones(1), persistent=False)
        self.register_buffer("kept", torch.full((2,), 3.0))
        self.register_parameter("unused", None)

    def get_extra_state(self):
        return {"calls": 7}

    def set_extra_state(self, state):
        pass


class _OwnStateDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        out[prefix + "added"] = torch.tensor(5.0)
        return out


class _OwnSave(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "w_scaled"] = self.w.detach() * 2


class _Square(nn.Module):
    def forward(self, x):
        return x * x


def _models() -> dict[str, nn.Module]:
    shared = nn.Linear(3, 3)
    hooked = nn.Linear(2, 2)
    hooked.register_state_dict_post_hook(lambda m, sd, prefix, local: sd.__setitem__(prefix + "post", torch.ones(1)))
    pre = nn.Linear(2, 2)
    seen = []
    pre.register_state_dict_pre_hook(lambda m, prefix, keep_vars: seen.append(prefix))
    param = nn.Linear(3, 3)
    parametrize.register_parametrization(param, "weight", _Square())
    instance = nn.Linear(2, 2)
    original = instance.state_dict
    instance.state_dict = lambda *a, **k: {**original(*a, **k), "instance": torch.zeros(1)}
    tree = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), _Extra(), nn.Sequential(shared, nn.ReLU(), shared),
                         _OwnStateDict(), _OwnSave(), hooked, pre, param, instance, nn.Identity())
    tree.add_module("absent", None)
    return {"plain": nn.Sequential(*[nn.Linear(3, 3) for _ in range(5)]), "mixed": tree,
            "root customized": _OwnStateDict(), "compiled wrapper": torch.compile(nn.Linear(2, 2))}


def _same(a: dict, b: dict, name: str) -> None:
    assert list(a) == list(b), name
    assert list(a._metadata.items()) == list(b._metadata.items()), name
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert type(x) is type(y) and x.dtype == y.dtype and x.shape == y.shape, (name, k)
            assert x.requires_grad == y.requires_grad and x.grad_fn is None and y.grad_fn is None, (name, k)
            assert torch.equal(x, y), (name, k)
            if x.data_ptr() and not k.endswith(("added", "w_scaled", "post")):  # made anew by each call
                assert x.data_ptr() == y.data_ptr(), (name, k)  # the live memory, detached: not a copy
        else:
            assert x == y, (name, k)


def test_module_state_equals_torchs_state_dict_key_for_key():
    for name, m in _models().items():
        _same(m.state_dict(), module_state(m), name)


def test_module_state_calls_the_hooks_and_overrides_torchs_would():
    m = _models()["mixed"]
    sd = module_state(m)
    assert "2._extra_state" in sd and sd["2._extra_state"] == {"calls": 7}
    assert "2.scratch" not in sd and "2.kept" in sd and "2.unused" not in sd  # non-persistent, None
    assert "4.added" in sd and "5.w_scaled" in sd and "5.w" not in sd
    assert "6.post" in sd and "9.instance" not in sd  # a child's instance attribute is not called by torch either
    assert "8.parametrizations.weight.original" in sd
    assert sd["3.0.weight"].data_ptr() == sd["3.2.weight"].data_ptr()  # a shared module under both names
    assert not sd["0.weight"].requires_grad and sd["0.weight"].data_ptr() == m[0].weight.data_ptr()


def test_a_change_after_one_call_is_seen_by_the_next():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert "1.late" not in module_state(m)
    m[1].register_buffer("late", torch.zeros(1))
    m[0].register_state_dict_post_hook(lambda mod, sd, prefix, local: sd.__setitem__(prefix + "hooked", 1))
    sd = module_state(m)
    assert "1.late" in sd and sd["0.hooked"] == 1
    _same(m.state_dict(), sd, "after changes")


def test_parameters_as_is_gives_the_parameter_objects_and_otherwise_torchs_tensors():
    """The transparent layer's variant: each plain parameter of a module built by pyckpt's walk is the
    module's own object (no new tensor per parameter per snapshot); buffers, parameter subclasses and
    the subtrees of customized modules as torch gives them."""
    for name, m in _models().items():
        plain, ours = m.state_dict(), module_state(m, parameters_as_is=True)
        assert list(plain) == list(ours) and list(plain._metadata.items()) == list(ours._metadata.items()), name
        for k, v in ours.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v.detach(), plain[k]), (name, k)
                if not k.endswith(("added", "w_scaled", "post")):  # made anew by each call
                    assert v.data_ptr() == plain[k].data_ptr(), (name, k)
    plain = _models()["plain"]
    sd = module_state(plain, parameters_as_is=True)
    assert all(sd[k] is p for k, p in plain.named_parameters()) and len(sd) == 10
    m = _models()["mixed"]
    sd = module_state(m, parameters_as_is=True)
    assert sd["0.weight"] is m[0].weight and sd["1.weight"] is m[1].weight and sd["3.0.bias"] is m[3][0].bias
    detached = ["1.running_mean", "2.inner.weight", "4.w", "6.weight", "7.bias"]  # buffer; customized subtrees
    for k in detached:
        assert type(sd[k]) is torch.Tensor and not sd[k].requires_grad, k

    class _MyParam(nn.Parameter):
        pass

    sub = nn.Linear(2, 2)
    sub.weight = _MyParam(sub.weight.detach().clone())
    sd = module_state(sub, parameters_as_is=True)
    assert sd["bias"] is sub.bias and type(sd["weight"]) is torch.Tensor and not sd["weight"].requires_grad
    assert module_state(sub)["bias"] is not sub.bias  # the default detaches every one, as torch does


def test_a_graph_module_sharing_another_roots_parameters_is_not_a_root_but_a_traced_model_is():
    # Dynamo's graph of a compiled opt.step() holds the optimizer's parameters as its own: it was saved as a
    # second model, which a relaunch restoring before its first step lacks. A model replaced by its
    # symbolic_trace owns its parameters alone and stays the root.
    from torch.fx import symbolic_trace

    from pyckpt.discovery import root_modules

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    copy = symbolic_trace(model)  # a GraphModule whose parameters are the model's own tensors
    assert {id(p) for p in copy.parameters()} == {id(p) for p in model.parameters()}
    roots, covered = root_modules([opt], [model, copy])
    assert roots == [model] and covered
    roots, covered = root_modules([opt], [copy])  # the model gone: the traced one is the model
    assert roots == [copy] and covered
