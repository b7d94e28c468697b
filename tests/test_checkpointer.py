"""Checkpointer: async saves, capture semantics, retention, latest, staging limits, failures."""
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pyckpt
import zygote
from pyckpt import _native, layout
from pyckpt.errors import CheckpointNotFoundError, StagingTimeoutError, UnsupportedStateError


def state_for(step, n=1000):
    return {"model": {"w": torch.arange(n, dtype=torch.float32) + step, "b": torch.full((3,), step)},
            "optim": {"state": {0: {"m": torch.ones(n) * step}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "step": step}


def assert_state_equal(a, b):
    assert torch.equal(a["model"]["w"], b["model"]["w"]) and torch.equal(a["model"]["b"], b["model"]["b"])
    assert torch.equal(a["optim"]["state"][0]["m"], b["optim"]["state"][0]["m"])
    assert a["optim"]["param_groups"] == b["optim"]["param_groups"] and a["step"] == b["step"]


def test_save_restore_roundtrip_with_rank_state(ckpt_root):
    ck = pyckpt.Checkpointer(ckpt_root)
    fut = ck.save(10, state_for(10), rank_state={"rng": torch.tensor([1, 2], dtype=torch.uint8), "epoch": 4})
    assert fut.captured(60)
    path = fut.result(60)
    assert fut.done() and path == os.path.join(ckpt_root, "step-000000010")
    info = ck.latest()
    assert info.step == 10 and info.path == path and info.time > 0
    r = ck.restore()
    assert r.step == 10 and r.path == path
    assert_state_equal(r.state, state_for(10))
    assert r.rank_state["epoch"] == 4 and r.rank_state["rng"].tolist() == [1, 2]
    assert_state_equal(ck.load(), state_for(10))
    assert_state_equal(pyckpt.load(ckpt_root), state_for(10))  # a root loads its latest


def test_restore_into_and_specific_step(ckpt_root):
    ck = pyckpt.Checkpointer(ckpt_root, keep=5)
    ck.save(1, state_for(1)).result(60)
    ck.save(2, state_for(2)).result(60)
    dest = state_for(0)
    w = dest["model"]["w"]
    out = ck.restore(step=1, into=dest)
    assert out.state["model"]["w"] is w and torch.equal(w, state_for(1)["model"]["w"])
    with pytest.raises(CheckpointNotFoundError):
        ck.restore(step=3)


def test_tensors_may_change_once_captured(ckpt_root, knob_env):
    knob_env(PYCKPT_CHUNK_MB=1, PYCKPT_TEST_WRITE_DELAY_MS=100)
    t = torch.arange(2_000_000, dtype=torch.float32)  # 8 chunks, each write delayed
    expected = t.clone()
    ck = pyckpt.Checkpointer(ckpt_root)
    fut = ck.save(1, {"t": t})
    assert fut.captured(60)
    assert not fut.done()  # still writing: the overwrite below races with the writes
    t.fill_(-1.0)
    fut.result(60)
    assert torch.equal(ck.load()["t"], expected)


def test_retention_keeps_newest(ckpt_root):
    ck = pyckpt.Checkpointer(ckpt_root, keep=2)
    for s in (1, 2, 3, 4):
        ck.save(s, state_for(s)).result(60)
    assert sorted(os.listdir(ckpt_root)) == [".pyckpt.lock", "latest", "metrics.jsonl", "step-000000003", "step-000000004"]
    assert_state_equal(ck.load(step=3), state_for(3))


@pytest.mark.parametrize("damage", ["missing", "garbage", "stale", "older"])
def test_latest_pointer_fallback(ckpt_root, damage):
    ck = pyckpt.Checkpointer(ckpt_root, keep=3)
    ck.save(1, state_for(1)).result(60)
    ck.save(2, state_for(2)).result(60)
    ptr = os.path.join(ckpt_root, "latest")
    if damage == "missing":
        os.remove(ptr)
    elif damage == "garbage":
        with open(ptr, "wb") as f:
            f.write(b"\x00garbage")
    elif damage == "stale":
        with open(ptr, "w") as f:
            f.write("step-000000099\n")
    else:
        with open(ptr, "w") as f:
            f.write("step-000000001\n")
    assert ck.latest().step == 2
    ck.close()
    assert_state_equal(pyckpt.Checkpointer(ckpt_root).load(), state_for(2))


def test_incomplete_dirs_are_ignored_and_collected(ckpt_root):
    ck = pyckpt.Checkpointer(ckpt_root)
    ck.save(1, state_for(1)).result(60)
    orphan = os.path.join(ckpt_root, "step-000000005")  # no manifest: half deleted by an older pyckpt
    os.makedirs(os.path.join(orphan, "rank-00000"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = os.path.join(ckpt_root, f"step-000000004.tmp-{int(dead.stdout)}xdead")
    os.makedirs(stale)
    assert ck.latest().step == 1
    ck.save(2, state_for(2)).result(60)
    assert not os.path.exists(stale) and not os.path.exists(orphan)
    assert ck.latest().step == 2


def test_unsupported_state_raises_and_writes_nothing(ckpt_root):
    ck = pyckpt.Checkpointer(ckpt_root)
    with pytest.raises(UnsupportedStateError) as ei:
        ck.save(1, {"model": {"w": torch.ones(1)}}, rank_state={"sampler": {"it": iter([1])}})
    assert ei.value.key == "sampler/it"
    assert os.listdir(ckpt_root) == [".pyckpt.lock"]
    assert ck.latest() is None


def test_second_save_while_writing_is_skipped_after_timeout(ckpt_root, knob_env, caplog):
    knob_env(PYCKPT_CHUNK_MB=1, PYCKPT_TEST_WRITE_DELAY_MS=200, PYCKPT_STAGING_TIMEOUT_S=0.2)
    ck = pyckpt.Checkpointer(ckpt_root)
    first = ck.save(1, {"t": torch.zeros(2_000_000)})  # 8 chunks x 200 ms
    with caplog.at_level(logging.WARNING, logger="pyckpt"):
        second = ck.save(2, {"t": torch.ones(10)})
    assert second.done() and second.captured(0)
    with pytest.raises(StagingTimeoutError):
        second.result(0)
    assert "step 2 skipped" in caplog.text
    assert first.result(60).endswith("step-000000001")
    assert ck.wait(60)
    assert ck.latest().step == 1


def test_saves_from_several_threads_at_once_are_taken_one_after_another(ckpt_root):
    """Three threads share one Checkpointer (a training loop, an evaluation callback, a watchdog). Their
    saves used to overlap: two saw no save in flight, and one save's clean-up removed the other's
    temporary directory, so several of them failed (FileNotFoundError on the other's files)."""
    import threading

    ck = pyckpt.Checkpointer(ckpt_root, keep=3)
    results: dict[int, object] = {}

    def saver(base: int) -> None:
        for i in range(8):
            step = base + i
            try:
                results[step] = ck.save(step, {"w": torch.full((1 << 18,), float(step))}).result(60)
            except Exception as e:  # noqa: BLE001 - each failure is what the test reports
                results[step] = e

    threads = [threading.Thread(target=saver, args=(k * 1000,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    failed = {s: r for s, r in results.items() if isinstance(r, Exception)}
    assert len(results) == 24 and not failed, failed
    kept = layout.committed(ckpt_root)
    assert len(kept) == 3
    for e in kept:  # each kept checkpoint holds its own step's tensor
        assert torch.equal(pyckpt.load(e.path)["w"], torch.full((1 << 18,), float(e.step)))
    ck.close()


def test_close_from_another_thread_waits_for_a_save_call_under_way(ckpt_root):
    """close() used to see no save in flight while another thread was still inside save() (planning, or
    here its monitor), released the directory lock and returned; that save then wrote and committed
    into a directory this process no longer held."""
    import threading
    import time

    entered = threading.Event()

    def slow_monitor() -> float:
        entered.set()
        time.sleep(0.5)
        return 1.0

    ck = pyckpt.Checkpointer(ckpt_root, keep_best=1, monitor=slow_monitor)
    futures = []
    saver = threading.Thread(target=lambda: futures.append(ck.save(1, {"w": torch.ones(4)})))
    saver.start()
    assert entered.wait(30)
    ck.close()
    done_when_closed = [f.done() for f in futures]
    saver.join(30)
    assert done_when_closed == [True]
    assert futures[0].result(0).endswith(layout.step_dir_name(1))
    with pyckpt.Checkpointer(ckpt_root) as again:  # the directory is free, and holds the save
        assert again.latest().step == 1


def test_a_tensor_written_before_the_save_captured_it_fails_the_save_instead_of_tearing_it(ckpt_root, knob_env):
    """The explicit API's contract: tensors may change again once ``captured()`` returned. A script that
    trains on without waiting (as after torch.save) used to commit a checkpoint holding part of the
    tensor from before the write and part from after it, without a word."""
    knob_env(PYCKPT_CHUNK_MB=1, PYCKPT_STAGING_MB=4, PYCKPT_TEST_WRITE_DELAY_MS=40)  # capture waits for writes
    from pyckpt.errors import TornSaveError

    ck = pyckpt.Checkpointer(ckpt_root, incremental=False)
    w, other = torch.zeros(4 << 20), torch.ones(3)
    ck.save(1, {"w": w, "other": other}).result(60)
    fut = ck.save(2, {"w": w, "other": other})  # 16 chunks through 4 slabs: captured after most writes
    w.add_(1)  # no captured() first
    with pytest.raises(TornSaveError) as ei:
        fut.result(120)
    assert "'w'" in str(ei.value) and "captured()" in str(ei.value) and "'other'" not in str(ei.value)
    assert ck.latest().step == 1 and not os.path.exists(os.path.join(ckpt_root, layout.step_dir_name(2)))
    # Waiting for captured() first is the contract: the write right after it never fails the save.
    for step in range(3, 9):
        fut = ck.save(step, {"w": w, "other": other})
        assert fut.captured(60)
        w.add_(1)
        assert fut.result(120).endswith(layout.step_dir_name(step))
        assert torch.equal(pyckpt.load(fut.result())["w"], w - 1)
    ck.close()


def test_a_failed_save_keeps_no_reference_to_the_callers_tensors(ckpt_root):
    """The written-before-captured check holds the saved tensors until the capture; a save that fails
    before it (its directory removed under it) must not keep them alive through its future."""
    import gc
    import shutil
    import weakref

    ck = pyckpt.Checkpointer(ckpt_root)
    shutil.rmtree(ckpt_root)
    open(ckpt_root, "w").close()  # a file where the root was: the save cannot make its temporary directory
    t = torch.ones(1 << 16)
    ref = weakref.ref(t)
    fut = ck.save(1, {"t": t})
    with pytest.raises(Exception):
        fut.result(60)
    del t
    gc.collect()
    assert ref() is None and fut.done()


def test_staging_pool_bounds_memory_and_streams_a_large_state(ckpt_root, knob_env):
    knob_env(PYCKPT_STAGING_MB=8, PYCKPT_CHUNK_MB=1)
    g = torch.Generator().manual_seed(3)
    state = {f"t{i}": torch.randn(2_600_000, generator=g) for i in range(10)}  # ~104 MB
    ck = pyckpt.Checkpointer(ckpt_root)
    ck.save(1, state).result(120)
    assert _native.get_engine().staging_bytes_allocated() <= 8 << 20
    out = ck.load()
    assert all(torch.equal(out[k], state[k]) for k in state)


def test_io_error_surfaces_in_the_future_and_training_goes_on(tmp_path):
    # A real write failure: the file-size limit makes the second, bigger save fail with EFBIG.
    script = textwrap.dedent(f"""
        import logging, resource, signal, sys, torch, pyckpt
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        ck = pyckpt.Checkpointer({str(tmp_path / 'root')!r})
        ck.save(1, {{"t": torch.ones(1000)}}).result(60)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        fut = ck.save(2, {{"t": torch.ones(2_000_000)}})
        assert not fut.wait(60), "save over the file-size limit should fail"
        print("ERROR:", type(fut.exception()).__name__)
        print("LATEST:", ck.latest().step)
        print("ALIVE:", torch.equal(ck.load()["t"], torch.ones(1000)))
    """)
    r = zygote.shared().run(script, env=dict(os.environ))  # a real process, torch already imported
    assert r.returncode == 0, r.stderr
    assert "ERROR: NativeError" in r.stdout and "LATEST: 1" in r.stdout and "ALIVE: True" in r.stdout
    assert "checkpoint of step 2 failed" in r.stderr  # the logged warning
    assert sorted(os.listdir(tmp_path / "root")) == [".pyckpt.lock", "latest", "metrics.jsonl", "step-000000001"]


def test_load_falls_back_past_damaged_data_with_one_line(ckpt_root, caplog, flip_data_byte):
    ck = pyckpt.Checkpointer(ckpt_root, keep=3)
    ck.save(1, state_for(1)).result(60)
    newest = ck.save(2, state_for(2)).result(60)
    flip_data_byte(newest)
    assert ck.latest().step == 2  # the default checks manifests, parts and file sizes only (documented)
    dest = state_for(0)
    with caplog.at_level(logging.WARNING, logger="pyckpt"):
        r = ck.restore(into=dest)
    assert r.step == 1 and r.path.endswith("step-000000001")
    assert_state_equal(r.state, state_for(1))
    assert r.state["model"]["w"] is dest["model"]["w"]  # the caller's targets, fully overwritten
    lines = [rec.getMessage() for rec in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"pyckpt: skipping damaged checkpoint {newest}: ")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyckpt"):
        assert ck.latest(verify=True).step == 1
    assert f"skipping damaged checkpoint {newest}" in caplog.text
    with pytest.raises(pyckpt.CorruptCheckpointError):
        ck.load(step=2)  # an explicit step never falls back


@pytest.mark.parametrize("bad", [1.5, "3", None, True])
def test_non_integer_step_is_a_clear_type_error(ckpt_root, tmp_path, bad):
    ck = pyckpt.Checkpointer(ckpt_root)
    with pytest.raises(TypeError, match="step must be an integer"):
        ck.save(bad, {"t": torch.ones(1)})
    with pytest.raises(TypeError, match="step must be an integer"):
        pyckpt.save({"t": torch.ones(1)}, tmp_path / "one", step=bad)
    with pytest.raises(ValueError, match="step must be >= 0"):
        ck.save(-1, {"t": torch.ones(1)})
    assert ck.save(torch.tensor(3), {"t": torch.ones(1)}).result(60).endswith("step-000000003")
    assert sorted(os.listdir(ckpt_root)) == [".pyckpt.lock", "latest", "metrics.jsonl", "step-000000003"]


def test_a_step_past_the_formats_range_is_refused_before_anything_is_written(ckpt_root, tmp_path):
    """Steps are 64-bit signed in the manifest (docs/FORMAT.md): a save of step 2**63 used to commit
    a checkpoint that every reader then refused as corrupt ("'step' must be an integer in [0, ...]")."""
    ck = pyckpt.Checkpointer(ckpt_root)
    for bad in (2**63, 10**30):
        with pytest.raises(ValueError, match="step must be <= 9223372036854775807"):
            ck.save(bad, {"t": torch.ones(1)})
        with pytest.raises(ValueError, match="step must be <= 9223372036854775807"):
            pyckpt.save({"t": torch.ones(1)}, tmp_path / "one", step=bad)
    top = ck.save(2**63 - 1, {"t": torch.ones(1)}).result(60)
    assert ck.load(step=2**63 - 1)["t"].item() == 1.0 and ck.latest().path == top
    assert sorted(n for n in os.listdir(ckpt_root) if n.startswith("step-")) == [os.path.basename(top)]
    assert not (tmp_path / "one").exists()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3", True, None])
def test_a_keep_that_is_not_a_whole_number_of_checkpoints_is_refused_at_once(ckpt_root, bad):
    """keep=1.5 was accepted; every save then committed and logged that retention failed, and no
    checkpoint was ever removed (the disk filled). keep="3" failed with a bare '<' TypeError."""
    with pytest.raises(ValueError, match="keep must be an integer >= 1"):
        pyckpt.Checkpointer(ckpt_root, keep=bad)
    assert not os.path.exists(os.path.join(ckpt_root, ".pyckpt.lock"))  # refused before the directory was taken


def test_a_save_interrupted_while_starting_fails_its_future_and_the_next_save_commits(ckpt_root, knob_env,
                                                                                       monkeypatch):
    """The commit thread starts before the engine does (save() then never waits for it to be
    scheduled). An interrupt in between must still end that thread with the save failed, or the
    next save would wait for it until PYCKPT_STAGING_TIMEOUT_S and be skipped."""
    knob_env(PYCKPT_STAGING_TIMEOUT_S=10)
    ck = pyckpt.Checkpointer(ckpt_root)
    ck.save(1, state_for(1)).result(60)
    start = pyckpt.Checkpointer._start

    def interrupted(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pyckpt.Checkpointer, "_start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ck.save(2, state_for(2))
    monkeypatch.setattr(pyckpt.Checkpointer, "_start", start)
    assert ck.wait(10) is False  # the interrupted save ended, failed
    assert ck.save(3, state_for(3)).result(60).endswith("step-000000003")
    assert sorted(n for n in os.listdir(ckpt_root) if n.startswith("step-")) == ["step-000000001", "step-000000003"]
    assert_state_equal(ck.restore().state, state_for(3))
    ck.close()


def _model_and_adam(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.Adam(model.parameters())


def _trained_and_saved(root):
    """A Checkpointer of ``root`` holding step 1 of a Linear + Adam trained one step, and those two."""
    model, opt = _model_and_adam(0)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ck = pyckpt.Checkpointer(root)
    ck.save(1, {"model": model.state_dict(), "optim": opt.state_dict()}).result(60)
    return ck, model, opt


def test_load_into_targets_the_checkpoint_lacks_is_refused_and_writes_nothing(ckpt_root):
    """into= one level off (the model's state_dict where the checkpoint holds {"model": ...}) loaded
    nothing in place and raised nothing: a script relying on the in-place load resumed from its fresh
    weights. Targets without a saved tensor are now an IntoMismatchError, nothing written."""
    ck, _, _ = _trained_and_saved(ckpt_root)
    fresh, _ = _model_and_adam(1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(pyckpt.reader.IntoMismatchError, match="target in into= has no saved tensor") as e:
        ck.load(into=fresh.state_dict())
    assert sorted(e.value.missing) == ["bias", "weight"]
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())  # untouched
    with pytest.raises(pyckpt.reader.IntoMismatchError):
        ck.restore(into={"model": {**fresh.state_dict(), "extra": torch.zeros(1)}})


def test_load_into_a_fresh_optimizer_returns_its_state_and_fills_the_model_in_place(ckpt_root, caplog):
    """The resume pattern: a fresh Adam has no state tensors yet, so its saved moments have no target;
    they come back as new tensors for opt.load_state_dict, and the model's are filled in place. With
    strict=True those untargeted tensors are errors; strict=False names them in one line."""
    ck, model, opt = _trained_and_saved(ckpt_root)
    fresh, fresh_opt = _model_and_adam(1)
    state = ck.load(into={"model": fresh.state_dict(), "optim": fresh_opt.state_dict()})
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    fresh_opt.load_state_dict(state["optim"])
    assert torch.equal(fresh_opt.state[fresh.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])
    for strict in (True, 1):  # (any true value)
        with pytest.raises(pyckpt.reader.IntoMismatchError, match="saved tensor has no target"):
            ck.load(into={"model": fresh.state_dict(), "optim": _model_and_adam(2)[1].state_dict()}, strict=strict)
    with caplog.at_level(logging.WARNING, logger="pyckpt"):
        ck.load(into=fresh.state_dict(), strict=False)
    assert "target(s) without a saved tensor, left unchanged: weight, bias" in caplog.text
