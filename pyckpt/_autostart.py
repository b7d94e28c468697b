"""Imported by the ``pyckpt-autostart.pth`` start-up line when PYCKPT_DIR is set.

The ``.pth`` line itself only reads ``os.environ`` (free when the variable
is absent). Here transparent mode is turned on for this process, unless
PYCKPT_DISABLE=1. A bad setting must stop the process before training: an
exception raised while ``site`` processes a ``.pth`` file is printed and
ignored, so ``enable_or_exit`` ends the process with ``os._exit(2)``.
"""
from __future__ import annotations

from .activation import enable_or_exit

enable_or_exit(hard=True)
