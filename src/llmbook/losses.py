"""The pretraining objective: cross-entropy of the next token, and two ways to read it.

For each position the model gives logits ``z`` over the vocabulary; the loss
is minus the log-probability it gave the token that came next:

    loss = -log softmax(z)[y] = logsumexp(z) - z[y]            (in nats)

With logits [2, 1, 0] and target 0: logsumexp = 2.408, loss = 0.408 nats.
``exp(z)`` overflows float32 for z > 88, so logsumexp is computed as
``m + log(sum(exp(z - m)))`` with ``m = max(z)``: every exponent is then at
most 0, and the result is the same number. (The code never adds ``m`` back:
it cancels against ``z[y] - m``.)

A loss in nats per token depends on the tokenizer: a token of GPT-2 carries
about four characters, a byte token one. ``bits_per_byte`` divides by the
text instead, so models with different tokenizers can be compared.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor


def cross_entropy(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    """Cross-entropy from scratch: logits ``(..., V)``, integer targets ``(...)``; same as ``F.cross_entropy``.

    Targets equal to ``ignore_index`` (padding, prompts we do not train on)
    add nothing; "mean" averages over the others only. Half-precision logits
    are upcast to float32 first: softmax over 50,000 tokens in bfloat16 loses
    the small probabilities the loss is about.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} plus a vocabulary dim: "
            "(..., V) and (...)"
        )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()

    # subtract the row max: exponents are then <= 0. m cancels out of the loss, so autograd may treat it as a
    # constant, and we keep working with z - m rather than adding m back: (m + 0.69) - m is not 0.69 when m = 1e4
    m = logits.amax(dim=-1, keepdim=True).detach()  # (..., 1)
    shifted = logits - m  # (..., V), max 0
    lse = torch.log(torch.exp(shifted).sum(dim=-1))  # (...), logsumexp(z) - m

    # the (shifted) logit of the right token; ignored positions look up token 0 and are zeroed below
    keep = targets != ignore_index  # (...)
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    target_logit = shifted.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (...)
    loss = torch.where(keep, lse - target_logit, torch.zeros_like(lse))

    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum()  # 0/0 = nan when every target is ignored, as in PyTorch


def perplexity(mean_nats: float) -> float:
    """``exp(loss)``: the number of equally likely tokens the model is, on average, choosing among.

    A uniform guess over V tokens has loss ln V and perplexity V; ``perplexity(math.log(65)) == 65``.
    """
    return math.exp(mean_nats)


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Total loss over a text, in bits, divided by the text's length in UTF-8 bytes.

    ``total_nats / (ln 2 · n_bytes)``. Per token, a model with longer tokens
    pays more nats for each (it predicts more text at once) but needs fewer
    tokens, so losses per token of different tokenizers do not compare. The
    total over the same text does: it is how many bits the model would need
    to encode that text (Shannon), whichever way it was cut into tokens, and
    dividing by the bytes makes it a rate. A model that knows nothing about
    bytes beyond a uniform guess scores 8 bits per byte.
    """
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be positive, got {n_bytes}")
    return total_nats / (math.log(2) * n_bytes)
