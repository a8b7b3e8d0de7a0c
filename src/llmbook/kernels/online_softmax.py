"""Online softmax: a softmax computed block by block, in one pass, by rescaling what came before.

A softmax needs each row's max (for stability) and the sum of exp(s - max)
before it can output anything: two passes over a row it must keep. Instead,
keep three running numbers per row, the max ``m`` seen so far, the sum
``l = Σ exp(s - m)`` and, for attention, the weighted sum of values
``acc = Σ exp(s - m)·v``. When a block raises the max from m to m', the old
sums are too large by the factor exp(m' - m), so multiply them by exp(m - m')
and add the new block's terms. That is how FlashAttention attends to one
key/value tile at a time and never holds a whole row of T_k scores.

Scores [1, 3] then [2]: after the first block m = 3, l = e^-2 + 1 = 1.135;
the second block's max 2 < 3 keeps m and adds e^-1, l = 1.503; the softmax
is exp([1, 3, 2] - 3) / 1.503 = [0.090, 0.665, 0.245], as in one pass.

A row that is -inf everywhere (a query allowed to see no key) has m = -inf
and l = 0; it gives an output of zeros and lse = -inf, never NaN, as
``llmbook.attention.attention_with_lse`` does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

NEG_INF = float("-inf")


def _finite(m: Tensor) -> Tensor:
    """The max to subtract: ``m``, or 0 where the row has seen only -inf (exp(-inf - 0) = 0, not exp(NaN))."""
    return m.masked_fill(m == NEG_INF, 0.0)


class SoftmaxState(NamedTuple):
    """What a softmax-weighted average over some of the keys needs to remember, per query row."""

    m: Tensor  # (..., T_q) the largest score seen so far (-inf before any)
    l: Tensor  # (..., T_q) Σ exp(s - m) over the scores seen  # noqa: E741 (the paper's name)
    acc: Tensor  # (..., T_q, D) Σ exp(s - m)·v: the output, not yet divided by l


def partial_state(scores: Tensor, values: Tensor) -> SoftmaxState:
    """The state of one block of n keys: scores ``(..., T_q, n)``, the keys' values ``(..., n, D)``."""
    m = scores.amax(dim=-1)  # (..., T_q)
    p = torch.exp(scores - _finite(m)[..., None])  # (..., T_q, n), each <= 1
    return SoftmaxState(m, p.sum(dim=-1), p @ values.to(p.dtype))


def merge(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    """The state of the union of two blocks: rescale both to the larger max, then add.

    Equal to ``partial_state`` of the concatenated scores and values, up to
    rounding; order does not matter (``merge(a, b) == merge(b, a)``).
    """
    m = torch.maximum(a.m, b.m)  # (..., T_q)
    scale_a, scale_b = torch.exp(a.m - _finite(m)), torch.exp(b.m - _finite(m))  # <= 1: shrink the smaller max's sums
    return SoftmaxState(m, a.l * scale_a + b.l * scale_b, a.acc * scale_a[..., None] + b.acc * scale_b[..., None])


def finish(state: SoftmaxState) -> tuple[Tensor, Tensor]:
    """``(out (..., T_q, D), lse (..., T_q) float32)``: divide by the sum once, at the end; lse = m + log l."""
    denom = state.l.masked_fill(state.l == 0, 1.0)  # a fully masked row: acc = 0, and 0 / 1 = 0
    lse = _finite(state.m) + torch.log(state.l)  # log 0 = -inf for a fully masked row
    return state.acc / denom[..., None], lse.float()


def online_softmax(x: Tensor, block: int) -> Tensor:
    """softmax(x) over the last dim, reading x ``block`` columns at a time to find the max and the sum.

    The loop is the online normalizer: one pass keeps ``m_i`` and ``l_i`` up to
    date; the output exp(x - m) / l is written once they are final.

    >>> online_softmax(torch.tensor([1.0, 3.0, 2.0]), block=2)  # blocks [1, 3] and [2], as above
    tensor([0.0900, 0.6652, 0.2447])
    """
    if block <= 0:
        raise ValueError(f"block must be a positive number of columns, got {block}")
    m_i = torch.full(x.shape[:-1], NEG_INF, dtype=x.dtype, device=x.device)  # (...,) running max
    l_i = torch.zeros_like(m_i)  # (...,) running Σ exp(x - m_i)
    for start in range(0, x.shape[-1], block):
        xb = x[..., start : start + block]  # (..., block)
        m_new = torch.maximum(m_i, xb.amax(dim=-1))
        # the old sum was taken relative to m_i: rescale it to m_new, then add this block's terms
        l_i = l_i * torch.exp(m_i - _finite(m_new)) + torch.exp(xb - _finite(m_new)[..., None]).sum(dim=-1)
        m_i = m_new
    return torch.exp(x - _finite(m_i)[..., None]) / l_i.masked_fill(l_i == 0, 1.0)[..., None]
