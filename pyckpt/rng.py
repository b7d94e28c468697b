"""Capture and restore the process's random number streams.

Covered: Python ``random``, NumPy's global generator (when NumPy is
imported), torch's CPU generator and every CUDA device's generator (when
CUDA has been initialised: a program that never touched CUDA has no CUDA
random state worth saving, and initialising it here would cost memory on
every device). The captured state uses only tensors, tuples and JSON values,
so it goes through the checkpoint format without pickle.
"""
from __future__ import annotations

import random
import sys
from typing import Any

import torch


def capture() -> dict[str, Any]:
    """The current state of every stream; reading a state draws no random numbers.

    The Mersenne Twister words (625 for Python, 624 for NumPy) are one int64 tensor each,
    not a list of ints: a list costs one state-tree leaf per word in every snapshot."""
    version, words, gauss_next = random.getstate()
    state: dict[str, Any] = {"python": (version, torch.tensor(words, dtype=torch.int64), gauss_next),
                             "torch": torch.get_rng_state()}
    np = sys.modules.get("numpy")
    if np is not None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore(state: dict[str, Any]) -> None:
    """Put every stream back to ``state`` (as returned by ``capture``)."""
    py = state["python"]
    # Words as a tensor (this version) or a tuple/list of ints (checkpoints written before).
    random.setstate((py[0], tuple(_ints(py[1])), py[2]))
    torch.set_rng_state(_cpu_byte_tensor(state["torch"]))
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["name"], np.array(_ints(s["keys"]), dtype=np.uint32), s["pos"], s["has_gauss"],
                             s["gauss"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([_cpu_byte_tensor(t) for t in cuda[:n]])


def _ints(words: Any) -> list[int]:
    """Mersenne Twister words from a tensor or a sequence of ints."""
    if isinstance(words, torch.Tensor):
        return [int(w) for w in words.tolist()]
    return [int(w) for w in words]


def generator_state(gen: torch.Generator) -> torch.Tensor:
    """A copy of ``gen``'s state (a CPU byte tensor)."""
    return gen.get_state().clone()


def set_generator_state(gen: torch.Generator, state: torch.Tensor) -> None:
    """Restore ``gen`` from ``generator_state``'s result."""
    gen.set_state(_cpu_byte_tensor(state))


def _cpu_byte_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.uint8).contiguous()
