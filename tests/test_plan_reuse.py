"""Checkpointer.save reuses the previous save's plan while the tensors keep their layout (wherever
their memory now is), and plans afresh when the layout changes: every checkpoint restores the
values it was given."""
from __future__ import annotations

import torch

import pyckpt


def _sections(ck: pyckpt.Checkpointer) -> dict:
    (last,) = ck._last_plan.values()
    return last


def _restored(ck: pyckpt.Checkpointer, step: int) -> dict:
    return ck.restore(step).state


def test_in_place_updates_reuse_the_plan_and_save_the_new_values(ckpt_root):
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(20)])
    opt = torch.optim.Adam(model.parameters())
    with pyckpt.Checkpointer(ckpt_root, keep=5) as ck:
        expected = {}
        storages = []
        for step in (1, 2, 3):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
            state = {"model": model.state_dict(), "optim": opt.state_dict()}
            ck.save(step, state).result(120)
            storages.append(_sections(ck)["replicated"].storages)
            expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
        assert storages[1] is storages[0] and storages[2] is storages[0]  # planned once
        for step, want in expected.items():
            got = _restored(ck, step)["model"]
            assert all(torch.equal(got[k], want[k]) for k in want), step


def test_changed_layouts_are_planned_afresh_and_moved_tensors_read_where_they_are(ckpt_root):
    w = torch.arange(32, dtype=torch.float32)
    steps = {
        1: {"w": w, "b": torch.zeros(3)},
        2: {"w": w.view(4, 8), "b": torch.zeros(3)},                   # same memory, new shape
        3: {"w": torch.arange(32, dtype=torch.float32).view(4, 8) * 2, "b": torch.zeros(3)},  # moved
        4: {"w": w[8:], "b": torch.zeros(3)},                            # a view at another offset
        5: {"w": w[8:], "b": torch.zeros(3), "c": torch.ones(2, dtype=torch.int64)},  # one more
        6: {"w": w.view(torch.int32), "b": torch.zeros(3)},              # another dtype
    }
    with pyckpt.Checkpointer(ckpt_root, keep=10) as ck:
        seen = []
        for step, state in steps.items():
            ck.save(step, state).result(120)
            seen.append(_sections(ck)["replicated"].storages)
        assert seen[2] is seen[1]  # step 3: the layout of step 2, in other memory
        assert len({id(s) for s in seen}) == len(seen) - 1  # every other step planned afresh
        for step, state in steps.items():
            got = _restored(ck, step)
            assert got.keys() == state.keys(), step
            for k, v in state.items():
                assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), (step, k)


def test_rank_state_after_a_grown_replicated_state_is_planned_afresh(ckpt_root):
    # The rank section's pieces name chunks by index after the replicated section's chunks: when
    # the replicated section needs more chunks, the rank section's old pieces would point wrong.
    big = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB: more chunks than the small one
    rank = {"r": torch.arange(10, dtype=torch.int64)}
    with pyckpt.Checkpointer(ckpt_root, keep=5) as ck:
        ck.save(1, {"x": torch.ones(4)}, rank_state=rank).result(120)
        first = _sections(ck)["rank"].storages
        ck.save(2, {"x": torch.ones(4), "big": big}, rank_state=rank).result(120)
        assert _sections(ck)["rank"].storages is not first
        r = ck.restore(2)
        assert torch.equal(r.rank_state["r"], rank["r"]) and torch.equal(r.state["big"], big)


def test_a_finished_save_keeps_neither_the_callers_tensors_nor_its_state_tree(ckpt_root):
    """Only the layout is kept for the next save: the memory of a tensor saved once is the caller's
    to free as soon as its save finished (it was held until the next save), and the state tree and
    key paths are dropped by the commit thread, not at the training thread's next save."""
    import gc
    import weakref

    with pyckpt.Checkpointer(ckpt_root, keep=5) as ck:
        big = torch.randn(1 << 20)
        gone = weakref.ref(big)
        ck.save(1, {"w": big, "n": 3}).result(120)
        del big
        gc.collect()
        assert gone() is None
        rep = _sections(ck)["replicated"]
        assert rep.tree is None and rep.paths == [] and rep.described.bases == []
        again = torch.randn(1 << 20)
        ck.save(2, {"w": again, "n": 4}).result(120)  # the layout is still reused
        assert _sections(ck)["replicated"].storages is rep.storages
        out = _restored(ck, 2)
        assert torch.equal(out["w"], again) and out["n"] == 4
