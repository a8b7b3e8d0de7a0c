"""Log-probabilities of responses: the number DPO, reward models and GRPO are all built from.

A language model gives ``log p(y_t | prompt, y_<t)`` for each token of a
response; the response's log-probability is their sum over its tokens:

    log π(y | x) = Σ_t log π(y_t | x, y_<t)          (summed: what DPO's derivation uses)
    (1 / |y|) Σ_t log π(y_t | x, y_<t)               (averaged: per token, no bias for short answers)

Only the response's tokens count. The batch comes from Chapter 9's
``collate``, whose shifted labels ``y`` are -100 on the prompt and on padding,
so the mask is simply ``y != -100``: the same masking as SFT's loss.
A frozen reference model is scored the same way, under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llmbook.posttrain.collate import Batch
from llmbook.posttrain.masking import IGNORE_INDEX


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """``(B, T, V)`` logits and ``(B, T)`` shifted labels -> ``(B, T)`` log-probabilities of the labels, 0 where -100.

    ``log_softmax`` then ``gather``; computed in float32 whatever the logits' dtype
    (a bf16 log-probability has 8 bits of mantissa: sums of hundreds of them drift).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    keep = labels != IGNORE_INDEX
    safe = labels.masked_fill(~keep, 0)  # any valid index; the result there is zeroed below
    logp = torch.gather(F.log_softmax(logits.float(), dim=-1), -1, safe.unsqueeze(-1)).squeeze(-1)
    return logp * keep


def sequence_logprobs(model: torch.nn.Module, batch: Batch, average: bool = False) -> Tensor:
    """``(B,)``: each row's summed (or, with ``average``, per-token mean) log-probability of its response tokens.

    Runs ``model(x, positions=..., mask=...)``; gradients flow unless the caller
    wraps it in ``torch.no_grad()`` (the reference model). A row with no
    response token is a ValueError: its log-probability would be 0 and silently
    count as a certain answer.
    """
    x, y, mask, positions = batch
    device = next(model.parameters()).device
    x, y, mask, positions = x.to(device), y.to(device), mask.to(device), positions.to(device)
    logits, _ = model(x, positions=positions, mask=mask)
    logp = token_logprobs(logits, y)
    n = (y != IGNORE_INDEX).sum(dim=1)
    if bool((n == 0).any()):
        raise ValueError("a row has no response token (all labels -100): nothing to score")
    total = logp.sum(dim=1)
    return total / n if average else total


def response_lengths(batch: Batch) -> Tensor:
    """``(B,)``: how many response tokens each row has (what ``average=True`` divides by)."""
    return (batch.y != IGNORE_INDEX).sum(dim=1)
