"""Checkpoints: atomic writes, safe loads, and random-generator state that survives the round trip."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import random

import numpy as np
import pytest
import torch

from llmbook.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from llmbook.errors import CheckpointError, RunError, UnsafeCheckpointError


def _state(value: float) -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    with torch.no_grad():
        model.weight.fill_(value)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7, "config": {"lr": 1e-3, "x": None}}


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_round_trip_loads_with_weights_only(tmp_path):
    path = save_checkpoint(tmp_path / "sub" / "ckpt.pt", _state(0.5))  # creates the folder
    assert path == tmp_path / "sub" / "ckpt.pt"
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]  # no .tmp left behind
    state = load_checkpoint(path)
    assert state["step"] == 7 and state["config"] == {"lr": 1e-3, "x": None}
    assert torch.equal(state["model"]["weight"], torch.full((2, 3), 0.5))
    assert state["optimizer"]["state"][0]["exp_avg"].shape == (2, 3)
    # a one-line header with the payload's SHA-256, then exactly what torch.load(weights_only=True) accepts
    header, payload = path.read_bytes().split(b"\n", 1)
    assert header == b"LLMBOOK-CHECKPOINT 1 sha256=%s size=%d" % (hashlib.sha256(payload).hexdigest().encode(),
                                                                len(payload))
    assert torch.equal(torch.load(io.BytesIO(payload), weights_only=True)["model"]["bias"], state["model"]["bias"])


def test_overwrite_replaces_the_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _state(1.0))
    save_checkpoint(path, _state(2.0))
    assert torch.equal(load_checkpoint(path)["model"]["weight"], torch.full((2, 3), 2.0))
    assert not (tmp_path / "ckpt.pt.tmp").exists()


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_mid_save_keeps_the_old_file(tmp_path, monkeypatch, error):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _state(1.0))
    before = path.read_bytes()
    real_save = torch.save

    def crash_halfway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)  # half a file on disk ...
        raise error  # ... and then the crash

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(type(error)):
        save_checkpoint(path, _state(3.0))
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["model"]["weight"], torch.full((2, 3), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*train first"):
        load_checkpoint(tmp_path / "nope.pt")


class _Payload:
    """Any class: unpickling it could run code, so a safe load must refuse it."""


def test_load_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": _Payload()}, path)  # plain torch.save, no header
    with pytest.raises(pickle.UnpicklingError, match="Weights-only load refused"):
        load_checkpoint(path)
    save_checkpoint(path, {"payload": _Payload()})  # a valid checksum does not make it safe
    with pytest.raises(UnsafeCheckpointError, match=f"File: {path}"):
        load_checkpoint(path)


def test_plain_torch_save_files_still_load(tmp_path):
    torch.save({"step": 3, "w": torch.ones(2)}, tmp_path / "old.pt")  # a checkpoint from before checksums
    assert load_checkpoint(tmp_path / "old.pt")["step"] == 3


def _one_line_naming(exc_info, path) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("seed", range(6))
def test_flipped_bytes_are_caught_by_the_checksum(tmp_path, seed):
    """16 bytes changed anywhere (header, torch's zip structure, the tensors) never load silently."""
    path = save_checkpoint(tmp_path / "ckpt.pt", _state(1.5))
    data = bytearray(path.read_bytes())
    start = random.Random(seed).randrange(0, len(data) - 16) if seed else 200  # 200: inside the payload
    data[start : start + 16] = bytes(b ^ 0xFF for b in data[start : start + 16])
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = _one_line_naming(info, path)
    assert "delete" in message and ("corrupted" in message or "damaged" in message or "not a checkpoint" in message)


@pytest.mark.parametrize(
    "content, what",
    [(b"", "is empty"), (b"hello, I am not a checkpoint\n" * 10, "not a checkpoint"), ("half", "truncated"),
     ("zip-half", "cannot be loaded")],
)
def test_damaged_files_fail_with_one_line(tmp_path, content, what):
    path = tmp_path / "ckpt.pt"
    good = save_checkpoint(path, _state(1.0)).read_bytes()
    if content == "half":
        content = good[: len(good) // 2]
    elif content == "zip-half":  # a plain torch.save file cut in half: no checksum to catch it, torch.load does
        torch.save(_state(1.0), path)
        content = path.read_bytes()[:300]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=what) as info:
        load_checkpoint(path)
    assert "delete" in _one_line_naming(info, path)


def test_disk_full_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "ckpt.pt", _state(1.0))
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(RunError) as info:
        save_checkpoint(path, _state(2.0))
    message = _one_line_naming(info, path)
    assert "No space left on device" in message and "free disk space" in message
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_rng_state_restores_every_generator(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # numpy caches a second gaussian: part of its state too
    state = rng_state()
    first = _draws()
    _draws()  # move on
    set_rng_state(state)
    again = _draws()
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])

    # and through a checkpoint file, loaded with weights_only=True
    save_checkpoint(tmp_path / "rng.pt", {"rng_state": state})
    _draws()
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng_state"])
    third = _draws()
    assert first[:2] == third[:2] and torch.equal(first[2], third[2])


def test_rng_state_holds_only_safe_types():
    def safe(x) -> bool:
        if isinstance(x, dict):
            return all(isinstance(k, str) and safe(v) for k, v in x.items())
        if isinstance(x, list | tuple):
            return all(safe(v) for v in x)
        return x is None or isinstance(x, bool | int | float | str | torch.Tensor)

    assert safe(rng_state())
