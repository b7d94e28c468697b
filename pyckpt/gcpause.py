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
def paused(promote: bool = False) -> Iterator[None]:
    """Disable the cyclic collector for the block; leaves it as found (a caller's ``gc.disable()`` stays).

    ``promote`` (a snapshot on the training thread): what the block allocated and still holds (the
    encoded state trees of thousands of tensors, alive until the commit, then freed by reference
    counting) goes to the oldest generation as the block ends, where it waits for a full pass. Else
    the first allocation after it starts a young-generation pass over those thousands of objects
    (1-2 ms of the snapshot) that finds nothing to free: a snapshot's cycles are a few small objects
    (its futures and events). The script's own young objects get the pass of the two young
    generations first (as the collector makes every tenth pass: garbage freed, the rest to the
    oldest generation), so only the block's objects skip a pass, never a cycle of the script's
    (docs/PERFORMANCE.md, "Ninth pass"). Not done when the script has frozen objects
    (``gc.freeze()`` before forking workers): ``gc.unfreeze()``, which makes the move, would release
    those too."""
    if not gc.isenabled():
        yield
        return
    promote = promote and gc.get_freeze_count() == 0
    if promote:
        gc.collect(1)
    gc.disable()
    try:
        yield
    finally:
        if promote:
            gc.freeze()  # every tracked object to the permanent generation (a list splice, no pass) ...
            gc.unfreeze()  # ... and back into the oldest one; the young generation's count starts again
        gc.enable()
