"""Fixtures for the transparent-mode tests."""
from __future__ import annotations

import pytest

from transparent_helpers import TINY, load, run_script


@pytest.fixture(scope="session")
def plain_results(tmp_path_factory):
    """MODE -> final state of an uninterrupted run without pyckpt (computed once per mode)."""
    root = tmp_path_factory.mktemp("plain")
    cache: dict[str, object] = {}

    def get(mode: str):
        if mode not in cache:
            out = root / f"{mode}.pt"
            r = run_script([TINY, out], root, MODE=mode)
            assert r.returncode == 0, r.stderr
            cache[mode] = load(out)
        return cache[mode]

    return get
