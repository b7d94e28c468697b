"""PYCKPT_IO_NICE: the engine's I/O workers (writes and reads) run at that nice value; its capture
and copy threads, which the next optimizer step may wait for, and the thread that made the engine
keep the process's; a value is only ever lowered, never raised. Read back from /proc per thread
(Linux keeps a nice value per thread), in a child process each, so no other test's thread counts.
The engine's threads are named (pyckpt-io, pyckpt-copy, pyckpt-capture) so that top -H, py-spy and
perf tell them from training's threads."""
from __future__ import annotations

import os

import pytest

from native_helpers import run_child
from pyckpt import knobs
from pyckpt.errors import ConfigError


def test_the_io_workers_run_at_the_nice_value_and_every_other_thread_keeps_the_process_value(tmp_path):
    out = run_child(f"""
        import numpy as np
        from pyckpt import _native
        from native_helpers import addr, new_threads, nice_of_threads
        MIB = 1 << 20
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        before = set(nice_of_threads())
        engine = _native.native().Engine(MIB, MIB, io_threads=3, copy_threads=3, io_nice=19)
        workers = new_threads(before, 3 + 2, niced=(3, 19))  # 3 I/O workers, 2 copy workers
        # A capture thread lives while a save runs: one staging slab and slow writes keep it waiting.
        src = np.arange(3 * MIB, dtype=np.uint8)
        chunks = [(0, 1, [(addr(src) + i * MIB, MIB, -1)]) for i in range(3)]
        job = engine.save([{str(tmp_path / 'd.bin')!r}], chunks, write_delay_us=300_000, staging_timeout_ms=60_000)
        capture = new_threads(before | set(workers), 1)
        ok = job.wait(60) and job.error() is None
        print(json.dumps({{"mine": mine, "after": os.getpriority(os.PRIO_PROCESS, 0), "ok": ok,
                          "workers": sorted(workers.values()), "capture": sorted(capture.values())}}))
    """)
    mine = out["mine"]
    assert out["ok"] and out["after"] == mine  # the calling thread is unchanged
    assert out["workers"] == sorted([mine] * 2 + [19] * 3)
    assert out["capture"] == [mine]


def test_the_engines_threads_carry_names_that_say_what_they_do(tmp_path):
    out = run_child(f"""
        import numpy as np
        from pyckpt import _native
        from native_helpers import addr, names_of_threads, names_once_set, new_threads, nice_of_threads
        MIB = 1 << 20
        before = set(nice_of_threads())
        engine = _native.native().Engine(MIB, MIB, io_threads=3, copy_threads=3)
        workers = new_threads(before, 3 + 2)
        src = np.arange(3 * MIB, dtype=np.uint8)
        chunks = [(0, 1, [(addr(src) + i * MIB, MIB, -1)]) for i in range(3)]
        job = engine.save([{str(tmp_path / 'd.bin')!r}], chunks, write_delay_us=300_000, staging_timeout_ms=60_000)
        capture = new_threads(before | set(workers), 1)
        names = {{"workers": names_once_set(workers), "capture": names_once_set(capture)}}
        ok = job.wait(60) and job.error() is None
        print(json.dumps(dict(names, ok=ok, main=names_of_threads([os.getpid()])[os.getpid()])))
    """)
    assert out["ok"]
    assert out["workers"] == ["pyckpt-copy"] * 2 + ["pyckpt-io"] * 3
    assert out["capture"] == ["pyckpt-capture"]
    assert not out["main"].startswith("pyckpt")  # the calling thread keeps its name


def test_pyckpts_python_threads_carry_their_names_to_the_os(tmp_path):
    # Python 3.11 leaves a thread's OS name the process's; the commit thread sets its own (cut to 15).
    out = run_child(f"""
        import time, torch, pyckpt
        from native_helpers import names_of_threads, nice_of_threads
        ck = pyckpt.Checkpointer({str(tmp_path / 'root')!r})
        fut = ck.save(7, {{"w": torch.randn(1 << 18)}})
        seen = set()
        while not fut.done():
            seen.update(names_of_threads(nice_of_threads()).values())
            time.sleep(0.01)
        fut.result(60)
        print(json.dumps(sorted(n for n in seen if n.startswith("pyckpt"))))
    """, env={"PYCKPT_TEST_WRITE_DELAY_MS": "300", "PYCKPT_DISABLE": "1"})
    # The commit thread lives until the save is durable (the engine's threads: the test above).
    assert "pyckpt-commit-7" in out and "pyckpt-io" in out, out


def test_io_nice_zero_leaves_the_workers_at_the_process_value():
    out = run_child("""
        from pyckpt import _native
        from native_helpers import new_threads, nice_of_threads
        os.nice(3)  # a process niced by its launcher: the engine's threads keep its value
        before = set(nice_of_threads())
        engine = _native.native().Engine(1 << 20, 1 << 20, io_threads=2, copy_threads=2, io_nice=0)
        print(json.dumps({"mine": os.getpriority(os.PRIO_PROCESS, 0),
                          "workers": sorted(new_threads(before, 3).values())}))
    """)
    assert out["workers"] == [out["mine"]] * 3


def test_a_value_below_the_process_nice_never_raises_a_thread_priority():
    # The process is niced to 10 first, then asks for 5 (as root, setpriority could raise it).
    out = run_child("""
        import time
        from pyckpt import _native
        from native_helpers import new_threads, nice_of_threads
        base = max(10, os.nice(0))
        os.nice(base - os.nice(0))
        before = set(nice_of_threads())
        engine = _native.native().Engine(1 << 20, 1 << 20, io_threads=2, copy_threads=2, io_nice=base - 5)
        new_threads(before, 3)
        time.sleep(0.2)  # the workers have run their start-up (where they would lower themselves)
        print(json.dumps({"base": base, "workers": sorted(new_threads(before, 3).values())}))
    """)
    assert out["workers"] == [out["base"]] * 3


def test_the_setting_reaches_the_process_engine():
    out = run_child("""
        from pyckpt import _native, knobs
        from native_helpers import new_threads, nice_of_threads
        before = set(nice_of_threads())
        _native.get_engine()
        io = knobs.get("PYCKPT_IO_THREADS")
        workers = new_threads(before, io + max(knobs.get("PYCKPT_COPY_THREADS") - 1, 1), niced=(io, 17))
        print(json.dumps({"io": io, "niced": sum(v == 17 for v in workers.values())}))
    """, env={"PYCKPT_IO_NICE": "17"})
    assert out["niced"] == out["io"]


@pytest.mark.parametrize("raw", ["20", "-1", "high"])
def test_a_value_outside_0_to_19_is_refused_naming_the_setting(monkeypatch, raw):
    monkeypatch.setenv("PYCKPT_IO_NICE", raw)
    with pytest.raises(ConfigError, match=r"PYCKPT_IO_NICE=.* expected an integer from 0 to 19"):
        knobs.get("PYCKPT_IO_NICE")
