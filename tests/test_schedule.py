"""The cosine learning-rate schedule: 0 -> peak in warmup, cosine to the floor, the floor after; set_lr."""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError

import pytest
import torch

from llmbook.schedule import CosineSchedule, set_lr


@pytest.mark.parametrize("warmup, decay", [(100, 1000), (10, 50), (0, 40), (1, 2), (30, 30)])
def test_shape(warmup, decay):
    s = CosineSchedule(peak_lr=1e-3, warmup_steps=warmup, decay_steps=decay, min_ratio=0.1)
    lrs = [s(t) for t in range(decay + 50)]
    assert all(lr > 0 for lr in lrs)
    # warmup: a straight line from peak/(warmup+1), strictly rising to the peak at step == warmup
    assert lrs[0] == pytest.approx(1e-3 / (warmup + 1))
    assert all(b > a for a, b in zip(lrs[: warmup + 1], lrs[1 : warmup + 1], strict=False))
    assert all(lrs[t] == pytest.approx(1e-3 * (t + 1) / (warmup + 1)) for t in range(warmup))
    assert lrs[warmup] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    # decay: never rising from the peak down to the floor at decay_steps ...
    decay_part = lrs[warmup : decay + 1]
    assert all(b <= a for a, b in zip(decay_part, decay_part[1:], strict=False))
    if decay > warmup:
        assert lrs[decay] == pytest.approx(1e-4, rel=1e-12)
        middle = (warmup + decay) / 2
        if middle == int(middle):  # halfway, the cosine is halfway between peak and floor
            assert lrs[int(middle)] == pytest.approx((1e-3 + 1e-4) / 2)
    # ... and the floor from then on
    assert all(lr == pytest.approx(1e-4, rel=1e-12) for lr in lrs[decay + 1 :])


def test_matches_nanogpt_formula():
    peak, warmup, decay, floor = 6e-4, 20, 200, 6e-5
    s = CosineSchedule(peak, warmup, decay, min_ratio=0.1)
    for t in range(warmup, decay + 1):
        ratio = (t - warmup) / (decay - warmup)
        assert s(t) == pytest.approx(floor + 0.5 * (1 + math.cos(math.pi * ratio)) * (peak - floor))


def test_min_ratio_extremes():
    assert CosineSchedule(1.0, 0, 10, min_ratio=0.0)(10) == pytest.approx(0.0, abs=1e-15)
    constant = CosineSchedule(1.0, 0, 10, min_ratio=1.0)
    assert all(constant(t) == pytest.approx(1.0) for t in range(20))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(peak_lr=0.0, warmup_steps=0, decay_steps=10), "peak_lr"),
        (dict(peak_lr=1e-3, warmup_steps=-1, decay_steps=10), "warmup_steps"),
        (dict(peak_lr=1e-3, warmup_steps=20, decay_steps=10), "decay_steps"),
        (dict(peak_lr=1e-3, warmup_steps=0, decay_steps=10, min_ratio=1.5), "min_ratio"),
        (dict(peak_lr=1e-3, warmup_steps=0, decay_steps=10, min_ratio=-0.1), "min_ratio"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CosineSchedule(**kwargs)


def test_frozen_and_negative_step():
    s = CosineSchedule(1e-3, 10, 100)
    with pytest.raises(FrozenInstanceError):
        s.peak_lr = 1.0
    with pytest.raises(ValueError, match="step"):
        s(-1)


def test_set_lr_changes_every_group():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    opt.step()
    assert torch.equal(a.detach(), torch.full((2,), 0.75)) and torch.equal(b.detach(), torch.full((2,), 0.75))
