"""One exception hierarchy for pyckpt.

Every error says where it happened (file, chunk, key path) and, where there is
one, what the user can do about it.
"""
from __future__ import annotations


class PyckptError(Exception):
    """Base class of every error pyckpt raises on purpose."""


class CheckpointNotFoundError(PyckptError, FileNotFoundError):
    """No committed checkpoint exists where one was asked for (nothing saved yet, or no such step).

    Committed checkpoints that all fail to load are ``CorruptCheckpointError`` instead: a caller
    may read this error as "start fresh", which must never hide lost progress."""


class CorruptCheckpointError(PyckptError):
    """A checkpoint failed validation: bad checksum, truncated/missing file, bad manifest.

    ``path`` names the file and ``chunk`` the chunk index inside it (or None).
    """

    def __init__(self, message: str, path: str | None = None, chunk: int | None = None):
        super().__init__(message)
        self.path = path
        self.chunk = chunk


class FormatVersionError(CorruptCheckpointError):
    """The checkpoint was written in a format version this pyckpt cannot read."""


class UnsupportedStateError(PyckptError, TypeError):
    """A value in the state cannot be stored without pickle; ``key`` is its path."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class TornSaveError(PyckptError):
    """A tensor of the state was written after ``save()`` and before the save had copied it (the
    caller did not wait for ``captured()``): the checkpoint would mix two steps, so it is not committed."""


class StagingTimeoutError(PyckptError):
    """Staging memory stayed full past the timeout; the checkpoint was skipped."""


class NativeError(PyckptError):
    """The C++ engine reported an error (I/O, CUDA, codec); the message says which."""


class ConfigError(PyckptError, ValueError):
    """A PYCKPT_* setting is malformed; the message names it and the accepted values."""
