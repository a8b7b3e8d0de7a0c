"""Which query x key tiles a causal kernel must compute: causal skipping, counted.

FlashAttention cuts the T_q x T_k score matrix into tiles of block_q queries
by block_k keys. With a causal mask (bottom-right aligned, as
``llmbook.attention.causal_mask``: query i sees key j iff j <= i + T_k - T_q)
each tile is one of three kinds:

    SKIP      every key is in the future of every query: never computed
    DIAGONAL  the tile crosses the diagonal: computed, then masked
    FULL      every query sees every key: computed, no mask needed

For T_q = T_k and n tiles a side, n(n+1)/2 of the n² tiles are visited: 36 of
64 at T = 1024 with 128-wide tiles, little more than half the work.

>>> tile_grid(4, 4, 2, 2, causal=True)
tensor([[1, 0],
        [2, 1]])
>>> tile_counts(1024, 1024, 128, 128, causal=True)
(36, 64)
"""

from __future__ import annotations

import torch
from torch import Tensor

SKIP, DIAGONAL, FULL = 0, 1, 2


def tile_kind(q_start: int, q_end: int, k_start: int, k_end: int, t_q: int, t_k: int, causal: bool) -> int:
    """The kind of the tile of queries ``[q_start, q_end)`` and keys ``[k_start, k_end)``."""
    if not causal:
        return FULL
    offset = t_k - t_q  # query i sees keys j <= i + offset
    if k_start > q_end - 1 + offset:  # even the tile's last query sees none of its keys
        return SKIP
    if k_end - 1 <= q_start + offset:  # even the tile's first query sees all of them
        return FULL
    return DIAGONAL


def tile_grid(t_q: int, t_k: int, block_q: int, block_k: int, causal: bool) -> Tensor:
    """The kind of every tile, ``(ceil(t_q / block_q), ceil(t_k / block_k))`` int: SKIP, DIAGONAL or FULL.

    The last row and column of tiles are ragged when a length is not a
    multiple of its block; they count as tiles all the same.
    """
    if min(block_q, block_k) <= 0:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
    rows = [
        [tile_kind(qs, min(qs + block_q, t_q), ks, min(ks + block_k, t_k), t_q, t_k, causal)
         for ks in range(0, t_k, block_k)]
        for qs in range(0, t_q, block_q)
    ]
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), -(-t_k // block_k))


def tile_counts(t_q: int, t_k: int, block_q: int, block_k: int, causal: bool) -> tuple[int, int]:
    """``(visited, total)``: the tiles a kernel computes (all but the SKIP ones) and all tiles."""
    grid = tile_grid(t_q, t_k, block_q, block_k, causal)
    return int((grid != SKIP).sum()), grid.numel()
