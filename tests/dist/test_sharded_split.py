"""The DTensor search of ``Checkpointer.save`` (sharded.split) with a process group up, as in every
DDP or FSDP2 job: the state is encoded first and the search reads its tensor list, so these hold
whichever way the search goes: a plain state is saved whole, a DTensor in it is saved as its rank's
shards beside the plain tensors, and a DTensor where no shard record can name it is refused before
anything is written."""
import json
import os

import pytest
import torch
import torch.distributed as dist

import pyckpt
from pyckpt.errors import UnsupportedStateError

pytestmark = pytest.mark.dist


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg-store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _dtensor(values):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(values, init_device_mesh("cpu", (1,)), [Shard(0)])


def test_plain_state_with_a_process_group_round_trips(group, tmp_path):
    state = {"w": torch.arange(12.0).reshape(3, 4), "opt": {0: {"m": torch.ones(5), "step": 3}}, "lr": 0.5}
    ck = pyckpt.Checkpointer(str(tmp_path / "ck"))
    ck.save(1, state).result()
    into = {"w": torch.zeros(3, 4), "opt": {0: {"m": torch.zeros(5), "step": 0}}, "lr": 0.0}
    out = ck.load(into=into)
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["opt"][0]["m"], state["opt"][0]["m"])
    assert out["opt"][0]["step"] == 3 and out["lr"] == 0.5
    ck.close()


def test_dtensor_beside_plain_tensors_is_saved_as_shards_and_restored(group, tmp_path):
    full = torch.arange(24.0).reshape(6, 4)
    state = {"plain": torch.full((3,), 7.0), "sharded": _dtensor(full.clone())}
    ck = pyckpt.Checkpointer(str(tmp_path / "ck"))
    ck.save(2, state).result()
    with open(tmp_path / "ck" / "step-000000002" / "rank-00000.json") as f:
        part = json.load(f)
    # The DTensor went to the shard records (docs/FORMAT.md §12), its place in the tree holds null.
    assert [e["key"] for e in part["sharded"]["tensors"]] == [["sharded"]]
    assert part["replicated"]["tree"]["sharded"] is None
    into = {"plain": torch.zeros(3), "sharded": _dtensor(torch.zeros(6, 4))}
    out = ck.load(into=into)
    assert torch.equal(out["plain"], state["plain"])
    assert torch.equal(out["sharded"].full_tensor(), full)
    ck.close()


@pytest.mark.parametrize("where, says", [
    ("tuple", "inside the tuple"),
    ("float_key", "only string and integer keys"),
])
def test_dtensor_that_no_shard_record_can_name_is_refused_before_anything_is_written(group, tmp_path, where, says):
    dt = _dtensor(torch.ones(4, 2))
    state = {"a": {"pair": (dt, 1)}} if where == "tuple" else {"a": {1.5: dt}}
    ck = pyckpt.Checkpointer(str(tmp_path / "ck"))
    with pytest.raises(UnsupportedStateError, match=says):
        ck.save(3, state)
    assert not [n for n in os.listdir(tmp_path / "ck") if n.startswith("step-")]
    ck.close()


def _without_coordinator(rank, world, tmp):
    """One rank of a 2-rank gloo job using the explicit API without ``coordinator=``: (a) every rank
    makes a Checkpointer of the same directory; (b) rank 0 alone saves FSDP2-sharded state."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=world)
    out = {}
    try:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        try:
            ck = pyckpt.Checkpointer(f"{tmp}/every")
            dist.barrier()  # both constructed (or refused) before either releases the directory
            ck.close()
            out["every"] = None
        except pyckpt.PyckptError as e:
            dist.barrier()
            out["every"] = str(e)
        torch.manual_seed(0)
        m = torch.nn.Linear(8, 6)
        fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
        opt = torch.optim.Adam(m.parameters())
        m(torch.randn(2, 8)).sum().backward()
        opt.step()
        msd, osd = get_state_dict(m, opt)  # collective: every rank
        if rank == 0:
            with pyckpt.Checkpointer(f"{tmp}/alone") as ck:
                try:
                    ck.save(1, {"model": msd, "optim": osd}).result(60)
                    out["alone"] = None
                except UnsupportedStateError as e:
                    out["alone"] = str(e)
            out["alone_dirs"] = sorted(n for n in os.listdir(f"{tmp}/alone") if n.startswith("step-"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(f"{tmp}/out{rank}.json", "w") as f:
        json.dump(out, f)


def test_explicit_api_without_coordinator_in_a_multi_rank_job_says_what_to_do_and_commits_nothing_partial(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_without_coordinator, args=(2, str(tmp_path)), nprocs=2, join=True)
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    # (a) one rank got the directory; the other is refused with the way out named
    refused = [o["every"] for o in outs if o["every"] is not None]
    assert len(refused) == 1
    assert "in use" in refused[0] and "of 2" in refused[0] and "coordinator=pyckpt.StoreCoordinator()" in refused[0]
    # (b) half of each sharded tensor: refused before anything is written, no checkpoint committed
    assert outs[0]["alone"] is not None and "from this rank alone" in outs[0]["alone"]
    assert "coordinator=pyckpt.StoreCoordinator()" in outs[0]["alone"]
    assert outs[0]["alone_dirs"] == []
