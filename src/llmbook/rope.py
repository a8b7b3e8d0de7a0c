"""Rotary position embeddings (RoPE): a token's position as a rotation of its query and key.

Attention compares a query with a key only through their dot product. RoPE
(Su et al. 2021) turns each pair of dimensions of q and k by an angle that
grows with the token's position: pair i of the token at position m turns by
m·θ_i. Turning q by m·θ and k by n·θ leaves their dot product depending on
the angle between them, (m - n)·θ, so the scores see how far apart two tokens
are and nothing is added to the embeddings. One pair, θ = 1:

    q = [1, 0] at position m = 2  ->  [cos 2, sin 2]
    k = [1, 0] at position n = 1  ->  [cos 1, sin 1]
    q·k = cos 2 cos 1 + sin 2 sin 1 = cos(2 - 1) = 0.54, the same as for m = 7, n = 6

Pair i turns at θ_i = theta^(-2i/d) radians per token: from 1 for the first
pair down to about 1/theta for the last. Fast pairs tell neighbours apart,
slow ones distant tokens, like the second and hour hands of a clock.

Which dimensions form a pair is a convention, and there are two:

    interleaved=True    pairs (x[0], x[1]), (x[2], x[3]), ...       Meta's original Llama code
    interleaved=False   pairs (x[0], x[d/2]), (x[1], x[d/2+1]), ...  Hugging Face's Llama (default)

Both are the same model up to a reordering of each head's dimensions.
Hugging Face converted Meta's checkpoints by permuting the rows of Wq and Wk
(``interleaved_to_half_permutation``), which is why weights from the Hub only
work with the half-split convention.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def interleaved_to_half_permutation(head_dim: int) -> Tensor:
    """The reordering of a head's dimensions that turns interleaved pairs into half-split ones.

    Pair i is (x[2i], x[2i+1]) when interleaved and (x[i], x[i + d/2]) when
    half-split, so the even dimensions go first, then the odd ones:

    >>> interleaved_to_half_permutation(6)
    tensor([0, 2, 4, 1, 3, 5])

    Reordering the rows of every head of Wq and Wk by it, ``w[perm]``, gives a
    half-split model the same attention scores as the interleaved one: both
    rotate the same pairs by the same angles, and a dot product does not care
    in which order the dimensions are listed (v and the output are untouched).
    """
    if head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of dimensions, so head_dim must be even; got {head_dim}")
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotate each pair (x1, x2) of the last dim of ``x`` by the angle whose cos and sin are given.

    ``cos`` and ``sin`` hold one angle per pair, ``(..., d/2)``, and broadcast
    against ``x`` of shape ``(..., d)``. A 90° turn of one pair:

    >>> c, s = torch.tensor([0.0]), torch.tensor([1.0])
    >>> rotate_pairs(torch.tensor([1.0, 2.0]), c, s, interleaved=False)
    tensor([-2.,  1.])
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (..., d/2) each: pairs (x[2i], x[2i+1])
    else:
        x1, x2 = x.chunk(2, dim=-1)  # (..., d/2) each: pairs (x[i], x[i + d/2])
    # the 2-D rotation [[cos, -sin], [sin, cos]] applied to every pair at once
    r1 = x1 * cos - x2 * sin
    r2 = x1 * sin + x2 * cos
    if interleaved:
        return torch.stack([r1, r2], dim=-1).flatten(-2)  # (..., d/2, 2) -> (..., d), back in place
    return torch.cat([r1, r2], dim=-1)  # (..., d)


class RotaryEmbedding(nn.Module):
    """Rotates queries or keys ``(B, H, T, head_dim)`` by their positions; no trainable parameters.

    The angles m·θ_i of every position m < ``max_seq_len`` are computed once
    and kept as cos and sin tables ``(max_seq_len, head_dim // 2)``. They are
    non-persistent buffers: they move with ``.to(device)`` but stay out of the
    state dict, since they follow from the three numbers given here. (Note that
    ``.to(torch.bfloat16)`` casts them too; mixed precision with autocast keeps
    them in float32.)

    >>> rope = RotaryEmbedding(head_dim=4, max_seq_len=16)
    >>> q = torch.ones(1, 1, 3, 4)  # (B, H, T, D)
    >>> rope(q)[0, 0, 0]  # position 0: no rotation
    tensor([1., 1., 1., 1.])
    >>> rope(q).norm(dim=-1).round(decimals=4)  # rotations keep lengths
    tensor([[[2., 2., 2.]]])
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int = 4096,
        theta: float = 10000.0,  # the base of the frequencies: Llama 1 and 2 use 10000
        interleaved: bool = False,  # False: Hugging Face's half-split pairs; True: Meta's (x[2i], x[2i+1])
    ):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of dimensions, so head_dim must be even; got {head_dim}")
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.head_dim, self.max_seq_len, self.theta, self.interleaved = head_dim, max_seq_len, theta, interleaved

        # θ_i = theta^(-2i/d) for pair i = 0 .. d/2 - 1
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (d/2,)
        # the angle of pair i at position m is m·θ_i; computed in float64 because m·θ_i in
        # float32 loses about 1e-4 radians by position 4096, then stored in float32
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (max_seq_len, d/2)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def frequencies(self) -> Tensor:
        """θ_i, the radians per token that pair i turns, ``(head_dim // 2,)``: 1 down to about 1/theta."""
        return self.inv_freq

    def _check_positions(self, lowest: int, highest: int) -> None:
        if lowest < 0:
            raise ValueError(f"positions must be >= 0, got {lowest}")
        if highest >= self.max_seq_len:
            raise ValueError(
                f"position {highest} requested, but this RotaryEmbedding was built for "
                f"max_seq_len={self.max_seq_len} (positions 0..{self.max_seq_len - 1}); "
                "create it with a larger max_seq_len"
            )

    def forward(self, x: Tensor, positions: Tensor | int = 0) -> Tensor:
        """Rotate ``x`` ``(B, H, T, head_dim)``; ``positions`` is where its T tokens sit.

        An int is an offset: the tokens sit at ``positions .. positions + T - 1``
        (a KV cache holding ``positions`` tokens already). A tensor gives every
        token's position explicitly, ``(T,)`` shared by the batch or ``(B, T)``.
        """
        T, D = x.shape[-2], x.shape[-1]
        if D != self.head_dim:
            raise ValueError(f"x has head_dim {D} but this RotaryEmbedding was built for head_dim {self.head_dim}")
        if isinstance(positions, int):
            self._check_positions(positions, positions + T - 1)
            cos = self.cos[positions : positions + T]  # (T, d/2)
            sin = self.sin[positions : positions + T]  # (T, d/2)
        else:
            positions = positions.to(device=self.cos.device, dtype=torch.long)
            if positions.shape[-1] != T or positions.dim() not in (1, 2):
                raise ValueError(f"positions must be (T,) or (B, T) with T={T}, got shape {tuple(positions.shape)}")
            if positions.numel():
                self._check_positions(int(positions.min()), int(positions.max()))
            cos, sin = self.cos[positions], self.sin[positions]  # (T, d/2) or (B, T, d/2)
            if positions.dim() == 2:
                cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, d/2): the same positions for every head
        # rotate in float32 at least, even for bfloat16 inputs, and hand back x's dtype
        dtype = torch.promote_types(x.dtype, torch.float32)
        out = rotate_pairs(x.to(dtype), cos.to(dtype), sin.to(dtype), self.interleaved)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, theta={self.theta:g}, "
            f"interleaved={self.interleaved}"
        )
