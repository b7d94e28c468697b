"""The transparent-mode session: hook callbacks, snapshots and the deferred restore.

Data flow. A global optimizer post-step hook counts steps of the *primary*
optimizer (the first one that steps, so a GAN's two optimizers make one
step per iteration; replaced when it is gone or superseded, see ``primary``)
and asks the ``Policy`` whether a snapshot is due;
if so the ``LoaderTracker`` is armed and the snapshot is taken when the
*training stream* (the loader fetched last before that step) is next asked
for a batch, before the batch is fetched. Then every per-step and per-epoch
bookkeeping has run, gradients of the finished step are no longer needed,
and a relaunched run reaches the same point by fast-forwarding that loader.
On resume the state is restored at exactly that point.
"""
from __future__ import annotations

import atexit
import functools
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from typing import Any, Callable

import torch

from . import (discovery, finish, frames, gcpause, held_writes, knobs, loader_kept, loopstate, own_resume, reader, rng,
               sharded, threads)
from .activation import _say as say  # the one PYCKPT_LOG-aware printer (torch-free, for the start-up line)
from .errors import PyckptError
from .hooks import HookSet, Registry, eager
from .loader_state import FastForward, LoaderTracker, Stream, loop_epoch
from .policy import Policy, StoreAgreement

SIGTERM_GRACE_S = 60.0  # after SIGTERM, exit anyway if no consistent point comes within this time

# name -> (getter, setter), filled by pyckpt.register() (works before and after enable()).
REGISTERED: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {}


class Session:
    """Transparent checkpointing for this process; ``install()`` / ``uninstall()``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.hooks = HookSet()
        self.optimizers, self.schedulers, self.scalers = Registry(), Registry(), Registry()
        self.discovery = discovery.Discovery(self.optimizers, self.schedulers, self.scalers)
        self.tracker = LoaderTracker(self._at_point, self._first_iter, self._check_manual_updates)
        self.tracker.session = self  # integrations compose their framework's own resume with this session
        self.policy = Policy(*knobs.interval())
        self.step = 0
        self._primary: Any = None  # weakref.ref of the optimizer whose steps are counted (see primary)
        self._primary_params: frozenset[int] = frozenset()
        self._supersedes_cache: tuple = (None, False)
        self._last_stepped = 0  # id() of the optimizer whose step ended last
        self.fetches_at_step = -1
        self.train_stream: Stream | None = None
        self.snapshot_due = False
        self.disabled_reason: str | None = None
        self.ckpt: Any = None
        self.coord: Any = None
        self.source: Any = None  # resume.Source while a restore is pending
        self.held: held_writes.HeldWrites | None = None  # the script's writes over the run's files, held meanwhile
        self._grad_calls = 0  # torch.autograd.grad calls until the first-batches check (_patch_grad)
        self._grad_patch: tuple[Any, Any] | None = None
        self.launch: str | None = None  # resume.launch_id(), set at the start
        self.future: Any = None
        self.last_snapshot_step = -1
        self.sigterm: Any = None  # the previous SIGTERM handler once SIGTERM arrived
        self._prev_sigterm: Any = None
        self._grace: threading.Timer | None = None  # re-signals if SIGTERM's snapshot does not come in time
        self._worker_pids: dict[int, tuple] = {}  # DataLoader iterator id -> its live workers' pids
        self._remove_worker_pids: Any = None
        self.step_restore = False  # the checkpoint was taken at a step point: restore at the first one
        self.edited_resume = False  # PYCKPT_RESUME_EDITED=tracked resumed an edited script without its loop state
        self.manual = False  # weights are updated by hand: steps are backward() calls (_after_backward)
        self._weights_seen: Any = None
        self._backwards_unstepped = 0
        self._stepping = 0  # optimizer step() calls under way (pre-hook run, post-hook not yet)
        self._backward_patch: tuple[Any, Any] | None = None  # (pyckpt's backward wrapper, torch's own)
        self._backward_depth: list[None] = []  # one per torch.autograd.backward call under way (nested:
        # reentrant checkpoints)
        self._steps_since_fetch = 0
        self.loop_warned: set[str] = set()  # loop-state variables already warned about (once each)
        self.own_resume_seen = False  # the script's own resume (own_resume.py) was composed with already

    # -- installation ------------------------------------------------------------------
    def install(self) -> None:
        """Install every hook (all reversible through ``self.hooks``)."""
        from torch.optim.lr_scheduler import LRScheduler
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        from .lazy import Lazy

        self.tracker.install(self.hooks)
        self.hooks.add_handle(register_optimizer_step_post_hook(eager(self._post_step)))
        self.lazy = Lazy(self)  # pyckpt/lazy.py: snapshots copied during the next forward/backward
        self.hooks.add_handle(register_optimizer_step_pre_hook(eager(self._pre_step)))
        self.hooks.wrap_init(torch.optim.Optimizer, self.optimizers.add)
        # SequentialLR, ChainedScheduler and ReduceLROnPlateau do not call LRScheduler.__init__:
        # wrap every scheduler class that defines its own __init__ (registration is idempotent).
        for cls in _with_subclasses(LRScheduler):
            if "__init__" in cls.__dict__:
                self.hooks.wrap_init(cls, self.schedulers.add)
        self.hooks.wrap_init(torch.amp.GradScaler, self.scalers.add)
        self.discovery.install(self.hooks)
        own_resume.install(self, self.hooks)
        self._patch_destroy_process_group()
        self._patch_backward()
        self._patch_grad()

    def uninstall(self) -> None:
        """Remove every hook, wait for an in-flight checkpoint, restore the SIGTERM handler."""
        self.flush()
        if self.ckpt is not None:
            self._keep_newest()
            self.ckpt.close()  # releases the directory lock, so enable() can take it again
        self.hooks.remove_all()
        if self._prev_sigterm is not None and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, self._prev_sigterm)

    def _keep_newest(self) -> None:
        """Before storage's Checkpointer closes: with the memory tier (PYCKPT_STORAGE_EVERY) the newest
        snapshot may be held only in /dev/shm, and at the normal end a closed Checkpointer takes no copy
        of it (the copy is removed, the snapshot lost). Written to storage now (rank 0; one line if not)."""
        from . import shm_tier

        shm_tier.keep_newest_before_close(self.ckpt)

    def _patch_destroy_process_group(self) -> None:
        import torch.distributed as dist

        if not dist.is_available():
            return
        original = dist.destroy_process_group

        def destroy_process_group(*args, **kwargs):
            self.flush()  # the commit of an in-flight checkpoint still talks to the other ranks
            return original(*args, **kwargs)

        self.hooks.patch(dist, "destroy_process_group", destroy_process_group)

    def _patch_backward(self) -> None:
        """The end of ``backward()`` is the step point of loops that update weights by hand (no optimizer
        exists); Tensor.backward looks ``torch.autograd.backward`` up at each call."""
        original = torch.autograd.backward
        session = self
        depth = self._backward_depth

        def backward(*args, **kwargs):
            if session._primary is not None:  # an optimizer counts the steps: nothing to do (_drop_backward)
                return original(*args, **kwargs)
            # A backward() run inside another (a reentrant activation checkpoint recomputes its segment and
            # calls backward() from the autograd engine, on any of its threads) is part of the outer one.
            # Inner calls may come from several engine threads at once: list.append and pop are atomic, and
            # an inner call starts only after its outer call appended (no lock: this runs at every step).
            outer = not depth
            depth.append(None)
            try:
                out = original(*args, **kwargs)
            finally:
                depth.pop()
            # No optimizer has stepped (yet), and none is stepping: a closure's backward() inside step()
            # (LBFGS) is part of that step, and the weights it sees change are the optimizer's updates.
            if outer and session._primary is None and not session._stepping:
                session._after_backward()
            return out

        self._backward_patch = (eager(backward), original)
        self.hooks.patch(torch.autograd, "backward", self._backward_patch[0])

    def _drop_backward(self) -> None:
        """An optimizer counts the steps from now on (``_primary`` is never None again): the ``backward()``
        wrapper has nothing left to do, and it cost microseconds at every step. torch's own is put back,
        unless something wrapped it over pyckpt's since (``disable()`` puts it back then)."""
        if self._backward_patch is None:
            return
        wrapper, original = self._backward_patch
        if torch.autograd.backward is wrapper:
            torch.autograd.backward = original

    def _after_backward(self) -> None:
        """Count a step at the end of backward() when weights are updated by hand: no optimizer exists,
        or one exists but the weights changed between two backward() calls while none stepped."""
        if not self.manual and len(self.optimizers):
            self._backwards_unstepped += 1
            if self._backwards_unstepped > 1024:
                return  # gradients only (attribution, probing): stop looking
            params = [p for m in self.discovery.trainable_roots() for p in m.parameters() if p.grad is not None]
            if not params:
                return
            # A few values of up to 16 parameters: gradient accumulation leaves them unchanged.
            seen = sharded.first_values(params[:16])  # DTensors (FSDP2): their local shard, no collective
            changed = self._weights_seen is not None and not torch.equal(seen, self._weights_seen)
            self._weights_seen = seen
            if not changed:
                return
        self.manual = True
        # A snapshot armed since the last step is copied by now (forward/backward ran); the weights are
        # about to change by hand, with no optimizer pre-step to wait for the copy: settle it here.
        self.lazy.settle()
        self._on_step("backward")

    def flush(self) -> None:
        """Wait for the in-flight checkpoint, if any, to commit (or fail)."""
        if self.future is not None:
            self.future.wait()

    # -- hooks ---------------------------------------------------------------------------
    @property
    def primary(self) -> Any:
        """The optimizer whose steps are counted: the first that stepped, until it is gone or another
        that steps updates every parameter it did (a script's second phase: a new optimizer for the
        whole model). Kept for good, an optimizer the script replaced stopped the count and with it
        every later snapshot, silently."""
        return None if self._primary is None else self._primary()

    def _pre_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer step pre-hook: a step is under way until its post-hook. (A step that raised leaves the
        count up; it is read only until the first step completes, see _patch_backward.)"""
        self._stepping += 1
        self.lazy.before_step(opt, args, kwargs)

    def _post_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer step post-hook: the loaders' positions as of this step, then the step count (one hook
        rather than two: each costs microseconds at every step)."""
        self.tracker._on_step()
        if self._stepping:
            self._stepping -= 1
        ref = self._primary
        primary = ref() if ref is not None else None  # (self.primary, without a property call at every step)
        again = self._last_stepped == id(opt)
        self._last_stepped = id(opt)
        if opt is not primary:
            if id(opt) not in self.optimizers._ids:  # made before enable(): register it now
                self.optimizers.add(opt)
            # Superseded only by one that steps twice with no step of the primary between: a wrapper and
            # the optimizer it steps inside its own step (ZeroRedundancyOptimizer, SAM) alternate.
            if primary is not None and not (again and self._supersedes(opt)):
                return  # a GAN's other optimizer: one step per iteration is counted
            if self._primary is not None:
                why = "is gone" if primary is None else \
                    f"({type(primary).__name__}) is superseded: this one updates every parameter it did"
                say(f"steps are counted on {type(opt).__name__} from step {self.step + 1}: the optimizer that "
                    f"counted them {why}")
            if self._primary is None:
                self._drop_backward()
                self._drop_grad()
            self._primary = weakref.ref(opt)
            self._primary_params = frozenset(id(p) for g in opt.param_groups for p in g["params"])
        self._on_step("step")

    def _supersedes(self, opt: torch.optim.Optimizer) -> bool:
        """Whether ``opt`` updates every parameter the primary does (checked again when its groups grow)."""
        key = (id(opt), self._primary, sum(len(g["params"]) for g in opt.param_groups))
        if self._supersedes_cache[0] != key:
            ids = {id(p) for g in opt.param_groups for p in g["params"]}
            self._supersedes_cache = (key, bool(self._primary_params) and self._primary_params <= ids)
        return self._supersedes_cache[1]

    def _on_step(self, point: str) -> None:
        """A training step ended (``point``: "step" after the primary optimizer's step, "backward" after
        backward() when no optimizer exists): count it; restore or snapshot.

        The snapshot point is the training loader's next fetch when a loader was fetched before one of
        the last two steps (preferred: the relaunch reaches it by fast-forward); otherwise (a loop no
        DataLoader drives) this step point itself, with the script's loop state (loopstate.py)."""
        tr = self.tracker
        if tr._first:  # no DataLoader iterated yet: storage and the resume decision now
            tr.ensure_started()
        if self.step_restore:
            if point == "backward" and loopstate.point_of((self.source.rank_state or {}).get("loop")) == "step":
                # The run that wrote it counted optimizer steps by then. backward() points before this run's
                # first optimizer step are its start (SAM moves the weights between two backward() calls,
                # which reads as updates by hand until an optimizer steps): the restore point comes later.
                return
            self._restore_at_step(point)
            return
        # The run's own steps before the restore point, which overwrites what they did: those of an epoch the run
        # left early, replayed with its data; one right after an epoch run again without data, nothing fetched
        # since (its per-epoch code: the step of an accumulation's leftover micro-batches).
        if tr.replaying or (tr.plan is not None and tr.skip_ended_at == tr.fetches):
            self.step += 1
            return
        if tr.plan is not None and tr.streams:  # (steps before any loader's iter() are replayed, then overwritten)
            self._stepped_before_restore()
        fetched = tr.last is not None and tr.fetches != self.fetches_at_step
        self.fetches_at_step = tr.fetches
        if point == "backward" and fetched and tr.last.main is None:
            # Weights updated by hand: its epoch fed a step, as an optimizer's step counts it (tracker._on_step);
            # an epoch that fed none is run with its data by a relaunch (Stream.unfed).
            tr.last.fed_steps += 1
            tr.last.fed_in_epoch += 1
        self.step += 1
        self._steps_since_fetch = 0 if fetched else self._steps_since_fetch + 1
        # A loader fetched before the previous step still drives the loop (a second step on the same
        # batch): its next fetch is the point. Two steps in a row without one: a step point.
        at_step = tr.last is None or self._steps_since_fetch >= 2
        if not at_step:
            self.train_stream = tr.last
        due = self.policy.due(self.step) or (at_step and self.snapshot_due)
        if due and self.disabled_reason is None:
            if not at_step:
                self.snapshot_due = True
                tr.armed = True
            else:
                self.snapshot_due, tr.armed = False, self.source is not None
                self.train_stream = None
                self._snapshot(point)
                if point == "backward":
                    # Weights updated by hand change right after backward(), and no optimizer pre-step
                    # comes to wait for a lazy copy: finish the copy now.
                    self.lazy.settle()

    def _at_point(self, stream: Stream) -> None:
        """Before ``stream`` fetches a batch while armed: restore or snapshot here."""
        tr = self.tracker
        if self.source is not None and stream is tr.plan_stream:
            path = self.source.path
            tr.replaying = False  # (an iter() ends a replayed epoch before any restore point; never counted past it)
            try:
                self._restore()
            except PyckptError as e:
                # The script does not match the checkpoint: one line and exit status 2, as for a
                # refusal at the first iter(); the exit handler ends live loader workers.
                say(f"cannot resume from {path}: {_with_hint(e)}", "warning")
                finish.note_failure("resume refused")
                raise SystemExit(2) from None
        elif self.source is None and tr.plan is not None and stream is tr.plan_stream:
            # A position-only plan (the script's framework restored the state itself): reached.
            self.train_stream, tr.last, tr.plan = stream, stream, None
            self.fetches_at_step = tr.fetches
        if self.snapshot_due and stream is self.train_stream:
            self.snapshot_due = False
            self._snapshot()
        tr.armed = self.snapshot_due or self.source is not None

    def _first_iter(self) -> None:
        """First iter() of any loader: set up storage and decide whether to resume."""
        from . import resume
        from .checkpointer import Checkpointer
        # Installed only now that training begins: a process that never iterates a DataLoader (the
        # torchrun agent, which also sees PYCKPT_DIR) keeps its own SIGTERM behaviour.
        self._install_sigterm()
        # The one heap scan (objects made before the hooks), now rather than in a snapshot's stall.
        self.discovery.scan_once()
        self.coord = _coordinator()
        self.ckpt = Checkpointer(self.directory, keep=knobs.get("PYCKPT_KEEP"),
                                 compress=knobs.get("PYCKPT_COMPRESS"), coordinator=self.coord)
        if self.coord.world_size > 1:
            self.policy.set_agreement(StoreAgreement(self.coord.store, self.coord.rank, self.coord.world_size,
                                                     prefix=self.coord.prefix + "/policy"))
        setting = knobs.get("PYCKPT_RESUME")
        self.launch = resume.launch_id()  # recorded in each snapshot: a restart of this launch resumes it
        try:
            self.source = resume.choose(self.ckpt, self.coord, setting)
        except PyckptError as e:
            raise PyckptError(f"cannot resume from {self.directory}: {e}") from e
        if self.source is None:
            return
        # Its per-epoch code runs again before the restore point: its saves would write the state before the
        # restore over the files the run wrote (a best model, a file per epoch).
        self.held = held_writes.HeldWrites(lambda: self.source is not None, say)
        self.held.install(self.hooks)
        pos = (self.source.rank_state or {}).get("loader")
        if pos is None and loopstate.point_of((self.source.rank_state or {}).get("loop")) in ("step", "backward"):
            self.step_restore = True  # at the first step point whose script stack matches (_restore_at_step)
            return
        if pos is None:
            raise PyckptError(f"checkpoint {self.source.path} has no training-loader position for rank "
                              f"{self.coord.rank}; set PYCKPT_RESUME=never to start over")
        self.tracker.plan = FastForward.from_position(pos)
        if self.coord.rank == 0:
            # The fast-forward cannot skip the script's own code around the loader: say what runs again,
            # once a skipped epoch ends (one the script's own next() goes on in runs no such code again).
            self.tracker.set_skip_note(0, loop_epoch(pos))
        for opt in self.optimizers:
            # As in the run that wrote the checkpoint, the optimizer has stepped before any
            # scheduler.step() that per-epoch code makes while epochs are skipped.
            opt._opt_called = True

    def _drop_held(self) -> None:
        """The restore is done or dropped: the script's writes go through again (``held_writes``)."""
        if self.held is not None:
            self.held.drop()

    def cancel_pending_resume(self, step: int) -> None:
        """The script's framework resumes from a newer state of its own: drop this session's pending
        restore; steps count on from ``step`` (the optimizer steps of the state the framework loads)."""
        self.source, self.tracker.plan, self.tracker.plan_stream = None, None, None
        self._drop_held()
        self.step = step

    def _stepped_before_restore(self) -> None:
        plan = self.tracker.plan
        where = f"resuming from {self.source.path}" if self.source is not None else "resuming"
        # A loader of the training dataset's type but another length or batch size stepped: most likely one
        # rebuilt at each epoch over a growing or shrinking dataset (a curriculum), which is a new stream
        # to pyckpt at every epoch, so its earlier epochs cannot be skipped. Say that, not "another script".
        kin = [st.sig for st in self.tracker.streams.values() if st.sig[:1] == plan.sig[:1] and st.sig != plan.sig]
        why = (f"a loader of the same dataset type with another length or batch size ({kin[0]}) came first, "
               "and the checkpoint records no finished epoch of it that trained; if it is the training loader "
               "rebuilt at each epoch over a dataset that grows or shrinks (a curriculum) or with another batch "
               "size, its lengths or batch sizes differ from those of the run that wrote it (or that run's "
               "pyckpt, before 2026-12-07, did not record them); if the steps draw from it by turns with the "
               "training loader (tasks mixed at random), pyckpt cannot resume that; else this run does not "
               "replay the run that wrote it"
               if kin else "this run does not replay the run that wrote it")
        same_kinds = [k for k in kin if len(k) == len(plan.sig) and k[2:6] == plan.sig[2:6]]
        workers = next((k for k in same_kinds if k[1] == plan.sig[1]), None)
        if workers is not None:  # only num_workers differs (a relaunch on a node with fewer cores)
            why = (f"the training loader has num_workers={workers[6]} now, {plan.sig[6]} in the run that wrote the "
                   f"checkpoint: relaunch with num_workers={plan.sig[6]} to resume exactly, or set "
                   "PYCKPT_RESUME_EDITED=tracked to go on at the checkpoint's epoch and batch (not exact where the "
                   "dataset draws random numbers or is an IterableDataset split among the workers)")
        elif same_kinds:
            why += ("; if samples were added to (or removed from) the training data since, "
                    "PYCKPT_RESUME_EDITED=tracked goes on at the checkpoint's epoch and batch over the new data "
                    "(not exact)")
        # Another script on the same PYCKPT_DIR (a fine-tuning run after pre-training) says so first.
        then = loopstate.script_of((self.source.rank_state or {}).get("loop") if self.source is not None else None)
        now = finish.main_script()
        if then is not None and now is not None and then != now:
            why = f"the checkpoint was written by {then}, this is {now}; {why}"
        # One line and exit status 2, not a traceback from inside optimizer.step().
        say(f"cannot resume: {where}: the optimizer stepped before the training loader reached the "
            f"checkpoint's position (loader {plan.sig}, its epoch {plan.epoch - 1}, batch {plan.batch}): {why}; "
            "refusing to guess. Set PYCKPT_RESUME=never (or use a new PYCKPT_DIR) to start over", "warning")
        finish.note_failure("resume refused")
        raise SystemExit(2)

    # -- undetectable patterns -----------------------------------------------------------
    def _check_manual_updates(self) -> None:
        """Once, at the tracker's ``check_at``-th batch: with no step counted yet and gradients taken by
        ``torch.autograd.grad`` (``torch.func`` takes them so too) but none by ``backward()``, the weights are
        updated where pyckpt has no step to stop at (weights updated by hand from backward() are checkpointed
        there, _patch_backward): say so. Gradients from backward() with no step yet are accumulation over more
        batches, whose step comes later (this check used to end every checkpoint of such a run); a window of
        batches fetched before its backward() calls (Hugging Face's Trainer) has none yet: nothing to say
        for either. Said, not given up on: a step that comes later is checkpointed as usual."""
        self._drop_grad()
        if self.step != 0 or self.source is not None or self.disabled_reason is not None or not self._grad_calls:
            return
        if self._backwards_unstepped or self.discovery.grads_without_optimizer():
            return
        say(f"warning: no training step in the first {self.tracker.check_at} batches: gradients are taken with "
            "torch.autograd.grad (or torch.func), with no torch.optim optimizer step and no backward(), so pyckpt "
            "has no step to stop at; no checkpoint is taken until one comes. Update the weights with a torch.optim "
            "optimizer or from backward(), or save them with pyckpt.Checkpointer (docs/TRANSPARENCY.md, "
            "\"What is not restored\")", "warning")

    def _patch_grad(self) -> None:
        """Count ``torch.autograd.grad`` calls until the first-batches check (``_check_manual_updates``), which
        puts torch's own back (``_drop_grad``); so does an optimizer's first step. ``torch.func``'s transforms
        look it up at each call too."""
        original = torch.autograd.grad
        session = self

        def grad(*args, **kwargs):
            session._grad_calls += 1
            return original(*args, **kwargs)

        self._grad_patch = (eager(functools.wraps(original)(grad)), original)
        self.hooks.patch(torch.autograd, "grad", self._grad_patch[0])

    def _drop_grad(self) -> None:
        """Put torch's own ``torch.autograd.grad`` back (unless something wrapped it over pyckpt's since)."""
        if self._grad_patch is None:
            return
        wrapper, original = self._grad_patch
        self._grad_patch = None
        if torch.autograd.grad is wrapper:
            torch.autograd.grad = original

    def _give_up(self, reason: str) -> None:
        if self.disabled_reason is None:
            self.disabled_reason = reason
            self.snapshot_due = False
            say(f"warning: no checkpoints will be taken: {reason}; save that state with "
                "pyckpt.register(name, obj) and drive the loop with a DataLoader (docs/TRANSPARENCY.md)",
                "warning")

    # -- snapshot ------------------------------------------------------------------------
    def _snapshot(self, point: str = "loader") -> None:
        if self.disabled_reason is not None or self.ckpt is None or self.step == self.last_snapshot_step:
            return
        traced = frames.compiled_function(frames.user_frames(sys._getframe(1))) if point != "loader" else None
        if traced is not None:  # a relaunch could not stop at the same place: its frames are Dynamo's
            where = "optimizer.step()" if point == "step" else "backward()"
            self._give_up(f"{where} runs inside {traced}, which torch.compile traces, and no DataLoader drives "
                          "the loop, so a relaunch cannot stop at the same place; compile the model "
                          "(torch.compile(model)) or the optimizer step alone, not the whole training step")
            return
        try:
            with gcpause.paused(promote=True):  # thousands of tensors: no collector pass in the snapshot (gcpause.py)
                state, rank_state = self._collect(point)
                fut = self.lazy.save(state, rank_state)  # copied now, or armed: the next step waits (lazy.py)
        except Exception as e:  # a checkpoint must never take the training job down
            why = str(e) if isinstance(e, RegisteredCallError) else f"{type(e).__name__}: {e}"
            say(f"warning: checkpoint of step {self.step} skipped: {why}", "warning")
            return
        self.future = fut
        self.last_snapshot_step = self.step
        self.policy.restart_timer(time.monotonic())
        say(f"checkpoint of step {self.step} started", "debug")
        if self.sigterm is not None:
            self._exit_after_sigterm()

    def _collect(self, point: str = "loader") -> tuple[dict, dict]:
        t = self.discovery.discover()
        replicated = t.replicated(self.coord.world_size)
        # Replicated, the modules' parameters go as they are (no detach each): that section is recorded
        # as state_dict() gives it (Lazy.save). Per rank (the rank section records flags as given): detached.
        objects = discovery.state_of(t, parameters_as_is=replicated)
        loop, script_objects = self._capture_loop(point, t)
        rank_state = {
            "loop": loop,
            "pyckpt": {"step": self.step, "world_size": self.coord.world_size, "replicated": replicated,
                       "launch": self.launch,
                       "optimizer_classes": discovery.class_names(t.optimizers)},
            "loader": self.train_stream.position() if self.train_stream is not None else None,
            "registered": {name: _registered_call("getter", name, get) for name, (get, _) in REGISTERED.items()},
            "rng": rng.capture(),
            "requires_grad": discovery.requires_grad_of(t),  # per rank: a few bytes, never chunked
        }
        if script_objects:  # modules and EMA helpers no optimizer owns, by the loop state's references
            rank_state["script_objects"] = script_objects
        kept = loader_kept.capture(self.tracker.streams.values(), self._training_loader(), self.tracker.kept)
        if kept:  # other loaders' persistent worker processes (a validation loader's)
            rank_state["kept_loaders"] = kept
        if t.loose:  # optimizer parameters no module owns: per rank (DDP does not synchronize them)
            rank_state["loose"] = dict(t.loose)
        if (self.manual or not t.optimizers) and t.modules:
            # Weights updated by hand use them after this point (also when an optimizer exists but never steps).
            rank_state["grads"] = discovery.grads_of(t)
        if not replicated:
            rank_state["objects"] = objects
            return {}, rank_state
        rank_state["buffers"] = discovery.split_buffers(t, objects)
        sharded.split_per_rank(t.optimizers, objects, rank_state)  # ZeRO state is per rank
        return objects, rank_state

    def _capture_loop(self, point: str, t: discovery.Tracked) -> tuple[dict | None, dict]:
        """The script's loop state here (loopstate.py) and the states of the modules and objects it
        refers to; what cannot be saved is said once, by name."""
        limit = knobs.get("PYCKPT_LOOP_STATE_MAX_BYTES")
        try:
            registered = [getattr(g, "__self__", None) for g, _ in REGISTERED.values()]  # saved there
            user = frames.user_frames(sys._getframe(1))
            cap = loopstate.capture(user, point, limit, t.modules, registered,
                                    list(t.loose.values()), t.optimizers, list(t.schedulers.values()))
            changed = loopstate.changed_since(getattr(self.train_stream, "var_marks", None), user)
            if changed is not None and cap.tree.get("locals") is not None:  # (not with the variables turned off)
                cap.tree["changed"] = changed
        except Exception as e:  # never lose the checkpoint over the loop state; say it is inexact
            if "capture" not in self.loop_warned:
                self.loop_warned.add("capture")
                say(f"warning: the script's loop state was not captured ({type(e).__name__}: {e}); a resume from "
                    "this checkpoint restarts the script's own counters; save them with pyckpt.register", "warning")
            return None, {}
        new = {k: v for k, v in cap.warnings.items() if k not in self.loop_warned}
        if new:
            self.loop_warned.update(new)
            listed = "; ".join(f"{k.removeprefix('the ')}: {v}" for k, v in new.items())  # (the script's ...)
            say(f"warning: a resume will not be exact: the script's {listed} (not saved with the loop state); "
                "save such state with pyckpt.register(name, getter=..., setter=...) (docs/TRANSPARENCY.md, "
                "Loop state)", "warning")
        if cap.skipped and self.last_snapshot_step < 0:
            say("loop state: not captured: " + "; ".join(f"{k} ({v})" for k, v in cap.skipped.items()), "debug")
        return cap.tree, cap.states

    # -- restore -------------------------------------------------------------------------
    def _loop_plan(self, point: str, t: discovery.Tracked) -> loopstate.Plan | None:
        """Check the checkpoint's loop state against the live script frames and ``t``'s modules (before
        any tensor is read); raises PyckptError on a changed script or stack."""
        rs = self.source.rank_state or {}
        tree = rs.get("loop")
        if tree is None:
            return None  # written before loop state existed, or capture failed (warned then)
        try:
            return loopstate.prepare(tree, frames.user_frames(sys._getframe(2)), point, rs.get("script_objects"),
                                     t.modules, t.optimizers, list(t.schedulers.values()))
        except loopstate.StackChanged as e:
            if knobs.get("PYCKPT_RESUME_EDITED") != "tracked":
                raise PyckptError(f"{e}; set PYCKPT_RESUME_EDITED=tracked to resume the model, optimizer, data "
                                  "position, RNG and the loop's counters by name, not the script's other variables "
                                  "(not exact), or set "
                                  "PYCKPT_RESUME=never (or use a new PYCKPT_DIR) to start over") from None
            # A fixed bug in an evaluation, a new log line: the job keeps its training state instead of
            # starting over. Said, since the script's other variables and its loops are this run's.
            self.edited_resume = True
            # An EMA copy or a teacher the script's variables hold is a model too: loaded into the variable
            # of the same name, where one of the same class is there. A step counter, a running loss: the
            # variables the edited loops carry, by name.
            plan = loopstate.prepare_references(tree, frames.user_frames(sys._getframe(2)),
                                                rs.get("script_objects"))
            if self.coord.rank == 0:
                kept = (f"the variables its loops carry ({', '.join(plan.carried[:12])}"
                        f"{', ...' if len(plan.carried) > 12 else ''}) the checkpoint's too, "
                        if plan.carried else "")
                say(f"warning: {e}; PYCKPT_RESUME_EDITED=tracked: the models (EMA copies found by name too), "
                    f"optimizers, schedulers, scaler, registered state, data position and RNG are the checkpoint's, "
                    f"{kept}the script's other variables and its loop positions this run's: the resume is not "
                    "exact", "warning")
            return plan

    def bind_unset(self, frame: Any) -> None:
        """A skipped epoch of the training loader ended (its per-epoch code runs next, without data): bind
        the script's variables that only the loader loop sets to the checkpoint's values (``loopstate.
        bind_unset``), so that code does not die of NameError before the restore point. Never raises."""
        rs = (self.source.rank_state or {}) if self.source is not None else {}
        tree = rs.get("loop")
        if tree is None:
            return
        try:
            names = loopstate.bind_unset(tree, frames.user_frames(frame))
        except Exception as e:  # noqa: BLE001 - the per-epoch code then meets what it would have met
            say(f"could not bind the loop's variables for a skipped epoch: {type(e).__name__}: {e}", "debug")
            return
        if names:
            say(f"variables the loader loop sets, bound to the checkpoint's values for the epoch run again "
                f"without data: {', '.join(names)}", "debug")

    def can_restore_at(self, frame: Any) -> bool:
        """Whether the checkpoint's loop state would be restored with the script's stack at ``frame`` (the
        same code and instruction in each script frame, loop positions it can reach): checked, nothing written."""
        rs = (self.source.rank_state or {}) if self.source is not None else {}
        tree = rs.get("loop")
        if tree is None:
            return False
        try:
            loopstate.prepare(tree, frames.user_frames(frame), "loader", rs.get("script_objects"))
        except Exception:  # noqa: BLE001 - not here (a mismatch, or a malformed tree the restore will name)
            return False
        return True

    def _load_tracked(self, t: discovery.Tracked) -> dict:
        """Read the checkpoint and load the tracked objects and registered state; returns its rank state."""
        src = self.source
        # Before any tensor is read: another optimizer class would load without complaint (then fail
        # at its first step with a bare KeyError, or train on with the other class's settings).
        discovery.check_classes((src.rank_state or {}).get("pyckpt", {}).get("optimizer_classes"), t.optimizers)
        discovery.check_loose(t, (src.rank_state or {}).get("loose"))
        replicated = t.replicated(self.coord.world_size)
        with reader.reusing():  # the checks below, the targets and the read open the checkpoint in turn
            if replicated:
                _check_modules_before_read(t, src)
            into = discovery.into_of(t)
            if replicated:  # FSDP2 optimizer state: DTensor targets, so each rank reads only its box
                into = sharded.optimizer_targets(t.optimizers, src.path, into)
            restored = src.restore(into if replicated else None)
        rs = restored.rank_state
        if replicated:
            state = restored.state
            discovery.merge_buffers(state, rs.get("buffers") or {})
            # ZeRO shares: on another number of ranks, every saved rank's (ZeRO keeps what it owns now)
            sharded.merge_per_rank(state, rs, src.path if src.src_rank >= 0 else None)
        else:
            state = rs["objects"]
        discovery.load(t, state)
        why = discovery.load_requires_grad(t, rs.get("requires_grad"))
        if why is not None:
            say(f"warning: {why}: parameters frozen or unfrozen while training keep the flags this run gave them; "
                "the resume may not be exact", "warning")
        discovery.load_loose(t, rs.get("loose"))
        if "grads" in rs:
            discovery.load_grads(t, rs["grads"])
        self._load_registered(rs.get("registered") or {})
        return rs

    def _restore(self) -> None:
        stream = self.tracker.plan_stream
        t = self.discovery.discover()
        plan = self._loop_plan("loader", t)
        rs = self._load_tracked(t)
        if plan is not None:
            plan.apply()  # the script's globals, locals, object attributes, loop iterators
            self._say_plan_warnings(plan)
            # What the loop changes from here on is told from the checkpoint's values, not this run's before them.
            stream.var_marks = loopstate.marks(frames.user_frames(sys._getframe(1)))
        pos = rs["loader"]
        stream.restore_sampler_state(pos)
        self._keep_loaders(rs)
        rng.restore(rs["rng"])  # last: loading state above may draw nothing, but be safe
        self.step = self.last_snapshot_step = int(rs["pyckpt"]["step"])
        self.train_stream, self.tracker.last = stream, stream
        self.fetches_at_step = self.tracker.fetches
        self.source, self.tracker.plan = None, None
        self._drop_held()
        self.policy.restart_timer(time.monotonic())
        if self.coord.rank == 0:
            took = time.monotonic() - self.started
            say(f"resumed from step {self.step} (epoch {loop_epoch(pos)}, batch {pos['batch']}) "
                f"in {took:.1f} s")
            self._say_ddp_bucket_order(t)

    def _restore_at_step(self, point: str) -> None:
        """The first step point of a relaunch resuming a checkpoint taken at a step point: the script
        must be at the same place (same code, same call stack); everything is put back here and the
        relaunch's own step so far is overwritten."""
        path = self.source.path
        try:
            t = self.discovery.discover()
            plan = self._loop_plan(point, t)
            if plan is None and not self.edited_resume:
                raise PyckptError("the checkpoint has no loop state to resume a loop no DataLoader drives")
            rs = self._load_tracked(t)
            if plan is not None:
                plan.apply()
                self._say_plan_warnings(plan)
        except PyckptError as e:
            say(f"cannot resume from {path}: {_with_hint(e)}", "warning")
            finish.note_failure("resume refused")
            raise SystemExit(2) from None
        self._keep_loaders(rs)
        rng.restore(rs["rng"])
        self.step = self.last_snapshot_step = int(rs["pyckpt"]["step"])
        self.fetches_at_step = self.tracker.fetches
        self.source, self.step_restore = None, False
        self._drop_held()
        self.policy.restart_timer(time.monotonic())
        if self.coord.rank == 0:
            where = "optimizer.step()" if point == "step" else "backward()"
            say(f"resumed from step {self.step} (after {where}, no DataLoader position) in "
                f"{time.monotonic() - self.started:.1f} s")
            self._say_ddp_bucket_order(t)

    def _training_loader(self) -> Any:
        st = self.train_stream if self.train_stream is not None else self.tracker.plan_stream
        return st.loader() if st is not None and st.loader is not None else None

    def _keep_loaders(self, rs: dict) -> None:
        """At the restore: other loaders' persistent iterators go on as the run's (loader_kept.py)."""
        self.tracker.kept = loader_kept.Kept(rs.get("kept_loaders"))
        self.tracker.kept.stop_idle(self.tracker.streams.values(), self._training_loader())

    def _say_plan_warnings(self, plan: loopstate.Plan) -> None:
        """The loop state's warnings. The command line is the job's, the same on every rank: said by rank
        0 only, like the job's other lines; the others are about this rank's own variables."""
        for w in (plan.job_warnings if self.coord.rank == 0 else []) + plan.warnings:
            say(f"warning: {w}", "warning")

    def _say_ddp_bucket_order(self, t: discovery.Tracked) -> None:
        """DDP rebuilds its gradient buckets after the first step of a process, so a relaunch's first
        step reduces in the initial bucket order, the uninterrupted run's in the rebuilt one. With two
        ranks a sum does not depend on the order; with three or more gloo/NCCL may add in another
        order and the result can differ in the last bit. Said once, at resume (never silent)."""
        if self.coord.world_size >= 3 and any(discovery.is_ddp(m) for m in t.modules):
            say(f"note: DistributedDataParallel on {self.coord.world_size} ranks: the first step after "
                "this resume reduces gradients in DDP's initial bucket order (the uninterrupted run had "
                "rebuilt its buckets), so results may differ from it in the last bit")

    def _load_registered(self, saved: dict[str, Any]) -> None:
        missing = sorted(set(REGISTERED) - set(saved))
        if missing:
            say(f"warning: registered objects {missing} are not in the checkpoint; left as they are", "warning")
        for name, (_, set_state) in REGISTERED.items():
            if name in saved:
                _registered_call("setter", name, set_state, saved[name])  # raised: the resume is refused

    # -- SIGTERM -------------------------------------------------------------------------
    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._prev_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._patch_loader_workers()

    def _patch_loader_workers(self) -> None:
        """DataLoader workers ignore SIGTERM while this session handles it.

        Preemption signals the whole process group. torch's workers install a C-level SIGTERM
        handler that dies unless the parent sent it; a worker dying makes the main process fail
        at its next fetch, before the snapshot. Ignoring it is safe: workers exit on their own
        when the main process dies (torch's parent watchdog), and are killed when it exits."""
        from torch.utils.data._utils import signal_handling
        from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

        original = signal_handling._set_worker_signal_handlers

        def _set_worker_signal_handlers(*args, **kwargs):
            original(*args, **kwargs)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _unblock_sigterm()  # blocked since the fork (below): a SIGTERM pending since then is dropped now

        self.hooks.patch(signal_handling, "_set_worker_signal_handlers", _set_worker_signal_handlers)
        # A worker forked while the group's SIGTERM arrives gets it before the lines above run, with this
        # process's handler, which passes it on in any other process: the worker died and the next fetch
        # failed before the snapshot. Its iterator forks them with SIGTERM blocked in the forking thread
        # (the mask is inherited), so the signal waits in the new worker until it ignores it; in this
        # process it is handled as soon as the workers are started (another thread may take it at once).
        orig_init = _MultiProcessingDataLoaderIter.__init__

        def __init__(it: Any, *args: Any, **kwargs: Any) -> None:
            blocked = _block_sigterm()
            try:
                orig_init(it, *args, **kwargs)
            finally:
                if blocked:
                    _unblock_sigterm()

        self.hooks.patch(_MultiProcessingDataLoaderIter, "__init__", __init__)
        # At exit multiprocessing SIGTERMs its daemonic children and joins them: workers ignoring it
        # would hang every exit with live workers (an exception in the loop, persistent workers).
        # So the live workers' pids are tracked (torch registers them for its SIGCHLD check) and
        # killed by an exit handler that runs before multiprocessing's (atexit: last registered
        # runs first).
        orig_set, orig_remove = signal_handling._set_worker_pids, signal_handling._remove_worker_pids
        live = self._worker_pids

        def _set_worker_pids(key: int, pids: tuple) -> None:
            orig_set(key, pids)
            live[key] = tuple(pids)

        def _remove_worker_pids(key: int) -> None:
            live.pop(key, None)
            orig_remove(key)

        self.hooks.patch(signal_handling, "_set_worker_pids", _set_worker_pids)
        self.hooks.patch(signal_handling, "_remove_worker_pids", _remove_worker_pids)
        self._remove_worker_pids = orig_remove
        import multiprocessing.util  # noqa: F401 - registers its exit handler now if not done yet

        # Kept after disable(): workers started before it still ignore SIGTERM.
        atexit.register(self._stop_workers_at_exit)

    def _stop_workers_at_exit(self) -> None:
        """End this process's DataLoader workers at interpreter exit, as multiprocessing's exit handler
        would have by SIGTERM (torch's worker handler then exits at once, without cleanup)."""
        if os.getpid() != self.pid or not self._worker_pids:
            return
        import multiprocessing

        # active_children() reaps exited children first, so every pid it lists is still our child
        # (never a reused pid of an unrelated process).
        children = {p.pid: p for p in multiprocessing.active_children()}
        doomed = []
        for key, pids in list(self._worker_pids.items()):
            try:
                self._remove_worker_pids(key)  # torch's SIGCHLD handler must not report them as crashed
            except (ValueError, RuntimeError):
                pass  # already removed (an iterator shut down after disable())
            doomed += [children[pid] for pid in pids if pid in children]
        self._worker_pids.clear()
        for p in doomed:
            p.kill()
        for p in doomed:
            p.join(10)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        prev = self._prev_sigterm if self._prev_sigterm is not None else signal.SIG_DFL
        if os.getpid() != self.pid or self.step == 0 or self.disabled_reason is not None or self.ckpt is None:
            # A forked worker, or nothing trained yet: behave as if we were not here.
            signal.signal(signal.SIGTERM, prev)
            _deliver(signum, prev, frame)
            return
        say("SIGTERM: checkpointing at the next consistent point, then exiting")
        self.sigterm = prev
        # A second SIGTERM now acts as usual; so does our own re-kill after the snapshot.
        signal.signal(signal.SIGTERM, prev)
        self.policy.force()
        self._grace = threading.Timer(SIGTERM_GRACE_S, _grace_expired, (signum,))
        self._grace.daemon = True
        threads.start(self._grace, "the SIGTERM grace timer",  # never raised into the training code
                      f"the process exits after the snapshot, however long past {SIGTERM_GRACE_S:.0f} s it comes "
                      "(a second SIGTERM exits at once)")

    def _exit_after_sigterm(self) -> None:
        try:
            self.future.result()
        except Exception as e:  # the exit below happens anyway
            say(f"warning: checkpoint on SIGTERM failed: {e}", "warning")
        if self._grace is not None:  # its snapshot came: a script whose own handler trains on is left alone
            self._grace.cancel()
            self._grace = None
        prev, self.sigterm = self.sigterm, None
        _deliver(signal.SIGTERM, prev, None)


def _block_sigterm() -> bool:
    """Block SIGTERM in the calling thread; False where it was blocked already or cannot be (then nothing
    is to be undone)."""
    if not hasattr(signal, "pthread_sigmask"):
        return False
    return signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _unblock_sigterm() -> None:
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _grace_expired(signum: int) -> None:
    """SIGTERM's grace ran out before the checkpoint it asked for was committed: say so, then act on
    the signal as if pyckpt were not there."""
    say(f"warning: SIGTERM: no checkpoint committed within {SIGTERM_GRACE_S:.0f} s of the signal; exiting "
        "without it (no consistent point came, or its commit did not finish)", "warning")
    os.kill(os.getpid(), signum)


def _check_modules_before_read(t: discovery.Tracked, src: Any) -> None:
    """Refuse modules that do not match the checkpoint (discovery's one line naming the module, its keys
    and shapes) from the shapes its tree records, before any tensor is read. The live parameters are the
    read's targets here: the reader would refuse a changed shape first, one tensor per line, and under
    FSDP2 only after other tensors were read into the live ones."""
    saved = reader.shapes(reader.open_checkpoint(src.path))
    modules = saved.get("modules") if isinstance(saved, dict) else None
    if not isinstance(modules, dict):
        return  # malformed: the read and discovery.load say so
    # Buffers are per rank, read with the rank state already (discovery.split_buffers).
    for i, bufs in ((src.rank_state or {}).get("buffers") or {}).items():
        if isinstance(modules.get(i), dict) and isinstance(bufs, dict):
            modules[i].update(bufs)
    discovery._check_keys("modules", modules, len(t.modules))
    for i, m in enumerate(t.modules):
        discovery._check_module(i, m, modules.get(str(i)))


class RegisteredCallError(PyckptError):
    """A ``pyckpt.register`` getter or setter raised; the message names it and where it raised."""


def _registered_call(kind: str, name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; its exception as a RegisteredCallError naming the registered ``name`` and the
    script line that raised (a snapshot skip or a resume refusal is one line, not a traceback)."""
    try:
        return fn(*args)
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        where = f" ({os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if len(tb) > 1 else ""
        raise RegisteredCallError(f"the {kind} registered as {name!r} raised {type(e).__name__}: {e}{where}") from e


def _with_hint(e: Exception) -> str:
    """A refusal's message, on one line, with the way out unless it names one already."""
    first, *rest = str(e).splitlines() or [""]
    # A multi-line message (the reader lists one problem per line) is still one `pyckpt:` line.
    msg = " ".join([first.rstrip(), "; ".join(x.strip() for x in rest if x.strip())]).strip()
    return msg if "PYCKPT_RESUME" in msg else f"{msg}; set PYCKPT_RESUME=never (or use a new PYCKPT_DIR) to start over"


def _with_subclasses(cls: type) -> list[type]:
    """``cls`` and every subclass defined so far."""
    out, todo = [], [cls]
    while todo:
        c = todo.pop()
        if c not in out:
            out.append(c)
            todo.extend(c.__subclasses__())
    return out


def _coordinator() -> Any:
    """The coordinator for this job; keys carry the torchelastic attempt so a restarted group
    never reads the previous attempt's values (the agent's store outlives attempts)."""
    from .coord import StoreCoordinator, attempt_prefix, default_coordinator

    coord = default_coordinator()
    if coord.world_size > 1:
        coord = StoreCoordinator(prefix=attempt_prefix())  # the same on every node (coord.py says why)
    return coord


def _deliver(signum: int, handler: Any, frame: Any) -> None:
    """Act as ``handler`` would for ``signum`` (SIG_DFL: die by the signal)."""
    if handler == signal.SIG_IGN:
        return
    if callable(handler):
        handler(signum, frame)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    time.sleep(5)  # the signal is delivered asynchronously; never return into training
    os._exit(128 + signum)
