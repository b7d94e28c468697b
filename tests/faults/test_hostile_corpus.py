"""The hostile-checkpoint corpus (hostile_corpus.CORPUS): every case is refused by load,
open_checkpoint and `pyckpt verify` alike, with a typed error, promptly, reading nothing outside."""
from __future__ import annotations

import json
import os
import sys
import threading

import pytest

import pyckpt
import zygote
from pyckpt import reader
from pyckpt._native import get_engine
from pyckpt.api import resolve
from pyckpt.errors import CorruptCheckpointError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostile_corpus import BLOCKING, CORPUS  # noqa: E402


def bounded(fn, timeout=60):
    """Run ``fn`` in a daemon thread; a hang fails the test instead of hanging the suite."""
    out: list = []

    def go():
        try:
            out.append(("ok", fn()))
        except BaseException as e:  # noqa: BLE001 - reported to the test below
            out.append(("err", e))

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    assert out, f"{fn} did not return within {timeout} s"
    return out[0]


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_load_open_and_verify_refuse_with_a_typed_error(tmp_path, name):
    path = str(CORPUS[name](tmp_path))
    for what, fn in [("load", lambda: pyckpt.load(path)),
                     ("verify", lambda: reader.verify(get_engine(), resolve(path, newest_committed=True))),
                     ("open", lambda: reader.open_checkpoint(resolve(path)))]:
        kind, val = bounded(fn)
        assert kind == "err", f"{what} accepted hostile case {name}"
        assert isinstance(val, CorruptCheckpointError), f"{what}: {type(val).__name__}: {val}"


# One fresh process runs `pyckpt verify` (cli.main) on every case: a process per case costs ~3 s of imports.
_CLI_DRIVER = """
import contextlib, io, json, sys, traceback
from pyckpt import cli
for name, path in json.loads(sys.argv[1]).items():
    print("CASE", name, file=sys.__stderr__, flush=True)  # names the case if this process hangs
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(["verify", path])
        except BaseException:
            rc, err = None, io.StringIO(traceback.format_exc())
    print(json.dumps([name, rc, err.getvalue()]), file=sys.__stdout__, flush=True)
"""


@pytest.fixture(scope="module")
def cli_verify_results(tmp_path_factory):
    paths = {n: str(CORPUS[n](tmp_path_factory.mktemp(n))) for n in sorted(CORPUS)}
    z = zygote.shared()
    child = z.start(_CLI_DRIVER, [json.dumps(paths)], env=dict(os.environ))  # a real process, torch imported
    try:
        child.wait(300)
    except TimeoutError:
        pytest.fail(f"pyckpt verify hung: {child.stderr[-200:]!r}")
    r = child
    return {name: (rc, err) for name, rc, err in map(json.loads, r.stdout.splitlines())}, r.stderr


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_cli_verify_prints_one_failed_line_and_exits_1(cli_verify_results, name):
    results, driver_err = cli_verify_results
    assert name in results, f"pyckpt verify did not finish {name}: {driver_err[-2000:]}"
    rc, err = results[name]
    assert rc == 1, err
    assert "pyckpt verify: FAILED" in err and "Traceback" not in err, err


@pytest.mark.parametrize("name", sorted(BLOCKING))
def test_fifo_cases_return_promptly_in_a_fresh_process(tmp_path, name):
    """A FIFO opened for reading without O_NONBLOCK blocks until a writer comes: never here."""
    path = str(CORPUS[name](tmp_path))
    code = ("import pyckpt, sys\n"
            "try:\n    pyckpt.load(sys.argv[1])\n"
            "except pyckpt.CorruptCheckpointError as e:\n    print('REFUSED', e)\n")
    try:  # a real process (forked by the session's zygote), killed if it hangs
        r = zygote.shared().run(code, [path], env=dict(os.environ), timeout=120)
    except TimeoutError:
        pytest.fail(f"load hung on {name}")
    assert r.returncode == 0 and "REFUSED" in r.stdout and "not a regular file" in r.stdout, r.stderr
