"""pyckpt._native: capability flags, the engine singleton, typed errors, and
the start-up .pth hook."""
from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap

import pytest

from pyckpt import _native, knobs
from pyckpt.errors import ConfigError, NativeError, StagingTimeoutError


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=120
    )


def test_codec_ids_are_inverse():
    assert _native.CODEC_IDS == {"none": 0, "zstd": 1}
    assert {v: k for k, v in _native.CODEC_IDS.items()} == _native.CODEC_NAMES
    assert _native.native().CODEC_ZSTD == _native.CODEC_IDS["zstd"]


def test_capabilities_here():
    C = _native.native()
    assert _native.zstd_available()  # zstandard is a dependency
    assert C.zstd_version().startswith("1.")
    # A GPU is visible only when CUDA was compiled in.
    assert _native.cuda_available() <= C.cuda_compiled()


def test_engine_singleton_follows_knobs():
    try:
        with knobs.override(PYCKPT_CHUNK_MB=2, PYCKPT_STAGING_MB=8, PYCKPT_IO_THREADS=1):
            _native.reset_engine()
            engine = _native.get_engine()
            assert engine is _native.get_engine()
            assert engine.chunk_bytes() == 2 << 20
            assert engine.staging_bytes_allocated() == 0
    finally:
        _native.reset_engine()
    assert _native.get_engine() is not engine


def test_the_engine_takes_the_largest_value_of_each_setting():
    """The settings' upper bounds are what the engine can run with: a chunk of its own limit, a
    16 TiB budget (slabs are allocated when used), 256 writers and 256 copy threads."""
    def largest(name: str) -> int:
        with pytest.raises(ConfigError, match="from 1 to "):
            with knobs.override(**{name: "999999999"}):
                knobs.get(name)
        return int(knobs.KNOBS[name][0].accepted.rsplit(" ", 1)[1])

    big = {n: largest(n) for n in ("PYCKPT_CHUNK_MB", "PYCKPT_STAGING_MB", "PYCKPT_IO_THREADS", "PYCKPT_COPY_THREADS")}
    assert big["PYCKPT_CHUNK_MB"] << 20 == _native.native().MAX_CHUNK_BYTES
    assert big["PYCKPT_STAGING_MB"] == 1 << 24 and big["PYCKPT_IO_THREADS"] == big["PYCKPT_COPY_THREADS"] == 256
    try:
        with knobs.override(**big):
            _native.reset_engine()
            engine = _native.get_engine()
            assert engine.chunk_bytes() == _native.native().MAX_CHUNK_BYTES and engine.thread_shortfall() == ""
    finally:
        _native.reset_engine()


def _save_in_child(path: str, queue) -> None:
    import numpy as np

    src = np.arange(1000, dtype=np.float64)
    job = _native.get_engine().save([path], [(0, 8, [(src.ctypes.data, src.nbytes, -1)])])
    queue.put(bool(job.wait(20)) and job.error() is None)


def test_forked_child_gets_a_working_engine(tmp_path):
    import multiprocessing
    import warnings

    parent_engine = _native.get_engine()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with warnings.catch_warnings():  # Python >= 3.12 warns about fork with threads
        warnings.simplefilter("ignore", DeprecationWarning)
        child = ctx.Process(target=_save_in_child, args=(str(tmp_path / "c.bin"), queue))
        child.start()
    try:
        assert queue.get(timeout=60) is True
    finally:
        child.join(60)
    assert child.exitcode == 0
    assert _native.get_engine() is parent_engine  # the parent's engine is untouched
    assert (tmp_path / "c.bin").stat().st_size == 8000


def test_codec_lookup_and_job_errors():
    assert _native.require_codec("zstd") == 1
    with pytest.raises(NativeError, match="unknown codec"):
        _native.require_codec("lz4")
    assert isinstance(_native.error_from_job("staging timeout: busy"), StagingTimeoutError)
    err = _native.error_from_job("write failed at offset 0 of /x: No space left on device")
    assert isinstance(err, NativeError) and "/x" in str(err)


def test_missing_extension_is_an_actionable_error_not_an_import_crash():
    out = run_python(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "pyckpt._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        from pyckpt import _native
        assert not _native.cuda_available() and not _native.zstd_available()
        try:
            _native.native()
        except Exception as e:
            print(type(e).__name__, e)
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("NativeError pyckpt._C is not built: run `pip install -e .`")


def test_missing_zstd_is_reported_when_asked_for():
    out = run_python(
        """
        import sys, ctypes.util
        sys.modules["zstandard"] = None          # import zstandard -> ImportError
        ctypes.util.find_library = lambda name: None
        from pyckpt import _native
        assert not _native.zstd_available()
        try:
            _native.require_codec("zstd")
        except Exception as e:
            print(type(e).__name__, e)
        C = _native.native()
        try:
            C.encode(bytes(4096), 4)
        except RuntimeError as e:
            print("encode:", e)
        """
    )
    assert out.returncode == 0, out.stderr
    assert "NativeError compression 'zstd' is not available" in out.stdout
    assert "zstandard" in out.stdout and "encode: codec zstd requested" in out.stdout


def _installed_pth() -> str | None:
    for d in site.getsitepackages() + [site.getusersitepackages()]:
        p = os.path.join(d, "pyckpt-autostart.pth")
        if os.path.exists(p):
            return p
    return None


def test_startup_hook_is_inert_unless_pyckpt_dir_is_set(tmp_path):
    pth = _installed_pth()
    if pth is None:
        pytest.skip("pyckpt is not installed (pip install -e .), so no .pth hook to test")
    with open(pth) as f:
        assert "PYCKPT_DIR" in f.read()
    probe = "import sys; print('pyckpt' in sys.modules, 'torch' in sys.modules)"
    assert run_python(probe).stdout.split() == ["False", "False"]
    loaded = run_python(
        "import sys; print('pyckpt._autostart' in sys.modules)",
        PYCKPT_DIR=str(tmp_path / "ckpt"),
        PYCKPT_EVERY_STEPS="1000",
    )
    assert loaded.stdout.split()[-1:] == ["True"], loaded.stderr


def test_stub_matches_the_compiled_module():
    """Every function, class and method declared in _C.pyi exists in _C."""
    import ast
    from pathlib import Path

    import pyckpt

    C = _native.native()
    tree = ast.parse((Path(pyckpt.__file__).parent / "_C.pyi").read_text())
    declared = 0
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            assert callable(getattr(C, node.name)), node.name
            declared += 1
        elif isinstance(node, ast.ClassDef):
            cls = getattr(C, node.name)
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    assert hasattr(cls, item.name), f"{node.name}.{item.name}"
                    declared += 1
        elif isinstance(node, ast.AnnAssign) and node.target.id.isupper():
            assert isinstance(getattr(C, node.target.id), int), node.target.id
    assert declared > 20
