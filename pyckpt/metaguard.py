"""A one-call check that a list of tensors still has the metadata it had: Python type, dtype, device,
shape, strides, ``requires_grad`` and dispatch keys (layout, lazy negation and conjugation, inference
tensors).

A training job snapshots the same thousands of tensors at every checkpoint, and reading six
attributes of each from Python costs milliseconds at the snapshot point. PyTorch's own tensor guards
(the ones ``torch.compile`` checks before running compiled code) compare exactly these in one C++
loop. They are private API, so ``make`` first checks, once per process, that they refuse every change
pyckpt relies on them to refuse, and returns None when they are missing or behave otherwise: callers
then read the attributes themselves. A refusal is never trusted either way: a caller whose guard
refuses tensors checks them the long way (the guard also refuses, for instance, a list naming one
tensor object twice).
"""
from __future__ import annotations

from typing import Any

import torch

_USABLE: bool | None = None  # the self-test's verdict, once per process


class MetaGuard:
    """The metadata of a list of tensors, as they were when it was made."""

    def __init__(self, guard: Any) -> None:
        self._guard = guard

    def same(self, tensors: list[torch.Tensor]) -> bool:
        """Whether ``tensors`` (as many, in the same order) have the recorded metadata. Storage
        offsets and addresses are not compared: callers compare those."""
        try:
            return bool(self._guard.check(*tensors))
        except Exception:  # noqa: BLE001 - another length, a non-tensor: the caller's long way decides
            return False


def _raw(tensors: list[torch.Tensor]) -> Any:
    from torch._C._dynamo.guards import TensorGuards

    return TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)


def _usable() -> bool:
    """Whether this torch's tensor guards accept the same metadata and refuse each change below."""
    global _USABLE
    if _USABLE is None:
        try:
            x = torch.arange(12.0).reshape(3, 4)
            g = _raw([x])
            changed = [x.t(), x.reshape(12), x.double(), x.clone().requires_grad_(), x._neg_view(), x.to_sparse(),
                       torch.nn.Parameter(x.clone(), requires_grad=False), x[:, :2], x.unsqueeze(0)]
            z = torch.zeros(2, dtype=torch.complex64)  # a conjugate view's bytes are materialized by the planner
            _USABLE = bool(g.check(x) and g.check(x.detach()) and g.check(torch.zeros(3, 4))
                           and not any(g.check(c) for c in changed) and not _raw([z]).check(z.conj()))
        except Exception:  # noqa: BLE001 - absent or another signature in this torch: read attributes instead
            _USABLE = False
    return _USABLE


def make(tensors: list[torch.Tensor]) -> MetaGuard | None:
    """A guard recording ``tensors``' metadata now, or None where this torch has no usable one."""
    if not _usable():
        return None
    try:
        return MetaGuard(_raw(tensors))
    except Exception:  # noqa: BLE001 - a tensor it cannot record: no guard, attributes are read instead
        return None
