"""FSDP2 (fully_shard, DTensor) through the explicit API, real gloo ranks: each rank writes only its
own shards; restore on the same (2), fewer (1) and more (1 -> 2) ranks re-cuts them, and the restored
parameters and optimizer state equal the saved ones bitwise (compared as gathered full state dicts).

The layers have uneven row counts (7 and 3 over 2 ranks) so the saved and wanted boxes differ, and a
8 MiB layer with 1 MiB chunks so a rank reading half of it reads only the chunks of that half."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyckpt
from pyckpt import inspection, manifest
from pyckpt.errors import CorruptCheckpointError

pytestmark = pytest.mark.dist


def build(seed, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 512),
                            torch.nn.ReLU(), torch.nn.Linear(512, 4096), torch.nn.Linear(4096, 3))
    mesh = init_device_mesh("cpu", (world,))
    for sub in (m[0], m[4]):  # submodules, then the root: mixed fully_shard
        fully_shard(sub, mesh=mesh)
    fully_shard(m, mesh=mesh)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    return m, opt


def full(m, opt):
    """Gathered full state dict as plain CPU tensors (name -> tensor), on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(m, opt, options=StateDictOptions(full_state_dict=True))
    out = {f"model/{k}": v.detach().clone() for k, v in msd.items()}
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            out[f"optim/{fqn}/{k}"] = v.detach().clone() if isinstance(v, torch.Tensor) else torch.tensor(v)
    out["lr"] = torch.tensor(osd["param_groups"][0]["lr"])
    return out


def same(a, b):
    """Bitwise equal (dtype, shape, bytes) for every key."""
    def raw(t):
        return t.reshape(-1).view(torch.uint8)

    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                          and torch.equal(raw(a[k]), raw(b[k])) for k in a)


def _worker(rank, world, tmp, job):
    os.environ["PYCKPT_CHUNK_MB"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv-{job}", rank=rank, world_size=world)
    try:
        import pyckpt
        from pyckpt.coord import StoreCoordinator
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        from torch.distributed.tensor import Shard, distribute_tensor

        out = {}
        coord = StoreCoordinator(timeout_s=120)
        if job == "train":
            m, opt = build(0, world)
            sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
            torch.manual_seed(1 + rank)
            for _ in range(2):
                m(torch.randn(4, 5)).square().mean().backward()
                opt.step()
                opt.zero_grad()
                sched.step()
            ref = full(m, opt)
            if rank == 0:
                torch.save(ref, f"{tmp}/ref.pt")
            msd, osd = get_state_dict(m, opt)
            cols = distribute_tensor(torch.arange(60.0).reshape(6, 10), m[0].weight.device_mesh, [Shard(1)])
            with pyckpt.Checkpointer(f"{tmp}/a", coordinator=coord) as ck:
                ck.save(1, {"model": msd, "optim": osd, "cols": cols}).result(120)
                ck.save(2, {"model": msd, "optim": osd, "cols": cols}).result(120)  # unchanged: incremental
        src = {"train": "a", "to1": "a", "to2": "b"}[job]
        m, opt = build(7, world)  # other weights: everything must come from the checkpoint
        msd, osd = get_state_dict(m, opt)
        ck = pyckpt.Checkpointer(f"{tmp}/{src}", coordinator=coord)
        r = ck.restore(into={"model": msd, "optim": osd})
        out["in_place"] = r.state["model"]["4.weight"] is msd["4.weight"]
        set_state_dict(m, opt, model_state_dict=r.state["model"], optim_state_dict=r.state["optim"])
        ref = torch.load(f"{tmp}/ref.pt")
        out["equal"] = same(full(m, opt), ref)
        if job == "to2":  # each rank reads only (about) the half of the chunks its new shards lie in
            from pyckpt import reader
            from pyckpt._native import get_engine

            spy = _CountingEngine(get_engine())
            op = reader.open_checkpoint(r.path)
            reader.load_section(spy, op, "replicated", 0, {"model": msd, "optim": osd})
            out["read_fraction"] = spy.raw / sum(c["raw_len"] for p in op.parts for c in p["chunks"])
        if job == "to1":
            plain = ck.restore().state  # no targets: whole tensors come back as plain tensors
            out["plain_equal"] = torch.equal(plain["model"]["0.weight"], ref["model/0.weight"]) and \
                torch.equal(plain["optim"]["state"]["4.weight"]["exp_avg"], ref["optim/4.weight/exp_avg"]) and \
                torch.equal(plain["cols"], torch.arange(60.0).reshape(6, 10))  # column shards: strided boxes
            with pyckpt.Checkpointer(f"{tmp}/b", coordinator=coord) as ck1:
                ck1.save(2, {"model": r.state["model"], "optim": r.state["optim"]}).result(120)
        ck.close()
        with open(f"{tmp}/{job}{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


class _CountingEngine:
    """The real engine, counting the decoded bytes of the chunks each read asks for."""

    def __init__(self, engine):
        self.engine, self.raw = engine, 0

    def read(self, files, chunks, *args, **kwargs):
        self.raw += sum(c[3] for c in chunks)
        return self.engine.read(files, chunks, *args, **kwargs)


def _tamper(ckpt, rank, fn):
    """Edit rank ``rank``'s part with ``fn`` and re-seal it (valid checksums, hostile content)."""
    path = ckpt / f"rank-{rank:05d}.json"
    part = json.loads(path.read_text())
    fn(part)
    raw = json.dumps(part).encode()
    path.write_bytes(raw)
    m = json.loads((ckpt / "MANIFEST.json").read_text())
    m["parts"][rank].update(nbytes=len(raw), crc32c=manifest.crc32c(raw))
    (ckpt / "MANIFEST.json").write_bytes(manifest.seal(m))


def _run(tmp, world, job):
    mp.spawn(_worker, args=(world, str(tmp), job), nprocs=world, join=True)
    return [json.loads((tmp / f"{job}{r}.json").read_text()) for r in range(world)]


def test_fsdp2_save_restore_same_fewer_and_more_ranks(tmp_path):
    for out in _run(tmp_path, 2, "train"):  # 2 -> 2
        assert out == {"in_place": True, "equal": True}
    ckpt = tmp_path / "a" / "step-000000001"
    parts = [json.loads((ckpt / f"rank-0000{r}.json").read_text()) for r in range(2)]
    m = json.loads((ckpt / "MANIFEST.json").read_text())
    assert m["format_version"] == [1, 3]
    # Each rank wrote its own rows of every parameter and optimizer moment, no full copy.
    entry = [t for t in parts[1]["sharded"]["tensors"] if t["key"] == ["model", "4.weight"]][0]
    assert entry["shape"] == [4096, 512] and entry["shards"][0]["offsets"] == [2048, 0]
    assert [t["key"] for t in parts[0]["sharded"]["tensors"]] == [t["key"] for t in parts[1]["sharded"]["tensors"]]
    sizes = [os.path.getsize(ckpt / f"rank-0000{r}" / "data-000.bin") for r in range(2)]
    total = 3 * 4 * (5 * 7 + 7 + 7 * 512 + 512 + 512 * 4096 + 4096 + 4096 * 3 + 3)  # params + two moments
    assert abs(sizes[0] - sizes[1]) < 0.1 * total and sum(sizes) < total * 1.05

    out = _run(tmp_path, 1, "to1")[0]  # 2 -> 1
    assert out == {"in_place": True, "equal": True, "plain_equal": True}
    for out in _run(tmp_path, 2, "to2"):  # 1 -> 2 (the checkpoint the single rank wrote)
        assert out["read_fraction"] < 0.8, out
        assert out == {"in_place": True, "equal": True, "read_fraction": out["read_fraction"]}

    # The second, unchanged save references the first one's shard chunks (incremental) and restored
    # above (the newest) through them.
    inc = json.loads((tmp_path / "a" / "step-000000002" / "rank-00001.json").read_text())
    assert inc["sharded"] and all(c["file"].startswith("../step-000000001/") for c in inc["chunks"])

    # Offline: one process without a process group consolidates the sharded checkpoint.
    ref = torch.load(tmp_path / "ref.pt")
    whole = pyckpt.load(ckpt)
    assert torch.equal(whole["model"]["4.weight"], ref["model/4.weight"])
    text = inspection.render(inspection.summarize(str(ckpt)))  # pyckpt inspect lists every rank's shards
    assert "4.weight  F32 [4096, 512]  8.0 MiB" in text and "rank 0,1" in text, text

    # Hostile parts: every offset and shape is checked before use.
    def key4(p):
        return [t for t in p["sharded"]["tensors"] if t["key"] == ["model", "4.weight"]][0]

    def off(p, v):
        key4(p)["shards"][0]["offsets"] = v

    def shape(p, v):
        key4(p)["shards"][0]["shape"] = v

    def glob(p):
        key4(p)["shape"] = [4096, 513]

    cases = [(lambda p: off(p, [3000, 0]), "outside the global shape"),
             (lambda p: off(p, [-1, 0]), "integers in [0, 2**63)"),
             (lambda p: off(p, [0, 0]), "overlap"),  # rank 1's rows claimed at rank 0's place
             (lambda p: shape(p, [255, 512]), "holds"),
             (lambda p: off(p, [256]), "dimensions"),
             (glob, "other sharded tensors"),
             (lambda p: key4(p).update(key=["model", 1.5]), "key must be"),
             (lambda p: key4(p)["shards"][0].update(storage=99), "out of range")]
    for i, (fn, why) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(ckpt, bad)
        _tamper(bad, 1, fn)
        with pytest.raises(CorruptCheckpointError, match=re.escape(why)):
            pyckpt.load(bad)

    # A checkpoint missing one rank's files is never chosen, and verify names the missing file.
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    os.remove(broken / "rank-00001" / "data-000.bin")
    res = subprocess.run([sys.executable, "-m", "pyckpt", "verify", str(broken)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1 and "rank-00001/data-000.bin" in res.stdout + res.stderr
