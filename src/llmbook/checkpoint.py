"""Checkpoints: save a training run so that a crash costs minutes, not the run.

A checkpoint holds everything the next step depends on, not just the weights:

    model        the parameters
    optimizer    AdamW's two running averages per parameter and its step count
    step         where the learning-rate schedule and the batch sampler are
    rng_state    the random generators (dropout draws from them)

Two things can go wrong with ``torch.save(state, "checkpoint.pt")``. A crash
or a full disk halfway through the write leaves a truncated file under the
real name, and the previous good checkpoint is already gone; and
``torch.load`` of a file from elsewhere runs arbitrary code through pickle.
``save_checkpoint`` writes to a temporary file and renames it over the old
one only when it is complete; ``load_checkpoint`` loads with
``weights_only=True``, which accepts tensors and plain Python containers only.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """``torch.save(state, path)``, atomically: all of the new file or all of the old one, never half.

    The bytes go to ``path.tmp`` in the same folder, are flushed to the disk
    (fsync), and the temporary file is then renamed over ``path``. A rename
    within one file system is atomic, so a crash at any moment leaves either
    the old checkpoint or the new one under the real name. On an error the
    temporary file is removed and the old checkpoint stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on the disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by ``save_checkpoint``, loaded safely (``weights_only=True``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: train first (python -m llmbook.train --config ...), "
            "or point at the run folder's checkpoint.pt"
        )
    return torch.load(path, map_location=map_location, weights_only=True)


def rng_state() -> dict:
    """The state of every random generator training uses: Python, NumPy's global one, torch CPU and CUDA.

    Only types that ``torch.load(weights_only=True)`` accepts: NumPy's key array
    becomes a tensor, the rest are tuples, ints, floats and byte tensors.
    """
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": (version, tuple(keys), gauss),
        "numpy": (str(name), torch.from_numpy(np_keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured; the CUDA part only when this machine has CUDA."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np_keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
