"""Imported by the ``pyckpt-autostart.pth`` start-up line when PYCKPT_DIR is set (even empty).

The ``.pth`` line itself only looks up one name in the environment (free when
it is unset). Here the settings are validated in pure Python and
transparent mode waits for ``import torch`` to install its hooks (see
``activation.start_from_environment``): a process that never imports torch
(``pip``, ``pyckpt ls``) neither loads torch nor fails because of pyckpt.
"""
from __future__ import annotations

from .activation import start_from_environment

start_from_environment()
