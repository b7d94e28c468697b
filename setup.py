"""Build script: the native engine pyckpt._C is built by CMake (pybind11's
cmake_example pattern). Never imports torch, so build isolation stays small.

Environment:
    PYCKPT_CUDA=1|0    require / disable the CUDA copy path (default: auto-detect nvcc)
    CMAKE_BUILD_PARALLEL_LEVEL   parallel compile jobs (default 2)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

ROOT = Path(__file__).resolve().parent
# Start-up hook: one line, a no-op unless PYCKPT_DIR is set (see _autostart.py).
PTH_NAME = "pyckpt-autostart.pth"


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        cmake = _cmake_executable()
        ninja = shutil.which("ninja") if "CMAKE_GENERATOR" not in os.environ else None
        cuda = os.environ.get("PYCKPT_CUDA", "").strip() or "AUTO"
        if cuda not in ("0", "1", "AUTO"):
            raise SystemExit(f"PYCKPT_CUDA={cuda!r}: expected 1 (require CUDA) or 0 (CPU only)")
        tools = [cmake, ninja, sys.executable, cuda]
        build_temp = _fresh_build_dir(Path(self.build_temp) / ext.name, tools)
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DPYCKPT_CUDA={cuda}",
        ]
        if ninja:
            cmake_args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        env = dict(os.environ)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", "2")
        subprocess.run([cmake, ext.sourcedir, *cmake_args], cwd=build_temp, env=env, check=True)
        subprocess.run([cmake, "--build", ".", "--config", "Release"], cwd=build_temp, env=env, check=True)


def _fresh_build_dir(path: Path, tools: list) -> Path:
    """The CMake build dir, wiped when the tools that configured it changed:
    pip's isolated build envs are temporary, and a cache pointing at a
    deleted cmake/ninja fails the next build."""
    stamp = path / ".pyckpt-tools"
    want = "\n".join(str(t) for t in tools)
    if path.exists() and (not stamp.exists() or stamp.read_text() != want):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    stamp.write_text(want)
    return path


def _cmake_executable() -> str:
    """The cmake next to this Python (PyPI's cmake in a build env) or on PATH."""
    local = Path(sys.executable).parent / "cmake"
    if local.exists():
        return str(local)
    found = shutil.which("cmake")
    if not found:
        raise SystemExit("cmake not found: pip install cmake (>= 3.18)")
    return found


class BuildPyWithPth(build_py):
    """Places the start-up .pth at the root of the built tree, which becomes
    site-packages on install (the approach coverage.py uses)."""

    def run(self) -> None:
        super().run()
        self.copy_file(str(ROOT / PTH_NAME), os.path.join(self.build_lib, PTH_NAME))


class EditableWheelWithPth(editable_wheel):
    """Editable wheels do not carry build_lib; put the .pth in the wheel root."""

    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        shutil.copyfile(ROOT / PTH_NAME, Path(unpacked_wheel) / PTH_NAME)
        return result


setup(
    ext_modules=[CMakeExtension("pyckpt._C")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
    zip_safe=False,
)
