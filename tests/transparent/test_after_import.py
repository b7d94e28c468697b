"""pyckpt.after_import: AfterImport, the one import hook (torch's activation, library integrations), and
ImportNesting, which holds activation back while a pyckpt module that imports torch is still running."""
from __future__ import annotations

import sys

from pyckpt.after_import import AfterImport, ImportNesting


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


def test_when_done_waits_for_the_outermost_module_under_the_prefix(tmp_path, monkeypatch):
    """Module ``outer`` imports ``inner`` halfway; a callback asked for while ``inner`` runs (as activation
    is, when torch finishes inside a pyckpt module) runs once ``outer`` has run to its end."""
    pkg = tmp_path / "pyckpt_probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "inner.py").write_text("import sys\nsys.modules['pyckpt_probe_pkg'].NESTING.when_done("
                                  "lambda: sys.modules['pyckpt_probe_pkg'].SEEN.append(sys.modules["
                                  "'pyckpt_probe_pkg.outer'].LAST))\n")
    (pkg / "outer.py").write_text("FIRST = 1\nfrom . import inner\nLAST = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import pyckpt_probe_pkg

    nesting = ImportNesting("pyckpt_probe_pkg.").install()
    pyckpt_probe_pkg.NESTING, pyckpt_probe_pkg.SEEN = nesting, []
    try:
        import pyckpt_probe_pkg.outer  # noqa: F401
        assert pyckpt_probe_pkg.SEEN == [2] and nesting.depth == 0  # outer's last line had run
        ran = []
        nesting.when_done(lambda: ran.append(1))  # nothing under the prefix running: at once
        assert ran == [1]
    finally:
        nesting.remove()
        for name in [n for n in sys.modules if n.startswith("pyckpt_probe_pkg")]:
            del sys.modules[name]
    assert nesting not in sys.meta_path
