"""Two real ranks (gloo): replicated state written once, rank_state per rank, agreed restore."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.dist

SIZES = [300_000, 200_000, 100_000, 50_000, 1000, 10, 10, 7]  # float32 elements


def replicated():
    return {"model": {f"p{i}": torch.arange(n, dtype=torch.float32) * (i + 1) for i, n in enumerate(SIZES)},
            "optim": {"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}}


def _worker(rank, world, tmp):
    os.environ["PYCKPT_CHUNK_MB"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        import pyckpt
        from pyckpt.coord import StoreCoordinator

        # incremental=False: the sizes checked below are those of full saves (each one self-contained).
        ck = pyckpt.Checkpointer(f"{tmp}/root", keep=2, coordinator=StoreCoordinator(timeout_s=120), incremental=False)
        try:  # a bad value on one rank must stop the save on every rank, not hang the others
            ck.save(0, replicated(), rank_state={"x": object()} if rank == 1 else {"ok": 1})
            unsupported = None
        except pyckpt.UnsupportedStateError as e:
            unsupported = [str(e), e.key]
        for step in (1, 2, 3):
            rs = {"rank": rank, "rng": torch.tensor([rank, step], dtype=torch.int64)}
            paths = ck.save(step, replicated(), rank_state=rs).result(120)
        dist.barrier()
        r = ck.restore(into={"model": {k: torch.zeros_like(v) for k, v in replicated()["model"].items()}})
        ok = all(torch.equal(r.state["model"][k], v) for k, v in replicated()["model"].items())
        ok = ok and torch.equal(r.state["optim"]["state"][0]["step"], torch.tensor(5.0))
        out = {"path": paths, "step": r.step, "ok": ok, "rank_state": [r.rank_state["rank"], r.rank_state["rng"].tolist()],
               "latest": ck.latest().step, "unsupported": unsupported}
        with open(f"{tmp}/out{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_write_replicated_state_once(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    for rank, out in enumerate(outs):
        assert out["ok"] and out["step"] == 3 and out["latest"] == 3
        assert out["rank_state"] == [rank, [rank, 3]]
    assert outs[0]["path"] == outs[1]["path"]
    assert outs[1]["unsupported"][1] == "x" and outs[0]["unsupported"][1] == "x"
    assert "rank 1" in outs[0]["unsupported"][0]
    ckpt = tmp_path / "root" / "step-000000003"
    assert sorted(os.listdir(tmp_path / "root")) == [".pyckpt.lock", "latest", "metrics.jsonl", "step-000000002", "step-000000003"]
    parts = [json.loads((ckpt / f"rank-0000{r}.json").read_text()) for r in range(2)]
    rep = [{s["id"] for s in p["storages"] if s["scope"] == "replicated"} for p in parts]
    assert rep[0] and rep[1] and not (rep[0] & rep[1])  # each storage written by exactly one rank
    assert len(rep[0] | rep[1]) == parts[0]["replicated"]["num_storages"]
    data = [os.path.getsize(ckpt / f"rank-0000{r}" / "data-000.bin") for r in range(2)]
    one_copy = sum(SIZES) * 4 + 4 + 2 * 16  # + the optimizer step scalar + the two rank_state tensors
    assert one_copy <= sum(data) <= one_copy + 8 * 4096  # one copy plus chunk alignment, not two copies
    assert min(data) > 0.3 * one_copy  # the work is shared between the ranks


def _rank_main(rank, world, tmp, tag, body):
    """One spawned gloo rank: ``body(rank, tmp)``'s dict goes to ``{tmp}/{tag}{rank}.json``."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv-{tag}", rank=rank, world_size=world)
    try:
        out = body(rank, tmp)
    finally:
        dist.destroy_process_group()
    with open(f"{tmp}/{tag}{rank}.json", "w") as f:
        json.dump(out, f)


def _on_two_ranks(tmp_path, tag, body) -> list[dict]:
    mp.spawn(_rank_main, args=(2, str(tmp_path), tag, body), nprocs=2, join=True)
    return [json.loads((tmp_path / f"{tag}{r}.json").read_text()) for r in range(2)]


def _unlike(rank, tmp):
    """Each case: rank 1's replicated state differs from rank 0's in one way; then both agree again;
    then the states agree and the steps do not."""
    import pyckpt
    from pyckpt.coord import StoreCoordinator

    def state(case):
        a, b = torch.full((5000,), 1.0), torch.full((5000,), 2.0)
        if rank == 1 and case == "key":
            return {"a": a}
        if rank == 1 and case == "order":  # same tensors, other order: storages would be swapped
            return {"b": b, "a": a}
        if rank == 1 and case == "dtype":  # same bytes per storage: values would be read as the wrong type
            return {"a": a, "b": b.to(torch.int32)}
        if rank == 1 and case == "stride":
            return {"a": a, "b": b.reshape(50, 100).t()}
        return {"a": a, "b": b if case != "stride" else b.reshape(50, 100)}

    out = {}
    with pyckpt.Checkpointer(f"{tmp}/root", coordinator=StoreCoordinator(timeout_s=120)) as ck:
        for step, case in enumerate(("key", "order", "dtype", "stride", "alike"), 1):
            try:
                ck.save(step, state(case)).result(120)
                out[case] = None
            except pyckpt.UnsupportedStateError as e:
                out[case] = str(e)
        try:  # alike states, but each rank names its own step
            ck.save(10 + rank, state("alike")).result(120)
            out["steps"] = None
        except ValueError as e:
            out["steps"] = str(e)
        out["committed"] = [c.step for c in pyckpt.list(f"{tmp}/root")]
    return out


def test_a_save_whose_ranks_hold_unlike_states_or_steps_is_refused_on_every_rank_before_it_writes(tmp_path):
    for out in _on_two_ranks(tmp_path, "unlike", _unlike):
        for case in ("key", "order", "dtype", "stride"):
            assert out[case] is not None and "rank 1's state is laid out unlike rank 0's" in out[case], case
        assert out["alike"] is None
        assert out["steps"] is not None and "rank 0: 10, rank 1: 11" in out["steps"]
        assert out["committed"] == [5]  # only the save whose ranks agreed


def _apart(rank, tmp):
    """Each rank names its own directory (as ranks on nodes without a shared file system would,
    with the same path): rank 0 cannot see rank 1's part."""
    import pyckpt
    from pyckpt.coord import StoreCoordinator

    out = {}
    with pyckpt.Checkpointer(f"{tmp}/root{rank}", coordinator=StoreCoordinator(timeout_s=120)) as ck:
        try:
            ck.save(1, {"a": torch.ones(1000), "b": torch.zeros(1000)}).result(120)
            out["error"] = None
        except pyckpt.PyckptError as e:
            out["error"] = str(e)
    out["committed"] = [c.step for c in pyckpt.list(f"{tmp}/root{rank}", verify=False) if c.complete]
    return out


def test_ranks_saving_into_directories_rank_0_cannot_see_commit_nothing(tmp_path):
    for out in _on_two_ranks(tmp_path, "apart", _apart):
        assert out["error"] is not None and "part file of rank 1 is not in" in out["error"]
        assert "same directory" in out["error"]
        assert out["committed"] == []
