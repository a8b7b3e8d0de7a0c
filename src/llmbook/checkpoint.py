"""Checkpoints: save a training run so that a crash costs minutes, not the run.

A checkpoint holds everything the next step depends on, not just the weights:

    model        the parameters
    optimizer    AdamW's two running averages per parameter and its step count
    step         where the learning-rate schedule and the batch sampler are
    rng_state    the random generators (dropout draws from them)

Three things can go wrong with ``torch.save(state, "checkpoint.pt")``. A crash
or a full disk halfway through the write leaves a truncated file under the
real name, and the previous good checkpoint is already gone; a disk or a copy
can flip bits that nobody notices until the weights are garbage; and
``torch.load`` of a file from elsewhere runs arbitrary code through pickle.
``save_checkpoint`` writes to a temporary file and renames it over the old
one only when it is complete, with a SHA-256 of the bytes in a one-line
header; ``load_checkpoint`` checks the SHA-256, then loads with
``weights_only=True``, which accepts tensors and plain Python containers only.

    LLMBOOK-CHECKPOINT 1 sha256=<64 hex digits> size=<bytes>\\n<the bytes torch.save wrote>
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from llmbook.errors import CheckpointError, RunError, UnsafeCheckpointError

MAGIC = b"LLMBOOK-CHECKPOINT"
_HEADER = re.compile(rb"LLMBOOK-CHECKPOINT 1 sha256=([0-9a-f]{64}) size=(\d+)")


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """``torch.save(state, path)``, atomically and checksummed: all of the new file or all of the old one.

    The state is serialized in memory first, so an object that cannot be saved
    fails before the disk is touched. The bytes, behind a header with their
    SHA-256, go to a temporary file in the same folder, are flushed to the disk
    (fsync), and the temporary file is then renamed over ``path``. A rename
    within one file system is atomic, so a crash at any moment leaves either
    the old checkpoint or the new one under the real name. On an error the
    temporary file is removed and the old checkpoint stays as it was.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    header = b"%s 1 sha256=%s size=%d\n" % (MAGIC, hashlib.sha256(payload).hexdigest().encode(), len(payload))
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # unique: no clashes
        with open(fd, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on the disk before the name points at them
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise RunError(
                f"could not write {path} ({exc.strerror or exc}): free disk space or make the folder writable; "
                "the previous checkpoint, if any, is untouched"
            ) from None
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


def _payload(path: Path, data: bytes) -> io.BytesIO:
    """The bytes ``torch.save`` wrote, after checking the header's size and SHA-256; CheckpointError if damaged."""
    fix = f"delete {path} (or move it away) and train again, or resume from a good copy of it"
    if data.startswith(MAGIC):
        end = data.find(b"\n", 0, 256)
        match = _HEADER.fullmatch(data[:end]) if end > 0 else None
        if match is None:
            raise CheckpointError(f"{path} is damaged (its header is unreadable): {fix}")
        payload = memoryview(data)[end + 1 :]
        if len(payload) != int(match.group(2)):
            raise CheckpointError(f"{path} is truncated ({len(payload)} of {int(match.group(2))} bytes): {fix}")
        if hashlib.sha256(payload).hexdigest().encode() != match.group(1):
            raise CheckpointError(f"{path} is corrupted (its SHA-256 does not match the one saved with it): {fix}")
        return io.BytesIO(payload)
    if data.startswith(b"PK\x03\x04"):  # a plain torch.save file, without our header: loaded unchecked
        return io.BytesIO(data)
    what = "empty" if not data else "not a checkpoint (it has neither our header nor torch.save's format)"
    raise CheckpointError(f"{path} is {what}: {fix}")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by ``save_checkpoint``, checked and loaded safely (``weights_only=True``: no code runs).

    A damaged file (empty, truncated, bits flipped) raises ``CheckpointError``
    naming it; a file holding arbitrary Python objects raises
    ``UnsafeCheckpointError``, which is also the ``pickle.UnpicklingError``
    that ``torch.load`` raises. Files saved by plain ``torch.save`` load too,
    without the checksum.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: train first (python -m llmbook.train --config ...), "
            "or point at the run folder's checkpoint.pt"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} ({exc.strerror or exc}): check its permissions") from None
    buffer = _payload(path, data)
    try:
        state = torch.load(buffer, map_location=map_location, weights_only=True)
    except Exception as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise UnsafeCheckpointError(
                "Weights-only load refused the file: it holds objects other than tensors and plain containers, "
                f"and unpickling them could run code. File: {path}; load only checkpoints you trust"
            ) from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} cannot be loaded ({type(exc).__name__}: {reason[:200]}): delete it (or move it away) and "
            "train again, or resume from a good copy of it"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint's dict: use another file")
    return state


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
