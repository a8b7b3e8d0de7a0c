"""FlashAttention-2 in plain PyTorch: attention one tile at a time, never the T_q x T_k matrix.

Forward (Dao, 2023, Algorithm 1). For each tile of block_q queries, loop
over the tiles of block_k keys and values and keep the online-softmax state
of ``online_softmax.py`` per query row: the running max m, the running sum
l and the unnormalized output acc. Each key tile costs a block_q x block_k
score tile, which is then thrown away. At the end, out = acc / l and the
row's log-sum-exp lse = m + log l, one float per row, is saved.

Backward. The probabilities are ``P = exp(S - lse)``, so S is recomputed
from q and k tile by tile instead of stored (T_q·T_k numbers to read back
from memory would cost more than the matmul that recomputes them). With
``D_i = Σ_d dO_id·O_id`` (equal to Σ_j P_ij dP_ij, the softmax's correction):

    dV = Pᵀ dO      dP = dO Vᵀ      dS = P ∘ (dP - D)      dQ = dS K · scale      dK = dSᵀ Q · scale

Causal attention skips the key tiles that lie wholly in the future of a
query tile and masks only the tiles on the diagonal (``tiling.py``).
Grouped-query attention: the G = H / H_kv query heads that share a k/v head
are G·block_q rows against the same key tile, so k and v are indexed, never
repeated, and dK, dV sum over the group's heads.

Memory: besides the inputs and outputs, O(block_q·block_k) per (batch, head)
at a time, so peak memory grows linearly with T (``memory.py`` measures it).
This is the algorithm; ``flash_triton.py`` runs the same loops as a GPU kernel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from llmbook.kernels.online_softmax import NEG_INF, _finite
from llmbook.kernels.tiling import DIAGONAL, SKIP, tile_kind


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """One clear ValueError unless q (B, H, T_q, D) and k, v (B, H_kv, T_k, D) fit together (both kernels use it)."""
    if not all(isinstance(t, Tensor) for t in (q, k, v)):
        raise ValueError(f"q, k, v must be tensors; got {', '.join(type(t).__name__ for t in (q, k, v))}")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(f"flash attention needs q of shape (B, H, T_q, D) and k, v of shape (B, H_kv, T_k, D); "
                         f"got {shapes}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if not (q.is_floating_point() and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one floating dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q, k, v must have the same batch and head_dim, and k, v the same shape; got {shapes}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q's {q.shape[1]} heads must be a multiple of k/v's {k.shape[1]}; got {shapes}")


def _check(q: Tensor, k: Tensor, v: Tensor, block_q: int, block_k: int) -> None:
    check_qkv(q, k, v)
    if min(block_q, block_k) <= 0:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")


def _diagonal_mask(q_start: int, q_end: int, k_start: int, k_end: int, offset: int, device) -> Tensor:
    """``(q_end - q_start, k_end - k_start)`` bool, True where query i may see key j: j <= i + offset."""
    i = torch.arange(q_start, q_end, device=device)[:, None]
    j = torch.arange(k_start, k_end, device=device)[None, :]
    return j <= i + offset


def flash_forward_torch(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
    block_q: int = 128, block_k: int = 128,
) -> tuple[Tensor, Tensor]:
    """``(out (B, H, T_q, D) in q's dtype, lse (B, H, T_q))`` of softmax(q kᵀ·scale) v.

    lse is float32, or float64 for float64 inputs: the backward's exp(S - lse)
    is only as precise as lse.
    """
    _check(q, k, v, block_q, block_k)
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    G = H // H_kv  # query heads per k/v head
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    f32 = torch.promote_types(q.dtype, torch.float32)  # accumulate 16-bit inputs in float32
    qg = q.view(B, H_kv, G, T_q, D)  # query head h = (h // G, h % G): its group's k/v head first
    out = torch.empty(B, H_kv, G, T_q, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H_kv, G, T_q, dtype=f32, device=q.device)

    for qs in range(0, T_q, block_q):  # each query tile is independent: one GPU program per tile
        qe = min(qs + block_q, T_q)
        bq = qe - qs
        q_tile = qg[:, :, :, qs:qe].to(f32).reshape(B, H_kv, G * bq, D)  # the group's heads as G·bq rows
        m_i = torch.full((B, H_kv, G * bq), NEG_INF, dtype=f32, device=q.device)  # running max
        l_i = torch.zeros(B, H_kv, G * bq, dtype=f32, device=q.device)  # running Σ exp(s - m_i)
        acc = torch.zeros(B, H_kv, G * bq, D, dtype=f32, device=q.device)  # running Σ exp(s - m_i)·v

        for ks in range(0, T_k, block_k):
            ke = min(ks + block_k, T_k)
            kind = tile_kind(qs, qe, ks, ke, T_q, T_k, causal)
            if kind == SKIP:  # this and every later key tile lie in the future of all these queries
                break
            k_tile, v_tile = k[:, :, ks:ke].to(f32), v[:, :, ks:ke].to(f32)  # (B, H_kv, bk, D), shared by G heads
            s = (q_tile @ k_tile.transpose(-2, -1)) * scale  # (B, H_kv, G·bq, bk): the only score tile
            if kind == DIAGONAL:
                visible = _diagonal_mask(qs, qe, ks, ke, T_k - T_q, q.device)  # (bq, bk)
                s = s.view(B, H_kv, G, bq, ke - ks).masked_fill(~visible, NEG_INF).view_as(s)
            # merge(state, partial_state(s, v_tile)) of online_softmax.py, written out as the kernel does it
            m_new = torch.maximum(m_i, s.amax(dim=-1))  # (B, H_kv, G·bq)
            p = torch.exp(s - _finite(m_new)[..., None])  # (B, H_kv, G·bq, bk)
            rescale = torch.exp(m_i - _finite(m_new))  # shrinks the old sums if the max grew; exp(-inf) = 0 at first
            l_i = l_i * rescale + p.sum(dim=-1)
            acc = acc * rescale[..., None] + p @ v_tile
            m_i = m_new

        o_tile = acc / l_i.masked_fill(l_i == 0, 1.0)[..., None]  # a row that saw no key (l_i = 0) outputs 0
        out[:, :, :, qs:qe] = o_tile.view(B, H_kv, G, bq, D).to(q.dtype)
        lse[:, :, :, qs:qe] = (_finite(m_i) + torch.log(l_i)).view(B, H_kv, G, bq)  # log 0 = -inf
    return out.view(B, H, T_q, D), lse.view(B, H, T_q)


def flash_backward_torch(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, causal: bool = False,
    scale: float | None = None, block_q: int = 128, block_k: int = 128,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` in the inputs' dtypes, from the forward's ``out`` and ``lse`` and the gradient ``dout``.

    FlashAttention-2's order: the outer loop runs over key tiles, whose dk and
    dv are summed in registers; dq collects from every key tile (atomic adds
    on a GPU, a slice add here).
    """
    _check(q, k, v, block_q, block_k)
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    G = H // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    f32 = torch.promote_types(q.dtype, torch.float32)
    qg, dog = q.view(B, H_kv, G, T_q, D), dout.reshape(B, H_kv, G, T_q, D)
    lse_g = _finite(lse.reshape(B, H_kv, G, T_q).to(f32))  # a row that saw nothing: P = exp(-inf - 0) = 0
    delta = (dout.to(f32) * out.to(f32)).sum(dim=-1).view(B, H_kv, G, T_q)  # D = rowsum(dO ∘ O)
    dq = torch.zeros(B, H_kv, G, T_q, D, dtype=f32, device=q.device)
    dk = torch.empty(B, H_kv, T_k, D, dtype=k.dtype, device=k.device)
    dv = torch.empty_like(dk)

    for ks in range(0, T_k, block_k):  # each key tile is independent: one GPU program per tile
        ke = min(ks + block_k, T_k)
        k_tile, v_tile = k[:, :, ks:ke].to(f32), v[:, :, ks:ke].to(f32)  # (B, H_kv, bk, D)
        dk_tile = torch.zeros(B, H_kv, ke - ks, D, dtype=f32, device=q.device)
        dv_tile = torch.zeros_like(dk_tile)

        for qs in range(0, T_q, block_q):
            qe = min(qs + block_q, T_q)
            bq = qe - qs
            kind = tile_kind(qs, qe, ks, ke, T_q, T_k, causal)
            if kind == SKIP:  # these queries see none of these keys: no gradient flows between them
                continue
            rows = (B, H_kv, G * bq)  # the group's G heads of bq queries each, as rows
            q_tile = qg[:, :, :, qs:qe].to(f32).reshape(*rows, D)
            do_tile = dog[:, :, :, qs:qe].to(f32).reshape(*rows, D)
            s = (q_tile @ k_tile.transpose(-2, -1)) * scale  # (B, H_kv, G·bq, bk), recomputed
            if kind == DIAGONAL:
                visible = _diagonal_mask(qs, qe, ks, ke, T_k - T_q, q.device)
                s = s.view(B, H_kv, G, bq, ke - ks).masked_fill(~visible, NEG_INF).view_as(s)
            p = torch.exp(s - lse_g[:, :, :, qs:qe].reshape(*rows, 1))  # the forward's probabilities, exactly
            dv_tile += p.transpose(-2, -1) @ do_tile  # (B, H_kv, bk, D), summed over the group's rows
            dp = do_tile @ v_tile.transpose(-2, -1)  # (B, H_kv, G·bq, bk)
            ds = p * (dp - delta[:, :, :, qs:qe].reshape(*rows, 1))  # the softmax's backward
            dq[:, :, :, qs:qe] += (ds @ k_tile).view(B, H_kv, G, bq, D) * scale
            dk_tile += (ds.transpose(-2, -1) @ q_tile) * scale

        dk[:, :, ks:ke], dv[:, :, ks:ke] = dk_tile.to(k.dtype), dv_tile.to(v.dtype)
    return dq.view(B, H, T_q, D).to(q.dtype), dk, dv


class FlashAttentionTorch(torch.autograd.Function):
    """Autograd saves q, k, v, out and lse: O(T) memory, where naive attention keeps the T_q x T_k probabilities."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, block_q: int, block_k: int):
        out, lse = flash_forward_torch(q, k, v, causal, scale, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, block_q, block_k)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward_torch(q, k, v, out, lse, dout, *ctx.args)
        return dq, dk, dv, None, None, None, None  # no gradient for causal, scale, block sizes


def flash_attention_torch(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
    block_q: int = 128, block_k: int = 128,
) -> Tensor:
    """softmax(q kᵀ·scale) v ``(B, H, T_q, D)``, differentiable, tiled forward and backward.

    q is ``(B, H, T_q, D)``, k and v ``(B, H_kv, T_k, D)`` with H a multiple
    of H_kv; ``causal`` is bottom-right aligned; scale None is 1/sqrt(D).
    """
    _check(q, k, v, block_q, block_k)  # a clear error here, before autograd's machinery
    return FlashAttentionTorch.apply(q, k, v, causal, scale, block_q, block_k)
