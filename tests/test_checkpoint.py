"""Checkpoints: atomic writes, safe loads, and random-generator state that survives the round trip."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from llmbook.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


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
    # the file is exactly what torch.load(weights_only=True) accepts
    assert torch.equal(torch.load(path, weights_only=True)["model"]["bias"], state["model"]["bias"])


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
    torch.save({"payload": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)


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
