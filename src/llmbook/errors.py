"""The errors a reader can fix, and the interrupt a reader asked for.

Each message is one line that names the file or the setting and says what to
do; the command lines print it as ``error: <message>`` without a traceback.
Configuration mistakes stay ``ValueError`` (the usual Python contract for a
bad argument); problems with a run's files or with the run itself are
``RunError``.
"""

from __future__ import annotations

import pickle
from pathlib import Path


class RunError(RuntimeError):
    """A run cannot go on as asked: a folder that already holds a run, a disk that is full, a run that diverged."""


class CheckpointError(RunError):
    """A checkpoint (or model) file that cannot be loaded: empty, truncated, corrupted, or not a checkpoint."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint that holds Python objects other than tensors and containers: loading it could run code.

    Also a ``pickle.UnpicklingError``, which is what ``torch.load(weights_only=True)`` raises for the same file.
    """


class CacheError(RunError):
    """A file of the user's cache (tokenized data, a tokenizer) is damaged; deleting the cache entry fixes it."""


class DivergedError(RunError):
    """The loss, the gradient norm or a weight became NaN or infinite; the last good checkpoint is kept."""


class Interrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C (SIGINT) or SIGTERM after finishing its step; ``checkpoint`` says what was saved.

    A ``KeyboardInterrupt``, so code that catches ``Exception`` does not swallow it
    and a notebook cell stops as it does on any Ctrl-C.
    """

    def __init__(self, message: str, step: int, checkpoint: Path | None, checkpoint_step: int | None, signum: int):
        super().__init__(message)
        self.step, self.checkpoint, self.checkpoint_step, self.signum = step, checkpoint, checkpoint_step, signum


def one_line(exc: BaseException) -> str:
    """An exception's message, first line only (KeyError's without the quotes repr adds): what ``error:`` prints."""
    if isinstance(exc, OSError) and exc.strerror:
        message = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc) or type(exc).__name__
    return message.strip().splitlines()[0] if message.strip() else type(exc).__name__
