"""Fixtures for the transparent-mode tests."""
from __future__ import annotations

import pytest

import zygote
from transparent_helpers import TINY, clean_env, load


@pytest.fixture(scope="session")
def plain_results(tmp_path_factory):
    """MODE -> final state of an uninterrupted run without pyckpt (computed once per mode, in a process
    forked by the session's zygote: the script never imports pyckpt, so no start-up line is missed)."""
    root = tmp_path_factory.mktemp("plain")
    cache: dict[str, object] = {}

    def get(mode: str):
        if mode not in cache:
            out = root / f"{mode}.pt"
            r = zygote.shared().run_path(TINY, [out], env=clean_env(MODE=mode), cwd=root)
            assert r.returncode == 0, r.stderr
            cache[mode] = load(out)
        return cache[mode]

    return get
