"""``python -m pyckpt``: the ``pyckpt`` command line (see ``pyckpt.cli``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
