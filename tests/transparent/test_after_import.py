"""pyckpt.after_import.AfterImport: the one import hook (torch's activation, library integrations)."""
from __future__ import annotations

import sys

from pyckpt.after_import import AfterImport


def test_callback_runs_once_after_the_module_executed_then_the_finder_leaves(tmp_path, monkeypatch):
    (tmp_path / "pyckpt_probe_mod_a.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    finder = AfterImport({"pyckpt_probe_mod_a": lambda m: seen.append(m.VALUE + 1)}).install()
    try:
        assert sys.meta_path[0] is finder
        import pyckpt_probe_mod_a  # noqa: F401
        assert seen == [42]  # the module's code had run: the callback saw its attribute
        assert finder not in sys.meta_path  # nothing left pending
        del sys.modules["pyckpt_probe_mod_a"]
        import pyckpt_probe_mod_a  # noqa: F401,F811
        assert seen == [42]
    finally:
        finder.remove()
        sys.modules.pop("pyckpt_probe_mod_a", None)


def test_other_imports_pass_through_and_removal_is_idempotent(tmp_path, monkeypatch):
    (tmp_path / "pyckpt_probe_mod_b.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    finder = AfterImport({"pyckpt_probe_never": seen.append}).install()
    try:
        import pyckpt_probe_mod_b
        assert pyckpt_probe_mod_b.X == 1 and seen == [] and finder in sys.meta_path
    finally:
        finder.remove()
        finder.remove()
        sys.modules.pop("pyckpt_probe_mod_b", None)
    assert finder not in sys.meta_path
