"""hooks.eager: a hook runs as plain Python, directly when nothing compiles, never traced by Dynamo."""
from __future__ import annotations

import gc
import sys

import torch

from pyckpt import hooks


def _caller_file() -> str:
    return sys._getframe(2).f_code.co_filename  # (the hook <- eager's wrapper or Dynamo's <- ...)


def test_a_hook_is_called_directly_when_nothing_compiles_and_eagerly_inside_compiled_code():
    import torch._dynamo  # noqa: F401 - as in a script that compiles: the disable wrapper is in play

    seen = []

    def hook(x):
        seen.append((_caller_file(), torch._C._dynamo.eval_frame.get_eval_frame_callback() is None))
        gc.get_objects()  # what Dynamo could not trace: this must run as plain Python
        return None

    wrapped = hooks.eager(hook)
    wrapped(1)
    assert seen[-1] == (hooks.__file__, True)  # called by eager's own wrapper, not through torch's disable

    @torch.compile(backend="eager")
    def step(t):
        wrapped(t)
        return t * 2

    torch._dynamo.reset()
    assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0))
    caller, no_callback = seen[-1]
    assert caller != hooks.__file__ and no_callback  # through torch.compiler.disable, run eagerly
