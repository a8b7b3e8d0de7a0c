"""Checks for Chapter 5's exercises: RMSNorm, LayerNorm, top-k and top-p filtering.

Every expected value comes from ``llmbook.layers`` and ``llmbook.generate``,
which the test suite checks against PyTorch and Hugging Face, so a check and
the chapter can never disagree. When an answer is wrong, the check tries to
name the usual mistake (a mean that RMSNorm does not subtract, the unbiased
variance, zeros instead of minus infinity, the token that crosses p left out,
...) by comparing it with the wrong answers that those mistakes produce.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmbook import generate, layers
from llmbook.exercises import exercise
from llmbook.exercises.tensors import close as _close
from llmbook.exercises.tensors import first_hint as _first_hint
from llmbook.exercises.tensors import random_tensor as _random
from llmbook.exercises.tensors import returned_tensor as _returned_tensor


def _unchanged(given: list[Tensor], original: list[Tensor], name: str) -> None:
    if any(not torch.equal(a, b) for a, b in zip(given, original, strict=True)):
        raise AssertionError(f"{name} changed its inputs; compute a new tensor instead (e.g. masked_fill, "
                             "not masked_fill_, and no `x -= ...`)")


def _max_error(got: Tensor, expected: Tensor) -> float:
    finite = torch.isfinite(expected) & torch.isfinite(got)
    if not torch.equal(torch.isfinite(got), torch.isfinite(expected)):
        return float("inf")
    return (got[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0


# test inputs with a clear nonzero mean, so that forgetting (or adding) the mean shows
_NORM_CASES = [  # (shape, eps)
    ((2, 3, 8), 1e-5),
    ((1, 5, 64), 1e-6),
    ((4, 16), 1e-5),
    ((2, 7, 32), 0.5),  # a large eps (and small inputs) tells eps inside the square root from eps outside
]


def _norm_inputs(shape: tuple[int, ...], eps: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    x = _random(*shape, seed=seed) * (0.3 if eps >= 0.1 else 2.0) + 1.5
    weight = 1 + 0.5 * _random(shape[-1], seed=seed + 100)
    bias = 0.5 * _random(shape[-1], seed=seed + 200)
    return x, weight, bias


# ---------------------------------------------------------------------------
# 5.1 RMSNorm
# ---------------------------------------------------------------------------


@exercise("5.1", solution="rms_norm")
def check_rms_norm(rms_norm):
    for seed, (shape, eps) in enumerate(_NORM_CASES):
        x, weight, _ = _norm_inputs(shape, eps, seed)
        given = [x.clone(), weight.clone()]
        what = f"x of shape {shape}, weight of shape {(shape[-1],)}, eps={eps}"
        got = _returned_tensor(rms_norm(*given, eps), "rms_norm", shape, what)
        _unchanged(given, [x, weight], "rms_norm")
        reference = layers.RMSNorm(shape[-1], eps=eps)
        with torch.no_grad():
            reference.weight.copy_(weight)
            expected = reference(x)
        if _close(got, expected):
            continue
        ms = x.pow(2).mean(-1, keepdim=True)
        centered = x - x.mean(-1, keepdim=True)
        hint = _first_hint(got, [
            (centered / (centered.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight,
             "RMSNorm does not subtract the mean: that is LayerNorm. Divide x itself by sqrt(mean(x²) + eps)"),
            (x / (ms + eps).sqrt(), "multiply the normalized x by `weight`, the learned scale"),
            (x / (x.pow(2).sum(-1, keepdim=True) + eps).sqrt() * weight,
             "divide by the root of the *mean* of the squares over the last dim, not of their sum"),
            (x / (ms.sqrt() + eps) * weight, "eps goes inside the square root: sqrt(mean(x²) + eps)"),
            (x / (x.pow(2).mean(0, keepdim=True) + eps).sqrt() * weight,
             "take the mean over the last dim (the channels of each token), not over the batch"),
        ])
        raise AssertionError(f"rms_norm({what}) differs from llmbook.layers.RMSNorm by up to "
                             f"{_max_error(got, expected):.3g}{hint}")


# ---------------------------------------------------------------------------
# 5.2 LayerNorm
# ---------------------------------------------------------------------------


@exercise("5.2", solution="layer_norm")
def check_layer_norm(layer_norm):
    for seed, (shape, eps) in enumerate(_NORM_CASES):
        x, weight, bias = _norm_inputs(shape, eps, seed)
        given = [x.clone(), weight.clone(), bias.clone()]
        what = f"x of shape {shape}, weight and bias of shape {(shape[-1],)}, eps={eps}"
        got = _returned_tensor(layer_norm(*given, eps), "layer_norm", shape, what)
        _unchanged(given, [x, weight, bias], "layer_norm")
        reference = layers.LayerNorm(shape[-1], eps=eps)
        with torch.no_grad():
            reference.weight.copy_(weight)
            reference.bias.copy_(bias)
            expected = reference(x)
        assert _close(expected, torch.nn.functional.layer_norm(x, (shape[-1],), weight, bias, eps))
        if _close(got, expected):
            continue
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, correction=0)
        normed = (x - mean) / (var + eps).sqrt()
        hint = _first_hint(got, [
            ((x - mean) / (x.var(-1, keepdim=True, correction=1) + eps).sqrt() * weight + bias,
             "use the biased variance (divide by C, not C - 1): x.var(-1, correction=0), as PyTorch does"),
            (normed * weight, "add the learned shift `bias` after scaling by `weight`"),
            (normed + bias, "multiply by the learned scale `weight` before adding `bias`"),
            (normed, "scale by `weight` and shift by `bias` after normalizing"),
            ((x - mean) / (var.sqrt() + eps) * weight + bias, "eps goes inside the square root: sqrt(var + eps)"),
            (x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight + bias,
             "subtract the mean before dividing by the standard deviation"),
            ((x - x.mean(0, keepdim=True)) / (x.var(0, keepdim=True, correction=0) + eps).sqrt() * weight + bias,
             "normalize over the last dim (each token's channels), not over the batch: that is BatchNorm"),
        ])
        raise AssertionError(f"layer_norm({what}) differs from llmbook.layers.LayerNorm by up to "
                             f"{_max_error(got, expected):.3g}{hint}")


# ---------------------------------------------------------------------------
# 5.3 top-k
# ---------------------------------------------------------------------------


def _check_filter(fn, name: str, reference, cases, wrong_answers) -> None:
    """Shared loop of the top-k and top-p checks: shape, no in-place change, -inf pattern, values."""
    for seed, (shape, arg) in enumerate(cases):
        logits = _random(*shape, seed=seed) * 2
        given = logits.clone()
        what = f"logits of shape {shape}, {arg}"
        got = _returned_tensor(fn(given, arg), name, shape, what)
        _unchanged([given], [logits], name)
        expected = reference(logits, arg)
        if _close(got, expected):
            continue
        kept, should_keep = torch.isfinite(got), torch.isfinite(expected)
        if torch.equal(kept, should_keep):
            hint = "; the right tokens survive, but change their logits: keep the survivors' logits unchanged"
        elif kept.all():
            zeros = (got == 0) & ~should_keep
            hint = ("; no logit is -inf. Set the removed tokens' logits to float('-inf'): a logit of 0 still has "
                    "probability after the softmax" if zeros.any() else
                    "; nothing was removed: set the logits of the removed tokens to float('-inf')")
        else:
            hint = _first_hint(got, wrong_answers(logits, arg))
            if not hint:
                n_got, n_want = kept.sum(-1).flatten()[0].item(), should_keep.sum(-1).flatten()[0].item()
                hint = (f"; the first row keeps {n_got} tokens, it should keep {n_want}" if n_got != n_want else
                        "; the right number of tokens survive, but not the right ones")
        raise AssertionError(f"{name}({what}) differs from llmbook.generate.{reference.__name__}{hint}")


def _keep(logits: Tensor, keep: Tensor) -> Tensor:
    return logits.masked_fill(~keep, float("-inf"))


def _top_k_wrong(logits: Tensor, k: int) -> list[tuple[Tensor, str]]:
    order = logits.argsort(dim=-1, descending=True).argsort(dim=-1)  # rank of each logit, 0 = largest
    rank_asc = logits.argsort(dim=-1).argsort(dim=-1)
    return [
        (_keep(logits, rank_asc < k), "you kept the k *smallest* logits: keep the k largest (torch.topk)"),
        (_keep(logits, order < k + 1), "one token too many: keep exactly k tokens (kth largest value and up)"),
        (_keep(logits, order < k - 1), "one token too few: the kth largest logit itself must survive (use >=)"),
        (_keep(logits, logits.argsort(dim=0, descending=True).argsort(dim=0) < k),
         "filter along the last dim (the vocabulary), not the first"),
    ]


@exercise("5.3", solution="top_k_filter")
def check_top_k_filter(top_k_filter):
    cases = [((1, 10), 3), ((2, 3, 50), 1), ((4, 100), 10), ((3, 7), 7), ((20,), 5)]
    _check_filter(top_k_filter, "top_k_filter", generate.filter_top_k, cases, _top_k_wrong)


# ---------------------------------------------------------------------------
# 5.4 top-p
# ---------------------------------------------------------------------------


def _top_p_wrong(logits: Tensor, p: float) -> list[tuple[Tensor, str]]:
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cum = sorted_probs.cumsum(-1)

    def unsort(keep_sorted: Tensor) -> Tensor:
        return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)

    return [
        (_keep(logits, unsort((cum <= p) | (torch.arange(cum.shape[-1]) == 0).expand_as(cum))),
         "the token whose probability carries the total past p must be kept too: remove a token only if the "
         "tokens ranked above it already reach p (cumulative minus its own probability >= p)"),
        (_keep(logits, unsort(cum < p)),
         "keep the token that crosses p, and always keep the most likely token"),
        (_keep(logits, cum - sorted_probs < p),
         "the mask is in sorted order: put it back in vocabulary order (scatter it with the sort's indices)"),
        (_keep(logits, unsort((logits.sort(-1, descending=True).values.cumsum(-1) - logits.sort(
            -1, descending=True).values) < p)),
         "accumulate probabilities (softmax of the logits), not the logits themselves"),
    ]


@exercise("5.4", solution="top_p_filter")
def check_top_p_filter(top_p_filter):
    cases = [((1, 10), 0.5), ((2, 3, 50), 0.9), ((4, 100), 0.3), ((3, 7), 0.999), ((20,), 0.05)]
    _check_filter(top_p_filter, "top_p_filter", generate.filter_top_p, cases, _top_p_wrong)
