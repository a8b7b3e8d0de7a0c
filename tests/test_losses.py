"""Cross-entropy from scratch against F.cross_entropy (values, gradients, ignore_index, huge logits); ppl and bpb."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from llmbook.losses import bits_per_byte, cross_entropy, perplexity

pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py

FP32 = {"atol": 1e-6, "rtol": 1e-6}


def reference(logits, targets, ignore_index=-100, reduction="mean"):
    """F.cross_entropy on (N, V) rows, reshaped back to the leading dims for "none"."""
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    return loss.reshape(targets.shape) if reduction == "none" else loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_matches_torch_values_and_grads(shape, reduction):
    V = 11
    logits = (3 * torch.randn(*shape, V)).requires_grad_()
    targets = torch.randint(0, V, shape)
    ours, theirs = cross_entropy(logits, targets, reduction=reduction), reference(logits, targets, reduction=reduction)
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    assert_close(ours, theirs, **FP32)
    weights = torch.randn(shape) if reduction == "none" else torch.tensor(1.0)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (g_theirs,) = torch.autograd.grad((theirs * weights).sum(), logits)
    assert_close(g_ours, g_theirs, **FP32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_ignore_index(reduction, ignore_index):
    V = 9
    logits = torch.randn(4, 6, V, requires_grad=True)
    targets = torch.randint(1, V, (4, 6))
    targets[:, :3] = ignore_index  # a prompt we do not train on
    ours = cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    theirs = reference(logits, targets, ignore_index, reduction)
    assert_close(ours, theirs, **FP32)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), logits)
    assert_close(g_ours, g_theirs, **FP32)
    assert (g_ours[:, :3] == 0).all()  # ignored positions get no gradient
    if reduction == "none":
        assert (ours[:, :3] == 0).all()


def test_all_ignored_mean_is_nan_like_torch():
    logits, targets = torch.randn(3, 5), torch.full((3,), -100)
    assert torch.isnan(cross_entropy(logits, targets)) and torch.isnan(F.cross_entropy(logits, targets))
    assert cross_entropy(logits, targets, reduction="sum").item() == 0.0


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[1e4, 0.0, -1e4], [1e4, 1e4, 0.0], [-1e4, -1e4, -1e4]], requires_grad=True)
    targets = torch.tensor([1, 0, 2])
    ours = cross_entropy(logits, targets, reduction="none")
    assert torch.isfinite(ours).all()
    assert_close(ours, F.cross_entropy(logits, targets, reduction="none"), **FP32)
    assert_close(ours.detach(), torch.tensor([1e4, math.log(2), math.log(3)]), **FP32)
    ours.sum().backward()
    assert torch.isfinite(logits.grad).all()
    naive = -(logits.exp() / logits.exp().sum(-1, keepdim=True)).log()[range(3), targets]
    assert not torch.isfinite(naive).all()  # what the max subtraction saves us from


def test_worked_example_and_uniform_logits():
    assert_close(cross_entropy(torch.tensor([2.0, 1.0, 0.0]), torch.tensor(0)), torch.tensor(0.40760596))
    V = 65
    loss = cross_entropy(torch.zeros(10, V), torch.randint(0, V, (10,)))
    assert_close(loss, torch.tensor(math.log(V)))


def test_half_precision_logits_are_upcast():
    logits, targets = torch.randn(8, 50) * 4, torch.randint(0, 50, (8,))
    loss = cross_entropy(logits.bfloat16(), targets)
    assert loss.dtype == torch.float32
    assert_close(loss, F.cross_entropy(logits.bfloat16().float(), targets), **FP32)


def test_errors():
    with pytest.raises(ValueError, match=r"\(\.\.\., V\)"):
        cross_entropy(torch.randn(4, 5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="n_bytes"):
        bits_per_byte(1.0, 0)


def test_perplexity_and_bits_per_byte():
    assert math.isclose(perplexity(math.log(65)), 65)
    assert perplexity(0.0) == 1.0
    assert math.isclose(bits_per_byte(math.log(256) * 1000, 1000), 8.0)  # a uniform guess over bytes
    # the same total over the same text, cut into 4x fewer tokens: 4x the loss per token, the same bpb
    assert math.isclose(bits_per_byte(1000 * 1.5, 1000), bits_per_byte(250 * 6.0, 1000))
    assert math.isclose(bits_per_byte(math.log(2), 1), 1.0)
