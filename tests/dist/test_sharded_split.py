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
