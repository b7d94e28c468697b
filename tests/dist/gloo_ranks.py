"""Run a test body on real ranks: one spawned process per rank, a gloo process group over a file
rendezvous, and each rank's JSON-able result handed back to the test."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, body: Callable[[int, int, str], Any], world: int, tmp: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        out = body(rank, world, tmp)
        with open(f"{tmp}/out{rank}.json", "w") as fh:
            json.dump(out, fh)
    finally:
        dist.destroy_process_group()


def run_ranks(body: Callable[[int, int, str], Any], world: int, tmp: str) -> list[Any]:
    """``body(rank, world, tmp)`` on ``world`` ranks (a module-level function: it is pickled by name);
    returns each rank's result, rank order. A rank that raises fails the call."""
    mp.spawn(_rank_main, args=(body, world, str(tmp)), nprocs=world, join=True)
    return [json.loads(Path(f"{tmp}/out{r}.json").read_text()) for r in range(world)]
