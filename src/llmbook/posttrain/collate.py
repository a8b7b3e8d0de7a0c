"""A batch of examples of different lengths: padding, shifted labels, a mask and positions.

Rows of a tensor have one length, so short examples are padded, and the pad
tokens must change nothing: no loss on them (label -100) and no attention to
them (``mask`` False). Where the padding goes depends on the job:

    right, to train       [a b c d]      the loss is taken at every position at once;
                          [e f · ·]      pads after the text are never seen by it (causal)
    left, to generate     [a b c d]      every row's last token is at the same index,
                          [· · e f]      so the next token of all rows is logits[:, -1]

``collate`` returns ``(x, y, mask, positions)`` for ``GPT.forward(x, y, positions=positions, mask=mask)``:

    x          (B, T)  the ids, padded with ``pad_id``
    y          (B, T)  y[b, t] is the label of x[b, t+1], the token position t must predict:
                       GPT.forward compares logits[:, t] with targets[:, t] and skips -100
                       (``F.cross_entropy(..., ignore_index=-100)``). The last position and
                       every pad get -100; so does a pad's successor under left padding.
    mask       (B, T)  bool, True for real tokens: GPT.forward hides the pad keys
    positions  (B, T)  0, 1, 2, ... counted over real tokens only: [·, ·, e, f] -> [0, 0, 0, 1],
                       so a left-padded row has the positions it has alone (learned position
                       embeddings use them; llmbook's RoPE sees only distances, see packing.py)

The mean loss of a batch is over its response tokens (token-weighted), which
is what ``F.cross_entropy`` computes: long answers weigh more than short ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from llmbook.posttrain.masking import IGNORE_INDEX, Example


class Batch(NamedTuple):
    """``(x, y, mask, positions)``, each ``(B, T)``; unpacks like a tuple."""

    x: Tensor
    y: Tensor
    mask: Tensor
    positions: Tensor


def shift_labels(labels: Tensor) -> Tensor:
    """``y[:, t] = labels[:, t+1]``, and -100 at the end: ``[[-100, 7, 8]] -> [[7, 8, -100]]``."""
    y = torch.full_like(labels, IGNORE_INDEX)
    y[:, :-1] = labels[:, 1:]
    return y


def collate(
    examples: Sequence[Example | Sequence[int]],
    pad_id: int,
    side: Literal["right", "left"] = "right",
    pad_to: int | None = None,
) -> Batch:
    """Pad examples (``Example``s, or plain id lists such as prompts) into one batch; see the module docstring.

    ``pad_to`` pads every row to that length (fixed shapes) instead of the longest.

    >>> x, y, mask, pos = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8, 9], [-100, 9])], pad_id=0)
    >>> x.tolist(), y.tolist(), pos.tolist()
    ([[5, 6, 7], [8, 9, 0]], [[6, 7, -100], [9, -100, -100]], [[0, 1, 2], [0, 1, 1]])
    >>> collate([[5, 6, 7], [8, 9]], pad_id=0, side="left").positions.tolist()
    [[0, 1, 2], [0, 0, 1]]
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' (training) or 'left' (batched generation), got {side!r}")
    if not examples:
        raise ValueError("collate needs at least one example")
    rows = [(e.input_ids, e.labels) if isinstance(e, Example) else (list(e), list(e)) for e in examples]
    if any(not ids for ids, _ in rows):
        raise ValueError("an example has no tokens")
    T = max(len(ids) for ids, _ in rows)
    if pad_to is not None:
        if pad_to < T:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({T} tokens)")
        T = pad_to
    B = len(rows)
    x = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for b, (ids, lab) in enumerate(rows):
        span = slice(0, len(ids)) if side == "right" else slice(T - len(ids), T)
        x[b, span] = torch.tensor(ids)
        labels[b, span] = torch.tensor(lab)
        mask[b, span] = True
    y = shift_labels(labels).masked_fill(~mask, IGNORE_INDEX)  # a pad never predicts (left: the first real token)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T): 0, 1, ... over the real tokens
    return Batch(x, y, mask, positions)
