"""Keep Python's cyclic garbage collector out of a snapshot.

Planning a save allocates several objects per tensor. With thousands of tensors that is enough
allocations to start collection passes inside the call, and a pass of the oldest generation walks
every live object of a process that imported torch (0.1-0.2 s on a 2-core box, more with
``transformers`` loaded): measured, it cost more than the snapshot itself. Reference counting
still frees everything while the collector is paused; only cycles wait for the next pass.
"""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Disable the cyclic collector for the block; leaves it as found (a caller's ``gc.disable()`` stays)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
