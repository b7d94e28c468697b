"""The attributes of the script's own objects that a library holds for it, saved with the library's state.

A Hugging Face ``Trainer`` holds the script's callbacks (``TrainerCallback`` subclasses) in its callback
handler and, where the script subclasses it, is itself an object of the script's class. The loop state
keeps the script's variables and the objects of its classes they reach, but not what only the library's
frames reach: a callback counting its calls to anneal the collator's masking (``self.n += 1``), one drawing
from its own ``np.random.default_rng``, a ``Trainer`` subclass's ``self.rng`` in ``compute_loss`` when the
trainer is never assigned to a variable (``MyTrainer(...).train()``). A relaunch made them anew and the
resumed steps used their first values: a silent wrong resume. ``capture`` takes such an object's attributes
(those ``names`` lists, or all): plain values, tensors, lists, tuples and dicts of them (copied), and the
states of random generators; ``restore`` puts them back, checked first. What it cannot take (a set, a
NumPy array, an object of the script's classes that is not called, a container over ``MAX_ITEMS``
values) is returned for one warning line.
"""
from __future__ import annotations

from typing import Any

import torch

from .. import frames, rng

_PLAIN = (type(None), bool, int, float, str)
MAX_ITEMS = 4096  # values in one object's containers: a callback's log of losses, not a dataset
MAX_TENSOR_BYTES = 16 << 20  # per tensor


class _Unsupported(Exception):
    pass


def _copy(v: Any, budget: list[int], depth: int = 0) -> Any:
    """A copy of ``v`` the state tree holds (raises _Unsupported for anything else)."""
    budget[0] -= 1
    if budget[0] < 0 or depth > 16:
        raise _Unsupported("too large")
    t = type(v)
    if t in _PLAIN:
        return v
    if t is torch.Tensor and v.layout == torch.strided and v.numel() * v.element_size() <= MAX_TENSOR_BYTES:
        return v.detach().to("cpu", copy=True)
    if t is list or t is tuple:
        out = [_copy(x, budget, depth + 1) for x in v]
        return out if t is list else tuple(out)
    if t is dict and all(type(k) is str for k in v):
        return {k: _copy(x, budget, depth + 1) for k, x in v.items()}
    raise _Unsupported(t.__qualname__)


def _state_like(v: Any) -> bool:
    """Whether an attribute ``capture`` cannot take is worth a warning: data the object keeps (a set, a deque,
    a NumPy array, a container, an object of the script's classes that is not called), not a reference to
    the objects it works with, which the relaunch wires up again and pyckpt restores where they hold state
    (the model, the optimizer, the dataset, a collator or transform, the tokenizer)."""
    t = type(v)
    if isinstance(v, _RESTORED_ELSEWHERE) or callable(v):
        return False
    return (t in (list, tuple, dict, set, frozenset) or t.__module__ in ("collections", "numpy")
            or isinstance(v, torch.Tensor) or frames.is_script_class(t))


_RESTORED_ELSEWHERE = (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler,
                       torch.utils.data.DataLoader, torch.utils.data.Dataset, torch.utils.data.Sampler)


def capture(obj: Any, names: frozenset[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """``({"values": {attr: copy}, "rngs": [[attr, kind, state]]}, [attributes left out that hold data])``
    for ``obj``'s own attributes (``vars()``; only ``names`` where given)."""
    values: dict[str, Any] = {}
    rngs: list[list] = []
    left: list[str] = []
    for k, v in list(vars(obj).items()):
        if k.startswith("__") or (names is not None and k not in names):
            continue
        kind = rng.kind_of(v)
        if kind is not None:
            rngs.append([k, kind, rng.saved_state(kind, rng.raw_state(v, kind))])
            continue
        try:
            values[k] = _copy(v, [MAX_ITEMS])
        except _Unsupported:
            if _state_like(v):
                left.append(k)
    return {"values": values, "rngs": rngs}, left


def restore(obj: Any, saved: Any) -> list[str]:
    """Put ``capture``'s attributes back into ``obj``; returns what did not fit (a malformed entry, a generator
    state of another kind or one it does not take), each named, for one warning line, and then writes
    nothing. A generator the relaunch holds None in (made at first use) is made of the saved kind."""
    if not (isinstance(saved, dict) and isinstance(saved.get("values"), dict) and isinstance(saved.get("rngs"), list)):
        return ["malformed"]
    bad: list[str] = []
    gens = []
    live = vars(obj)
    for e in saved["rngs"]:
        try:
            name, kind, state = e
            g = live.get(name)
            if g is None:
                g = rng.new_generator(kind)
            elif rng.kind_of(g) != kind:
                raise TypeError(kind)
            raw = rng.raw_from_saved(kind, state)
            rng.check_state(g, kind, raw)
            gens.append((name, g, kind, raw))
        except Exception:  # noqa: BLE001 - nothing read from a checkpoint is trusted unchecked
            bad.append(str(e[0] if isinstance(e, list) and e else "?")[:60])
    if bad:
        return bad  # (nothing written: the object stays as the relaunch made it, and the caller says so)
    for k, v in saved["values"].items():
        if not isinstance(k, str) or k.startswith("__"):
            continue
        now = live.get(k)
        if (isinstance(v, torch.Tensor) and type(now) is torch.Tensor and now.shape == v.shape
                and now.dtype == v.dtype and now.layout == torch.strided):
            with torch.no_grad():
                now.copy_(v)  # in place: the library's loop may hold this very tensor (the Trainer's tr_loss)
        elif isinstance(v, torch.Tensor):  # (saved on the CPU: back on the device the relaunch's is on)
            live[k] = v.to(now.device, copy=True) if isinstance(now, torch.Tensor) else v.clone()
        else:
            live[k] = v
    for name, g, kind, raw in gens:
        live[name] = g
        rng.set_state(g, kind, raw)
    return bad
