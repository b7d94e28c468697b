"""benchmarks/train_loop.py measures what it says it does.

Settings: until 2026-12-04 it dropped every PYCKPT_* variable from the modes' environment (so that
PYCKPT_DIR could not turn the transparent layer on in an explicit mode), and with them the settings
a run was meant to compare: runs "with PYCKPT_IO_THREADS=1" measured the defaults, and nothing said
so. Durable times: a checkpoint still in flight at the next one was dropped from them."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import train_loop  # noqa: E402


def test_tuning_settings_reach_the_modes_and_activation_settings_do_not(monkeypatch):
    monkeypatch.setenv("PYCKPT_IO_NICE", "7")
    monkeypatch.setenv("PYCKPT_INCREMENTAL", "0")
    monkeypatch.setenv("PYCKPT_DIR", "/nonexistent/ckpt")
    monkeypatch.setenv("PYCKPT_EVERY_STEPS", "3")
    env = train_loop._child_env()
    assert env["PYCKPT_IO_NICE"] == "7" and env["PYCKPT_INCREMENTAL"] == "0"
    assert "PYCKPT_DIR" not in env and "PYCKPT_EVERY_STEPS" not in env
    assert env["PATH"] == os.environ["PATH"]
    line = train_loop.settings_line()
    assert "PYCKPT_IO_NICE=7" in line and "PYCKPT_INCREMENTAL=0" in line and "PYCKPT_DIR" not in line


def test_every_passed_setting_is_one_pyckpt_knows():
    from pyckpt import knobs

    assert set(train_loop.TUNING) <= set(knobs.KNOBS)


def _pyckpt_saver(tmp_path, monkeypatch) -> train_loop.Saver:
    """The benchmark's pyckpt mode over a trained Linear(512, 512) + Adam (1 MB of weights, 3 MB in all)."""
    import torch

    monkeypatch.setenv("PYCKPT_STAGING_MB", "1024")  # Saver sets it; restored after the test
    model = torch.nn.Linear(512, 512)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    return train_loop.Saver("pyckpt", str(tmp_path), model, opt)


def test_a_checkpoint_still_in_flight_at_the_next_one_keeps_its_durable_time(tmp_path, knob_env, monkeypatch):
    """The pyckpt mode replaced its pending checkpoint at the next one: a checkpoint slower than the
    interval was left out of "start → durable", so the median counted only the fast ones."""
    knob_env(PYCKPT_CHUNK_MB=1, PYCKPT_TEST_WRITE_DELAY_MS=100)  # 2 chunks: about 0.2 s per checkpoint
    saver = _pyckpt_saver(tmp_path, monkeypatch)
    saver.checkpoint(1)
    saver.before_step()
    saver.checkpoint(2)  # the first is still being written
    durable = saver.finish()
    saver.ckpt.close()
    assert len(durable) == 2 and all(d >= 0.15 for d in durable), durable


def test_a_checkpoint_durable_long_before_the_next_one_is_timed_when_it_became_durable(tmp_path, knob_env,
                                                                                        monkeypatch):
    """"start → durable" was read when the benchmark next looked (at the next checkpoint): a write
    done in a tenth of a second counted as the whole interval, so the column showed the interval."""
    import time

    knob_env(PYCKPT_CHUNK_MB=1)
    saver = _pyckpt_saver(tmp_path, monkeypatch)
    saver.checkpoint(1)
    saver.before_step()
    saver.ckpt.wait()  # durable now
    time.sleep(1.5)  # the steps until the next checkpoint
    saver.checkpoint(2)
    durable = saver.finish()
    saver.ckpt.close()
    assert len(durable) == 2 and durable[0] < 1.0, durable
