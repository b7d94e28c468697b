"""Find the training state a script never names: optimizers, the modules that own
their parameters, their LR schedulers and GradScalers; turn it into a
checkpoint state and load it back.

Keys are creation-order indices (optimizer ``"0"``, its schedulers
``"0.0"``, ``"0.1"``, ...), so a relaunched script that builds the same
objects in the same order maps every saved entry onto its counterpart.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import PyckptError
from .hooks import Registry


@dataclass
class Tracked:
    """The objects one snapshot covers."""

    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list)
    schedulers: dict[str, Any] = field(default_factory=dict)
    scalers: dict[str, Any] = field(default_factory=dict)

    def replicated(self, world_size: int) -> bool:
        """Whether this state is identical on every rank (written once) or per rank."""
        return world_size == 1 or (bool(self.modules) and all(_is_ddp(m) for m in self.modules))


def _is_ddp(m: nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return isinstance(m, DDP) or isinstance(getattr(m, "_orig_mod", None), DDP)


def _fill_from_gc(registry: Registry, cls: type) -> None:
    """Objects made before transparent mode was enabled are not registered: find them once."""
    if len(registry) == 0:
        for obj in gc.get_objects():
            if issubclass(type(obj), cls):
                registry.add(obj)


def discover(optimizers: Registry, schedulers: Registry, scalers: Registry) -> Tracked:
    """Everything to save, in a deterministic order."""
    from torch.optim.lr_scheduler import LRScheduler

    _fill_from_gc(optimizers, torch.optim.Optimizer)
    _fill_from_gc(schedulers, LRScheduler)
    _fill_from_gc(scalers, torch.amp.GradScaler)
    opts = list(optimizers)
    t = Tracked(optimizers=opts, modules=root_modules(opts))
    per_opt: dict[int, int] = {}
    for s in schedulers:
        idx = next((i for i, o in enumerate(opts) if o is getattr(s, "optimizer", None)), None)
        if idx is not None:
            j = per_opt.get(idx, 0)
            per_opt[idx] = j + 1
            t.schedulers[f"{idx}.{j}"] = s
    for i, sc in enumerate(scalers):
        if sc.is_enabled():
            t.scalers[str(i)] = sc
    return t


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def root_modules(opts: list[torch.optim.Optimizer]) -> list[nn.Module]:
    """The outermost live modules owning optimizer parameters (a DDP wrapper, a compiled
    module), ordered by their first parameter's position in the optimizers."""
    order: dict[int, int] = {}
    for p in (p for o in opts for p in _params(o)):
        order.setdefault(id(p), len(order))
    if not order:
        return []
    gc.collect()  # drop dead wrappers still in reference cycles
    owners = [m for m in gc.get_objects() if issubclass(type(m), nn.Module)
              and any(id(p) in order for p in m.parameters())]
    inner = {id(sub) for m in owners for sub in m.modules() if sub is not m}
    roots = [m for m in owners if id(m) not in inner]
    return sorted(roots, key=lambda m: min(order[id(p)] for p in m.parameters() if id(p) in order))


def state_of(t: Tracked) -> dict[str, Any]:
    """The checkpoint state of the tracked objects (live tensors: capture before mutating)."""
    return {
        "modules": {str(i): m.state_dict() for i, m in enumerate(t.modules)},
        "optimizers": {str(i): o.state_dict() for i, o in enumerate(t.optimizers)},
        "schedulers": {k: s.state_dict() for k, s in t.schedulers.items()},
        "scalers": {k: s.state_dict() for k, s in t.scalers.items()},
    }


def split_buffers(t: Tracked, state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Move module buffers out of ``state`` (returned, to be stored per rank).

    Under DDP the parameters are identical on every rank but buffers such as
    BatchNorm statistics are not: each rank updated them in its own forward,
    and DDP broadcasts rank 0's at the start of the next one. Keeping every
    rank's own buffers makes the restored processes exactly the saved ones."""
    out: dict[str, dict[str, Any]] = {}
    for i, m in enumerate(t.modules):
        sd = state["modules"][str(i)]
        names = {n for n, _ in m.named_buffers()}
        out[str(i)] = {k: sd.pop(k) for k in list(sd) if k in names}
    return out


def merge_buffers(state: dict[str, Any], buffers: dict[str, dict[str, Any]]) -> None:
    """Inverse of ``split_buffers``."""
    for i, bufs in buffers.items():
        state["modules"][i].update(bufs)


def into_of(t: Tracked) -> dict[str, Any]:
    """Existing tensors to restore module state into, in place."""
    return {"modules": {str(i): m.state_dict() for i, m in enumerate(t.modules)}}


def load(t: Tracked, state: dict[str, Any]) -> None:
    """Load ``state`` (from ``state_of``) into the tracked objects; raises when they do not match."""
    _check_keys("modules", state["modules"], len(t.modules))
    _check_keys("optimizers", state["optimizers"], len(t.optimizers))
    for i, m in enumerate(t.modules):
        m.load_state_dict(state["modules"][str(i)])
    for i, o in enumerate(t.optimizers):
        o.load_state_dict(state["optimizers"][str(i)])
    _load_named("LR scheduler", t.schedulers, state["schedulers"])
    _load_named("GradScaler", t.scalers, state["scalers"])


def _check_keys(what: str, saved: dict, n: int) -> None:
    if len(saved) != n:
        raise PyckptError(f"the checkpoint holds {len(saved)} {what} but this run has {n}: the script builds "
                          "different objects than the one that wrote it; set PYCKPT_RESUME=never to start over")


def _load_named(what: str, live: dict[str, Any], saved: dict[str, Any]) -> None:
    if set(live) != set(saved):
        raise PyckptError(f"the checkpoint holds {what}s {sorted(saved)} but this run has {sorted(live)}; "
                          "set PYCKPT_RESUME=never to start over")
    for k, obj in live.items():
        obj.load_state_dict(saved[k])


def grads_without_optimizer() -> bool:
    """True when some live module has gradients although no optimizer ever stepped."""
    return any(p.grad is not None for m in gc.get_objects() if issubclass(type(m), nn.Module)
               for p in m.parameters(recurse=False))
