"""Packing: several short examples in one row of the context, none of them seeing the others.

SFT examples are short and of all lengths; padding each batch to its longest
example wastes the compute spent on pads (the chapter measures how much).
Packing puts examples one after another in rows of ``context_length`` tokens:

    row 0   [a a a a b b b ·]        segments  [0 0 0 0 1 1 1 -1]
    row 1   [c c c c c d d d]                  [0 0 0 0 0 1 1 1]

Two things keep a packed example exactly what it was alone:

1. **A block-diagonal causal mask**: token i of ``b`` may attend to token j only
   if j <= i and both belong to ``b``. Plain causal attention would let ``b``
   read ``a``, a different conversation. ``mask`` is ``(B, 1, T, T)`` bool, which
   ``GPT.forward`` takes as is (it broadcasts over the heads). The pads at the
   end of a row form a segment of their own, so no query row is fully masked
   (a softmax over nothing is 0/0 in some kernels).
2. **Positions restarting at 0 per example**: ``positions`` ``[0 1 2 3 0 1 2 ·]``.
   A GPT-2 style model adds a learned embedding per position, and ``b`` must get
   the embeddings of 0, 1, 2 that it trained with alone, not those of 4, 5, 6.

RoPE (Llama style) needs no reset to be exact in exact arithmetic: it rotates
queries and keys by their positions and the score depends only on their
difference, which is the same within ``b`` wherever ``b`` sits; with the mask,
no other difference occurs. llmbook's attention in fact ignores ``positions``
for RoPE (it rotates by the offset in the row, ``MultiHeadAttention.forward``),
so a packed Llama-style example is computed with other absolute angles than
alone and agrees to float rounding, not bit for bit (per-token losses within
1e-6 in ``tests/test_packing.py``, like the GPT-2 style model, whose matmuls
merely have other shapes).
Hugging Face instead passes ``position_ids`` to RoPE
(``DataCollatorWithFlattening`` restarts them per example, and FlashAttention's
variable-length kernel takes the boundaries as ``cu_seqlens`` instead of a
T x T mask). The dense mask here costs T² memory, fine at the book's sizes.

The loss is unchanged too: ``y`` holds each example's shifted labels, with
-100 at every example's last token (it would otherwise predict the next
example's first) and on pads, so the mean over a packed batch is the mean over
the same response tokens as an unpacked one (``tests/test_packing.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from llmbook.posttrain.collate import shift_labels
from llmbook.posttrain.masking import IGNORE_INDEX, Example


class PackedBatch(NamedTuple):
    """``(x, y, mask, positions, segments)``: pass ``model(x, y, positions=positions, mask=mask)``."""

    x: Tensor  # (B, T) ids
    y: Tensor  # (B, T) y[b, t] is the label of x[b, t+1] within the same example, else -100
    mask: Tensor  # (B, 1, T, T) bool: True where query t may attend to key s (same segment, s <= t)
    positions: Tensor  # (B, T) position within the example: 0, 1, ... restarting at each example
    segments: Tensor  # (B, T) which example of the row each token belongs to: 0, 1, ...; -1 for pads
    rows: list[list[int]]  # rows[b]: the indices of the examples in row b, in order


def first_fit(lengths: Sequence[int], capacity: int, decreasing: bool = True) -> list[list[int]]:
    """Greedy bin packing: each example goes into the first row with room for it, or a new row.

    With ``decreasing`` the longest examples are placed first (first-fit
    decreasing), which never needs more than 11/9 of the fewest possible rows
    plus 6/9 (Dósa 2007); in the given order, at most about 1.7 times the
    fewest (Johnson et al. 1974). Finding the fewest is NP-hard; greedy is close.

    >>> first_fit([3, 5, 2, 4, 1], capacity=6)
    [[1, 4], [3, 2], [0]]
    """
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise ValueError(
                f"example {i} has {n} tokens; packing needs 1..{capacity} (context_length): "
                f"drop it or truncate it with tokenize_example(..., max_len={capacity}, truncate=True)"
            )
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if decreasing else range(len(lengths))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def block_diagonal_causal_mask(segments: Tensor) -> Tensor:
    """``(B, T)`` segment ids -> ``(B, 1, T, T)`` bool: query t sees key s iff same segment and s <= t.

    >>> block_diagonal_causal_mask(torch.tensor([[0, 0, 1]]))[0, 0].long()
    tensor([[1, 0, 0],
            [1, 1, 0],
            [0, 0, 1]])
    """
    T = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return (same & causal)[:, None]  # (B, 1, T, T): one mask for every head


def pack(
    examples: Sequence[Example], context_length: int, pad_id: int, decreasing: bool = True,
    rows: Sequence[Sequence[int]] | None = None,
) -> PackedBatch:
    """Pack examples into rows of ``context_length`` tokens with ``first_fit``; see the module docstring.

    ``rows`` (lists of indices into ``examples``) gives the rows instead: SFT
    packs its whole training set once and draws batches of rows from it.
    """
    if not examples:
        raise ValueError("pack needs at least one example")
    if rows is None:
        rows = first_fit([len(e) for e in examples], context_length, decreasing)
    elif any(sum(len(examples[i]) for i in row) > context_length for row in rows):
        raise ValueError(f"a row holds more than context_length={context_length} tokens")
    rows = [list(row) for row in rows]
    B, T = len(rows), context_length
    x = torch.full((B, T), pad_id, dtype=torch.long)
    y = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row):
            n = len(examples[i])
            x[b, at:at + n] = torch.tensor(examples[i].input_ids)
            # shifted within the example, so its last token gets -100 and never predicts the next example
            y[b, at:at + n] = shift_labels(torch.tensor([examples[i].labels]))[0]
            positions[b, at:at + n] = torch.arange(n)
            segments[b, at:at + n] = s
            at += n
        positions[b, at:] = torch.arange(T - at)  # the pads: a segment of their own, positions from 0
    return PackedBatch(x, y, block_diagonal_causal_mask(segments), positions, segments, rows)


def packing_efficiency(lengths: Sequence[int], context_length: int, decreasing: bool = True) -> tuple[float, float]:
    """Fraction of real tokens among all tokens computed: (packed, every example padded to the longest)."""
    total = sum(lengths)
    packed = total / (len(first_fit(lengths, context_length, decreasing)) * context_length)
    padded = total / (len(lengths) * max(lengths))
    return packed, padded
