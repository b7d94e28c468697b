"""pyckpt/metaguard.py: the one-call metadata check the planner's reuse relies on at every snapshot."""
from __future__ import annotations

import torch

from pyckpt import metaguard


def _base() -> torch.Tensor:
    return torch.arange(24.0).reshape(4, 6)


def test_this_torch_has_a_usable_guard_and_it_accepts_the_same_metadata_in_other_memory():
    x = _base()
    g = metaguard.make([x, torch.ones(3, dtype=torch.int64)])
    assert g is not None  # the pinned torch: the fast path is in use
    assert g.same([x, torch.ones(3, dtype=torch.int64)])
    assert g.same([x.detach().clone(), torch.zeros(3, dtype=torch.int64)])  # values and addresses are not compared


def test_every_change_the_planner_relies_on_is_refused():
    x = _base()
    p = torch.nn.Parameter(_base())
    c = torch.randn(4, 6, dtype=torch.complex64)
    with torch.inference_mode():
        inference = _base()
    cases = {
        "shape": (x, x.reshape(6, 4)),
        "stride": (x, x.t().contiguous().t()),
        "dtype": (x, x.double()),
        "requires_grad": (p, p.detach()),
        "Parameter -> Tensor, same flags": (torch.nn.Parameter(_base(), requires_grad=False), _base()),
        "negative view": (x, x._neg_view()),
        "conjugate view": (c, c.conj()),
        "sparse": (x, x.to_sparse()),
        "meta": (x, torch.empty(4, 6, device="meta")),
        "inference tensor": (x, inference),
        "dimensions": (x, x.unsqueeze(0)),
    }
    for name, (before, after) in cases.items():
        g = metaguard.make([before])
        assert g is not None and g.same([before]), name
        assert not g.same([after]), name


def test_another_count_or_a_non_tensor_is_refused_not_raised():
    x = _base()
    g = metaguard.make([x, x.clone()])
    assert not g.same([x])
    assert not g.same([x, x.clone(), x.clone()])
    assert not g.same([x, "not a tensor"])


def test_a_guard_that_does_not_refuse_changes_is_not_used(monkeypatch):
    """The self-test: a torch whose guards accepted a changed tensor gets no guard, so callers read
    the attributes themselves."""

    class Blind:
        def check(self, *tensors):
            return True

    monkeypatch.setattr(metaguard, "_USABLE", None)
    monkeypatch.setattr(metaguard, "_raw", lambda tensors: Blind())
    assert metaguard.make([_base()]) is None
    monkeypatch.setattr(metaguard, "_USABLE", None)

    def missing(tensors):
        raise ImportError("no torch._C._dynamo here")

    monkeypatch.setattr(metaguard, "_raw", missing)
    assert metaguard.make([_base()]) is None


def test_a_guard_holds_no_reference_to_its_tensors():
    """The planner keeps a guard per layout for the whole job: it must not keep the tensors it was made
    from (a replaced parameter's memory) alive."""
    import gc
    import weakref

    t = torch.randn(1 << 16)
    gone = weakref.ref(t)
    g = metaguard.make([t])
    del t
    gc.collect()
    assert gone() is None and g.same([torch.zeros(1 << 16)])
