"""Lazy capture for transparent mode: arm a snapshot at the consistent point, copy in the background.

At the consistent point (the training loader's next fetch) parameters and
optimizer state do not change until the next optimizer step, so the
snapshot is *armed* there and the engine copies it while the next
forward/backward runs; an optimizer step pre-hook waits until the copy is
done before the step may mutate anything.

Exactness. A tensor changed after arming must never be saved with a later
value. So:

* tensors no optimizer owns (module buffers such as BatchNorm running stats,
  which forward mutates; loop-state and registered tensors; RNG states) are
  copied eagerly at the consistent point when small (``EAGER_MAX_BYTES``);
* every other tensor (optimizer-owned parameters and state, large frozen
  weights) keeps the version counter (``t._version``) it had at arming. When
  the copy is complete the training thread, at a point where none of its ops
  is in flight (the next optimizer pre-step, a flush, or its end), compares
  them. A changed tensor means its bytes may be from after the consistent
  point: the checkpoint is discarded (its commit is vetoed, one ``pyckpt:``
  warning line) and capture is eager for the rest of the job.

The commit thread waits for that verdict before it commits (writes run
meanwhile), so a checkpoint becomes durable only after the next optimizer
step starts, or when the training thread ends. ``PYCKPT_LAZY=0`` turns lazy
capture off (``captured()`` at the consistent point, as before).
"""
from __future__ import annotations

import collections
import ctypes
import operator
import os
import threading
import time
from typing import Any

import torch

from . import knobs, shm_tier, tree
from .errors import UnsupportedStateError
from .sharded import storage_ptr as _storage_ptr  # DTensors (FSDP2): their local tensor's memory
from .activation import _say as say

EAGER_MAX_BYTES = 1 << 20  # non-optimizer tensors up to this size are copied at the consistent point (larger
# ones, e.g. frozen base weights, are guarded: copying them there would stall like eager capture)


class TornCapture(Exception):
    """A guarded tensor changed after the snapshot point before its copy finished (commit vetoed)."""

    quiet = True  # the lazy layer prints the one line itself; the Checkpointer stays silent


class Armed:
    """One armed snapshot: its futures, the version counters to check, and the verdict."""

    def __init__(self, step: int, futures: list, guards: list[Guards], owner: threading.Thread) -> None:
        self.step, self.futures, self.guards, self.owner = step, futures, guards, owner
        self.verdict = threading.Event()
        self.error: TornCapture | None = None
        self._lock = threading.Lock()

    def settle(self) -> TornCapture | None:
        """Wait for the copy, then compare version counters (call where the trainer runs no op)."""
        with self._lock:
            if not self.verdict.is_set():
                for f in self.futures:
                    f.captured()
                changed = [name for g in self.guards for name in g.changed()]
                self.guards = []  # drop the references: the tensors are the caller's again
                if changed:
                    more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
                    self.error = TornCapture(
                        f"checkpoint of step {self.step} discarded: tensor {changed[0]!r}{more} changed in place "
                        "after the snapshot point, before lazy capture had copied it; capture is eager (copies "
                        "at the snapshot point) for the rest of this job (PYCKPT_LAZY=0 makes that the default)")
                self.verdict.set()
        return self.error

    def gate(self) -> BaseException | None:
        """Commit thread: block until the verdict (given here if the training thread has ended)."""
        while not self.verdict.wait(0.05):
            if not self.owner.is_alive():  # interpreter shutdown or the thread ended: nothing is in flight
                self.settle()
        return self.error


class Guards:
    """Tensors of one encoded state (``tree.Flat``) and the version counters they had at arming."""

    def __init__(self, flat: tree.Flat, which: list[int], root: str) -> None:
        tensors = flat.tensors
        self.tensors = [tensors[i] for i in which]
        self.versions = [t._version for t in self.tensors]
        self.which, self.paths, self.root = which, flat.paths, root  # names are made only for a changed one

    def changed(self) -> list[str]:
        """Key paths of the tensors whose version moved since arming."""
        now = [t._version for t in self.tensors]
        if now == self.versions:
            return []
        return [f"{self.root}/{self.paths[i]}" for i, a, b in zip(self.which, now, self.versions) if a != b]


class Pending:
    """What ``Session.future`` holds for a lazy snapshot: waiting settles the verdict first."""

    def __init__(self, lazy: Lazy, armed: Armed, futures: list) -> None:
        self.lazy, self.armed, self.futures = lazy, armed, futures  # futures[0] decides result()
        self.step = armed.step

    def _settle(self) -> None:
        # Through the Lazy layer while this is its armed snapshot (a flush, disable(), the exit
        # handler): it also opens the alias gate and says a torn copy's line.
        self.lazy.settle_armed(self.armed)

    def captured(self, timeout: float | None = None) -> bool:
        self._settle()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        self._settle()
        return all([f.wait(timeout) for f in self.futures])

    def result(self, timeout: float | None = None) -> str:
        self._settle()
        for f in self.futures[1:]:
            f.wait(timeout)
        return self.futures[0].result(timeout)

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def exception(self) -> BaseException | None:
        return next((e for e in (f.exception() for f in self.futures) if e is not None), None)


class Lazy:
    """The lazy-capture and memory-tier logic of one transparent Session."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.enabled = bool(knobs.get("PYCKPT_LAZY"))
        self.armed: Armed | None = None
        self.snapshots = 0
        self._owned = _OwnedStorages()
        self.blocked = 0.0  # training-thread seconds spent on the current checkpoint (for the auto interval)

    # -- snapshot ----------------------------------------------------------------------
    def save(self, state: Any, rank_state: Any) -> Any:
        """Start the snapshot of ``state``/``rank_state`` at the session's step; returns its future.

        Eager: returns once every tensor is copied. Lazy: returns at once, armed."""
        s = self.session
        t0 = time.monotonic()
        self.settle()  # a previous armed snapshot gets its verdict first (its commit may be waited for below)
        tier = shm_tier.tier_for(s.ckpt, s.coord)
        self.snapshots += 1
        preempted = self._preempted()
        to_storage = tier is None or tier.storage_due(self.snapshots) or preempted
        # After SIGTERM the signalled rank exits right after this snapshot, so every rank captures it
        # now: a lazy rank's commit would wait for its next optimizer step, which waits on a
        # collective with the rank that is waiting for that commit.
        lazy = self.enabled and not preempted
        guards: list = []
        if lazy:
            try:  # encoded once here: the saves below take the encoding (tree.Flat) as it is
                flat = tree.flatten(state)
                rank_flat = None if rank_state is None else tree.flatten(rank_state)
            except UnsupportedStateError:
                pass  # nothing will be copied: the save below raises it, once every rank knows (Checkpointer._agree)
            else:
                owned, ids = self._owned.storages(s.optimizers), self._owned.ids
                state, g = _protect(flat, owned, "state", ids)
                guards.append(g)
                if rank_flat is not None:
                    rank_state, g = _protect(rank_flat, owned, "rank_state", ids)
                    guards.append(g)
        futures: list = []
        armed = Armed(s.step, futures, guards, threading.current_thread())
        # The state's module parameters come undetached (Session._collect): recorded as state_dict()'s.
        kw: dict[str, Any] = {"_as_state_dict": True}
        if lazy:
            kw["_gate"] = armed.gate
        try:
            f = tier.save(s.step, state, rank_state, **kw) if tier is not None else None
            # Captured once: storage's checkpoint is copied from the memory tier's (tier_publish.py).
            published = tier.publish(f, s.ckpt, s.step) if f is not None and to_storage else None
            if published is not None:
                futures.append(published)
            elif to_storage or f is None:  # no tier, storage cannot copy it, or over the tier's limit
                futures.append(s.ckpt.save(s.step, state, rank_state, **kw))
            if f is not None:
                futures.append(f)
        except BaseException:
            self.armed = armed
            self.settle()  # no commit started here may wait for a verdict nobody gives
            raise
        self.armed = armed
        if not lazy:
            self.settle()  # eager: every tensor is copied before the script goes on
        else:
            _ALIAS_GATE.close(armed)
        self.blocked = time.monotonic() - t0
        return futures[0] if len(futures) == 1 and not lazy else Pending(self, armed, futures)

    def _preempted(self) -> bool:
        """Whether any rank got SIGTERM (a preemption notice may reach one rank, or one node, only).
        That snapshot is then captured eagerly and written to storage on every rank, whatever
        ``PYCKPT_STORAGE_EVERY`` says: a preempted job may come back on another machine, without
        this one's ``/dev/shm``. One store round per snapshot in a multi-rank job."""
        s = self.session
        term = s.sigterm is not None
        if s.coord.world_size > 1:
            term = any(s.coord.all_gather_json(term, "lazy/sigterm"))
        return term

    def settle_armed(self, armed: Armed) -> None:
        """``settle()`` when ``armed`` is the armed snapshot, else its own verdict (given already)."""
        if self.armed is armed:
            self.settle()
        else:
            armed.settle()

    def settle(self) -> None:
        """Give the armed snapshot its verdict (training thread); a torn copy turns lazy capture off."""
        armed, self.armed = self.armed, None
        if armed is None:
            return
        _ALIAS_GATE.open()
        t0 = time.monotonic()
        err = armed.settle()
        self.blocked += time.monotonic() - t0
        if err is not None:
            self.enabled = False
            say(f"warning: {err}", "warning")

    # -- hooks -------------------------------------------------------------------------
    def before_step(self, opt: Any, args: Any, kwargs: Any) -> None:
        """Optimizer step pre-hook: the step may mutate tensors only once the armed copy is done."""
        if self.armed is not None:
            self.settle()
        policy = self.session.policy
        if getattr(policy, "auto", None) is not None and opt is self.session.primary:
            fut = self.session.future
            interval = policy.note_step(time.monotonic(), busy=fut is not None and not fut.done(),
                                        blocked=self.blocked)
            self.blocked = 0.0
            if interval is not None and _is_rank0(self.session):
                level = "info" if policy.auto.measured == 1 else "debug"
                say(f"checkpoint interval now {interval:.1f} s (Young/Daly: measured cost "
                    f"{policy.auto.cost:.3g} s per checkpoint, MTBF {policy.auto.mtbf_hours:g} h)", level)


_BASE_DATA = torch._C.TensorBase.__dict__["data"]  # torch's own ``Tensor.data`` descriptor
_BASE_NUMPY = torch._C.TensorBase.numpy
_TENSOR_DLPACK = torch.Tensor.__dict__.get("__dlpack__")  # defined in Python on torch.Tensor itself


class _AliasGate:
    """While an armed snapshot is being copied, making an alias that bypasses version counters first
    waits for the copy to finish.

    A write through a ``.data`` alias (``p.data.mul_(...)``, common in older code and in WGAN's
    clipping), through ``.numpy()`` (``np.asarray(p)`` included) or through a DLPack export
    (``__dlpack__``: CuPy, JAX, ``np.from_dlpack``) does not move the tensor's version counter, so the
    guards cannot see it: without the gate such a write right after the snapshot point would be
    committed silently. The gate is a set of attributes on ``torch.Tensor`` only for that window. The
    first ``.data`` read waits for the copy (as eager capture would) and takes the gate away, so later
    reads are torch's own; ``.numpy()`` and ``__dlpack__`` wait only for a guarded tensor's memory, so
    a script that logs activations through numpy inside forward keeps its lazy capture."""

    def __init__(self) -> None:
        self.armed: Armed | None = None
        self._guarded: tuple[Armed, set[int]] | None = None  # storages of its guarded tensors, on demand
        self._replaced: dict[str, Any] = {}  # what close() replaced on torch.Tensor, put back by open()
        self._lock = threading.Lock()
        gate = self

        def get(t: torch.Tensor) -> torch.Tensor:
            if gate.armed is not None:
                gate.wait()
            return _BASE_DATA.__get__(t, type(t))

        def set_(t: torch.Tensor, value: torch.Tensor) -> None:
            _BASE_DATA.__set__(t, value)  # a new tensor: the old storage stays held by the copy

        def numpy(t: torch.Tensor, *, force: bool = False) -> Any:
            gate.wait_for(t)
            return gate._original("numpy", _BASE_NUMPY)(t, force=force)

        def dlpack(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            gate.wait_for(t)
            return gate._original("__dlpack__", _TENSOR_DLPACK)(t, *args, **kwargs)

        self._attrs = {"data": property(get, set_), "numpy": numpy}
        if _TENSOR_DLPACK is not None:
            self._attrs["__dlpack__"] = dlpack
        os.register_at_fork(after_in_child=self._forget)

    def _original(self, name: str, base: Any) -> Any:
        """What ``name`` was on torch.Tensor before the gate (a library's wrapper), else torch's own."""
        before = self._replaced.get(name, _ABSENT)
        return base if before is _ABSENT else before

    def wait(self) -> None:
        """Wait for the armed copy and take the gate away (any thread; the verdict is still the trainer's)."""
        armed = self.armed
        if armed is None:
            return
        self.open(armed)
        for f in armed.futures:
            f.captured()

    def wait_for(self, t: torch.Tensor) -> None:
        """``wait()`` if ``t`` views memory of a guarded tensor of the armed snapshot."""
        armed = self.armed
        if armed is None:
            return
        cached = self._guarded
        if cached is None or cached[0] is not armed:
            cached = (armed, {_storage_ptr(g) for gs in armed.guards for g in gs.tensors})
            self._guarded = cached
        try:
            ptr = _storage_ptr(t)
        except Exception:  # no storage to share (a meta or sparse tensor): nothing of the snapshot's
            return
        if ptr in cached[1]:
            self.wait()

    def close(self, armed: Armed) -> None:
        with self._lock:
            self.armed, self._guarded = armed, None
            for name, attr in self._attrs.items():
                now = torch.Tensor.__dict__.get(name, _ABSENT)
                if now is not attr:
                    self._replaced[name] = now  # torch's own, or what a library put there
                    setattr(torch.Tensor, name, attr)

    def open(self, armed: Armed | None = None) -> None:
        """Take the gate away; with ``armed``, only while it is still that snapshot's (a thread whose
        wait began before it was settled must not open the next snapshot's gate)."""
        with self._lock:
            if armed is not None and self.armed is not armed:
                return
            self.armed, self._guarded = None, None
            self._put_back()

    def _put_back(self) -> None:
        for name, attr in self._attrs.items():
            if torch.Tensor.__dict__.get(name) is attr:
                before = self._replaced.pop(name, _ABSENT)
                if before is _ABSENT:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, before)

    def _forget(self) -> None:
        """In a child forked while a snapshot is armed (a DataLoader worker): the copy is the parent's
        and its memory is the child's own copy, so nothing there waits for it."""
        self._lock = threading.Lock()
        self.armed, self._guarded = None, None
        self._put_back()


_ABSENT = object()
_ALIAS_GATE = _AliasGate()


def _is_rank0(session: Any) -> bool:
    coord = getattr(session, "coord", None)
    return coord is None or coord.rank == 0


class _OwnedStorages:
    """Storage addresses of every parameter and state tensor of the registered optimizers, read again
    only when one of those tensors moved: the same thousands of tensors come back at every snapshot."""

    def __init__(self) -> None:
        self._tensors: list = []
        self._ptrs: list[int] = []
        self._set: set[int] = set()
        self.ids: set[int] = set()  # id() of those tensors (alive: ``_tensors`` holds them), as of ``storages``

    def storages(self, optimizers: Any) -> set[int]:
        tensors: list = []
        for opt in optimizers:
            for g in opt.param_groups:
                tensors += g["params"]
            for st in opt.state.values():
                if isinstance(st, dict):
                    tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
        # A tensor's data pointer is cheaper to read than its storage's (no storage object made); the
        # same tensor objects at the same data pointers view the same storages as last time.
        ptrs = [t.data_ptr() for t in tensors]
        if (len(tensors) != len(self._tensors) or ptrs != self._ptrs
                or not all(map(operator.is_, tensors, self._tensors))):
            self._set = set(_storage_ptrs(tensors))
            self._set.discard(0)
            self._tensors, self._ptrs = tensors, ptrs
            self.ids = set(map(id, tensors))
        return self._set


def _storage_ptrs(tensors: list) -> list[int]:
    """``sharded.storage_ptr`` of each tensor; plain tensors inline (thousands at every snapshot)."""
    plain = _PLAIN
    return [t.untyped_storage().data_ptr() if type(t) in plain else _storage_ptr(t) for t in tensors]


_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def _protect(flat: tree.Flat, owned: set[int], root: str, ids: set[int] | frozenset[int] = frozenset()
             ) -> tuple[tree.Flat, Guards]:
    """``flat`` with small non-optimizer tensors replaced by copies, and guards for every other tensor.
    ``owned``: the optimizers' storage addresses; ``ids``: ``id()`` of the optimizers' live tensors
    (their state tensors come back as the same objects: owned without reading their storage)."""
    tensors = flat.tensors
    # Most tensors are the optimizer's: the ownership test first, sharing and size only for the others.
    maybe = [i for i, t in enumerate(tensors) if id(t) not in ids]
    others = [i for i, p in zip(maybe, _storage_ptrs([tensors[i] for i in maybe])) if p not in owned]
    copy: list[int] = []
    if others:
        ptrs = _storage_ptrs(tensors)
        shared = collections.Counter(ptrs)
        # a view sharing storage keeps its sharing: guarded instead
        copy = [i for i in others if shared[ptrs[i]] == 1 and tensors[i].nbytes <= EAGER_MAX_BYTES]
    if not copy:
        return flat, Guards(flat, list(range(len(tensors))), root)
    out = list(tensors)
    for i in copy:
        out[i] = _copy_small(tensors[i])
    copied = set(copy)
    guarded = [i for i in range(len(tensors)) if i not in copied]
    return tree.Flat(flat.tree, out, flat.paths), Guards(flat, guarded, root)


def _copy_small(t: torch.Tensor) -> torch.Tensor:
    """A private copy of a small tensor. A contiguous CPU one is copied by one ``memmove`` on this thread:
    ``clone()`` splits copies over 64K elements across torch's intra-op threads, whose wake-up (when
    another process holds a core) cost milliseconds per tensor at the snapshot point, for microseconds
    of copying."""
    t = t.detach()
    if (t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized or t.is_conj() or t.is_neg()
            or type(t) is not torch.Tensor or not t.is_contiguous()):
        return t.clone()
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    n = t.numel() * t.element_size()
    if n:
        ctypes.memmove(out.data_ptr(), t.data_ptr(), n)
    return out
