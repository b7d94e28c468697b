"""A save leaves the garbage collector alone: no collection passes run inside ``Checkpointer.save``
and few collector-tracked objects outlive the call.

A full collection of a process that imported torch walks every live object (~0.2 s on this 2-core
box); before, ``save()`` of a state of 3000 tensors allocated enough objects to trigger collections
inside the call, and kept ~8 tracked objects per tensor alive until its commit, each snapshot
promoting tens of thousands of objects into the oldest generation and so triggering full passes.
"""
from __future__ import annotations

import gc
import threading

import torch

import pyckpt


def _many_tensor_state(layers: int = 500) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def test_save_runs_no_collection_passes_on_the_calling_thread(ckpt_root):
    state = _many_tensor_state()
    caller = threading.get_ident()
    passes: list[int] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start" and threading.get_ident() == caller:
            passes.append(info["generation"])

    with pyckpt.Checkpointer(ckpt_root) as ck:
        ck.save(1, state).result(120)  # warm-up: imports, engine start
        gc.collect()
        gc.callbacks.append(on_gc)
        try:
            fut = ck.save(2, state)
        finally:
            gc.callbacks.remove(on_gc)
        assert fut.result(120).endswith("step-000000002")
    # At most the one pass the collector owes for the call's allocations once it is on again
    # (before: a pass every ~700 allocations, ~100 in this call).
    assert len(passes) <= 1, passes
    assert gc.isenabled()  # given back as it was


def test_save_keeps_gc_disabled_when_the_caller_disabled_it(ckpt_root):
    state = _many_tensor_state(layers=5)
    with pyckpt.Checkpointer(ckpt_root) as ck:
        gc.disable()
        try:
            ck.save(1, state).result(120)
            assert not gc.isenabled()
        finally:
            gc.enable()


def test_few_tracked_objects_outlive_save(ckpt_root):
    state = _many_tensor_state()
    params = 2 * 500  # weights and biases
    n_tensors = params + 3 * params  # and Adam's exp_avg, exp_avg_sq, step of each
    with pyckpt.Checkpointer(ckpt_root) as ck:
        ck.save(1, state).result(120)
        gc.collect()
        gc.disable()  # counts, not collections, from here on
        try:
            before = len(gc.get_objects())
            fut = ck.save(2, state)
            alive = len(gc.get_objects()) - before
            fut.result(120)
        finally:
            gc.enable()
    assert alive < 4 * n_tensors, f"{alive} tracked objects outlive save() of {n_tensors} tensors"
