"""ZeroRedundancyOptimizer (ZeRO-1) on 2 real gloo ranks through the explicit API: each rank saves the
optimizer state of the parameters it owns (no consolidate_state_dict gather), and a fresh model and
optimizer restored from it continue bitwise like the uninterrupted run."""
import json
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.dist


def _build(seed):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(seed)
    m = DDP(torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                                torch.nn.Linear(16, 2)))
    opt = ZeroRedundancyOptimizer(m.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2)
    return m, opt, torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7)


def _one_rank(rank, tmp):
    """2 -> 1: every saved rank's share loads into one ZeRO, which then owns every parameter."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv1", rank=0, world_size=1)
    try:
        from pyckpt import sharded

        m, opt, _ = _build(1)
        states = sharded.rank_states(f"{tmp}/root/step-000000003")
        sharded.load_zero_state_dict(opt, [rs["zero"] for rs in states])
        saved = {}
        for r in range(2):
            saved.update(torch.load(f"{tmp}/zero{r}.pt")["state"])
        params = [p for g in opt.param_groups for p in g["params"]]
        ok = sorted(saved) == list(range(len(params))) and all(
            torch.equal(opt.optim.state[params[i]][k], v[k]) for i, v in saved.items() for k in v)
        with open(f"{tmp}/one.json", "w") as f:
            json.dump({"equal": ok, "lr": opt.param_groups[0]["lr"]}, f)
    finally:
        dist.destroy_process_group()


def _worker(rank, world, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=world)
    try:
        import pyckpt
        from pyckpt import sharded
        from pyckpt.coord import StoreCoordinator

        build = _build

        def train(m, opt, sched, steps):
            for s in steps:
                g = torch.Generator().manual_seed(100 * s + rank)
                m(torch.randn(8, 6, generator=g)).square().mean().backward()
                opt.step()
                opt.zero_grad()
                sched.step()

        m, opt, sched = build(0)
        train(m, opt, sched, range(3))
        mine = sharded.zero_state_dict(opt)
        torch.save({"state": {k: {n: t.clone() for n, t in v.items()} for k, v in mine["state"].items()}},
                   f"{tmp}/zero{rank}.pt")
        with pyckpt.Checkpointer(f"{tmp}/root", coordinator=StoreCoordinator(timeout_s=120)) as ck:
            ck.save(3, {"model": m.state_dict(), "sched": sched.state_dict()}, rank_state={"zero": mine}).result(120)
            train(m, opt, sched, range(3, 5))
            plain = [p.detach().clone() for p in m.parameters()]

            m2, opt2, sched2 = build(1)
            r = ck.restore()
        m2.load_state_dict(r.state["model"])
        sched2.load_state_dict(r.state["sched"])
        sharded.load_zero_state_dict(opt2, r.rank_state["zero"])
        train(m2, opt2, sched2, range(3, 5))
        out = {"equal": all(torch.equal(a, b) for a, b in zip(plain, m2.parameters())),
               "owned": sorted(mine["state"]), "n": len(list(m.parameters())), "lr": opt2.param_groups[0]["lr"]}
        try:
            sharded.load_zero_state_dict(opt2, dict(mine, world_size=4))
        except pyckpt.PyckptError as e:
            out["refused"] = str(e)
        with open(f"{tmp}/out{rank}.json", "w") as f:
            json.dump(out, f)
        _let_gloo_threads_drop_their_work()
    finally:
        dist.destroy_process_group()


def _let_gloo_threads_drop_their_work() -> None:
    """Release the GIL for a moment after the last ZeRO step, before this process exits.

    ZeroRedundancyOptimizer broadcasts ``param.data`` (a new tensor object each time) with
    ``async_op=True``; gloo's worker thread drops its reference to the finished work a moment after
    ``wait()`` returns, and then needs the GIL to free that tensor's Python object. On a loaded machine
    that moment can come after the interpreter has begun to finalize: the thread is ended as it takes
    the GIL, inside a destructor, and the process aborts ("terminate called without an active
    exception", SIGABRT) after its work is done; this test failed so twice in full-suite runs. Plain
    torch does it too, without pyckpt: DDP + ZeRO on gloo, three steps, the GIL held after the last
    one and an object freed late in finalization aborted 3 runs in 10; with a 0.2 s sleep first, 0."""
    time.sleep(0.5)


def test_zero1_two_ranks_exact_resume_without_gather_and_on_one_rank(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    assert all(o["equal"] for o in outs)
    # Each rank saved only the parameters it owns: disjoint, together all of them.
    a, b = set(outs[0]["owned"]), set(outs[1]["owned"])
    assert a and b and not a & b and a | b == set(range(outs[0]["n"]))
    assert outs[0]["lr"] == pytest.approx(1e-2 * 0.7 ** 5)
    assert "saved by one of 4 ranks, this job has 2" in outs[0]["refused"]
    mp.spawn(_one_rank, args=(str(tmp_path),), nprocs=1, join=True)
    one = json.loads((tmp_path / "one.json").read_text())
    assert one == {"equal": True, "lr": pytest.approx(1e-2 * 0.7 ** 3)}
