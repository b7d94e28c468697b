"""The default test run (the README's command) collects every test directory.

pytest's built-in ``norecursedirs`` contains ``dist``, so tests/dist (the real multi-process
torch.distributed tests) was once silently left out of every default run.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_default_run_collects_every_test_directory():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    collected = {line.split("/")[1] for line in out.splitlines() if line.startswith("tests/") and "::" in line}
    on_disk = {p.parent.relative_to(ROOT / "tests").parts[0] for p in (ROOT / "tests").rglob("test_*.py")
               if p.parent != ROOT / "tests"}
    assert on_disk <= collected, f"directories never collected: {sorted(on_disk - collected)}"
    assert "dist" in on_disk
