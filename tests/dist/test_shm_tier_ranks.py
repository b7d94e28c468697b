"""The memory tier with two real ranks (gloo) on one machine: rank 0's retention parks every rank's
evicted data file, and each rank's next snapshot writes over its own (tmpfs pages reused); every
snapshot and every storage copy of one stays exact."""
import os
import shutil

import pytest
import torch
import torch.distributed as dist

from gloo_ranks import run_ranks

pytestmark = pytest.mark.dist


def _ranks(rank, world, tmp):
    os.environ["PYCKPT_CHUNK_MB"] = "1"
    from pyckpt import knobs, layout, shm_tier
    from pyckpt.checkpointer import Checkpointer
    from pyckpt.coord import StoreCoordinator

    big = torch.zeros(1 << 20)  # 4 MiB, replicated: each rank writes its share
    mine = torch.zeros(1 << 18)  # 1 MiB per rank
    out = {"inodes": [], "tier_ok": [], "storage_ok": []}
    with knobs.override(PYCKPT_SHM_MB=64):
        ck = Checkpointer(f"{tmp}/ck", coordinator=StoreCoordinator(timeout_s=120))
        tier = shm_tier.tier_for(ck, ck.coord)
        for step in range(1, 7):
            big.fill_(float(step))
            mine.fill_(float(100 * rank + step))
            f = tier.save(step, {"big": big}, {"mine": mine})
            if step % 2 == 0:
                assert tier.publish(f, ck, step).result(120)
            snap = f.result(120)
            data = os.path.join(snap, layout.data_file_name(rank))
            out["inodes"].append(os.stat(data).st_ino)
            r = tier.ckpt.restore(step)
            out["tier_ok"].append(torch.equal(r.state["big"], big) and torch.equal(r.rank_state["mine"], mine))
        dist.barrier()
        for step in (4, 6):
            r = ck.restore(step)
            out["storage_ok"].append(torch.equal(r.state["big"], torch.full((1 << 20,), float(step)))
                                     and torch.equal(r.rank_state["mine"],
                                                     torch.full((1 << 18,), float(100 * rank + step))))
        dist.barrier()
        if rank == 0:
            shutil.rmtree(tier.path, ignore_errors=True)
        ck.close()
    return out


def test_each_rank_writes_its_snapshot_over_its_own_evicted_file(tmp_path):
    for rank, out in enumerate(run_ranks(_ranks, 2, tmp_path)):
        assert out["tier_ok"] == [True] * 6 and out["storage_ok"] == [True, True]
        ino = out["inodes"]
        assert ino[0] != ino[1] and all(ino[k] == ino[k - 2] for k in range(2, 6)), (rank, ino)


def _other_machine(rank, world, tmp):
    """As under a launcher that sets no LOCAL_WORLD_SIZE (srun, mpirun): rank 1 sees another /dev/shm
    (another machine, or another container), which only the ranks themselves can tell."""
    import contextlib
    import io

    del os.environ["LOCAL_WORLD_SIZE"]
    from pyckpt import knobs, shm_tier
    from pyckpt.checkpointer import Checkpointer
    from pyckpt.coord import StoreCoordinator

    here = getattr(shm_tier, "_machine_id", None)  # (absent before the tier compared machines)
    if rank == 1 and here is not None:
        shm_tier._machine_id = lambda: here() + "-elsewhere"
    err = io.StringIO()
    with knobs.override(PYCKPT_SHM_MB=64), contextlib.redirect_stderr(err):
        ck = Checkpointer(f"{tmp}/ck", coordinator=StoreCoordinator(timeout_s=120))
        tier = shm_tier.tier_for(ck, ck.coord)
        path = shm_tier.shm_path(f"{tmp}/ck")
        out = {"tier": tier is not None, "made": os.path.exists(path), "stderr": err.getvalue()}
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        ck.close()
    return out


def test_the_tier_is_off_when_ranks_see_different_shm_even_without_local_world_size(tmp_path):
    # Each machine's ranks would commit into their own /dev/shm: rank 0's commit renames only its
    # machine's copy, the others' tmp directories pile up in memory, and every storage copy fails.
    outs = run_ranks(_other_machine, 2, tmp_path)
    assert [o["tier"] for o in outs] == [False, False], outs
    assert not outs[0]["made"], outs
    assert outs[0]["stderr"].count("pyckpt: warning: memory tier off:") == 1, outs[0]["stderr"]
    assert "more than one machine" in outs[0]["stderr"] and outs[1]["stderr"] == "", outs
