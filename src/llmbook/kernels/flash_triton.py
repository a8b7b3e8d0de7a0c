"""FlashAttention-2 in Triton: the tiled forward and the recomputing backward as GPU kernels.

The same algorithm as ``flash_torch`` (query tiles x key tiles, a running max
and sum, the log-sum-exp saved for the backward), written so that one Triton
*program* handles one query tile of one (batch, head): the tile's scores live
in registers/SRAM and never reach main memory. The grid is
``(query tiles, batch * heads)``, so short sequences with many heads still
fill the GPU.

Kernels (``show(_fwd_kernel.fn)`` prints one; ``.fn`` is the plain Python function):

* ``_fwd_kernel``: out and lse for one query tile, looping over key tiles.
* ``_bwd_preprocess``: ``D_i = rowsum(dO_i * O_i)``, one number per query row.
* ``_bwd_dkdv_kernel``: dK, dV for one key tile, looping over query tiles.
* ``_bwd_dq_kernel``: dQ for one query tile, looping over key tiles.

Why two backward kernels rather than one with atomics: dK/dV of a key tile
sum over all query tiles, and dQ of a query tile sums over all key tiles. One
kernel that walks one way must ``tl.atomic_add`` the other sum into main
memory: float additions in a random order (not bit-reproducible from run to
run) and contended writes. Two kernels each own their output tile, write it
once and are deterministic; the price is computing the scores P and dP twice
(once per kernel), about 1.25x the backward's matmuls. FlashAttention-2's
Triton tutorial makes the same choice.

Grouped-query attention: query head h reads kv head ``h // group`` through the
pointer arithmetic, so K and V are never copied. dK/dV of a kv head sum over
its ``group`` query heads; ``_bwd_dkdv_kernel`` loops over the group *inside*
the program, so the sum stays in registers, needs no (B, H, T_k, D) float32
buffer and no reduction afterwards. The cost is parallelism: that kernel has
``B * H_kv`` programs per key tile instead of ``B * H``, fine for the modest
groups of real models (4-8), less so for multi-query attention at batch 1.

Devices: on CUDA the kernels compile and ``@triton.autotune`` picks tile sizes
per (T, D). Without CUDA this module turns on Triton's interpreter *before*
the kernels are created (``TRITON_INTERPRET=1``, also through
``triton.knobs`` in case triton was imported already): each program then
runs as numpy code on the CPU, slowly but exactly, with one fixed small tile.
``TRITON_INTERPRET=0`` keeps the kernels compiled even there, for checking
that they compile for a GPU (``triton.compile`` with a ``GPUTarget``).
"""

from __future__ import annotations

import importlib
import math
import os

import torch
from torch import Tensor

from llmbook.kernels.flash_torch import check_qkv

# Without CUDA the kernels can only run interpreted; TRITON_INTERPRET=0 opts out (to compile for a GPU ahead of time)
_NEEDS_INTERPRETER = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "0"
if _NEEDS_INTERPRETER:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when @triton.jit runs, so set it before the kernels exist

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def _use_interpreter() -> None:
    """Run every @triton.jit function created from now on under the interpreter, even if triton was imported.

    ``@triton.jit`` reads ``triton.knobs.runtime.interpret`` when it decorates,
    so setting the knob covers our kernels. Triton's own helpers (``tl.zeros``,
    ``tl.max``, ``tl.sum``...) were decorated when ``triton.language`` was first
    imported: if that happened with the interpreter off, reload those modules
    so that they are interpreted too.
    """
    from triton.runtime.interpreter import InterpretedFunction

    triton.knobs.runtime.interpret = True
    if not isinstance(tl.standard.zeros, InterpretedFunction):
        for module in (tl.standard, tl.random, tl):
            importlib.reload(module)


if _NEEDS_INTERPRETER:
    _use_interpreter()

INTERPRET: bool = bool(triton.knobs.runtime.interpret)  # True: kernels are Python run by the interpreter, on CPU
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e)), and exp2 is the GPU's native instruction
LOG2E_CONST = tl.constexpr(LOG2E)  # the same number for the kernels (they may read only constexpr globals)
MAX_HEAD_DIM = 128


# --- Forward ---------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
               offs_m, offs_d, T_k, causal_offset, lo, hi, qk_scale, HEAD_DIM: tl.constexpr,
               CAUSAL_MASK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold key tiles lo, lo + BLOCK_N, ..., < hi into the running (acc, m_i, l_i) of one query tile."""
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # key positions of this tile
        kv_mask = (cols[:, None] < T_k) & mask_d[None, :]
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        # scores in log2 units: s2 = (q . k) * scale * log2(e), so exp2(s2 - m) = exp(scale * q.k - m')
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) float32
        visible = cols[None, :] < T_k  # keys past the end (the last tile's padding) get probability 0
        if CAUSAL_MASK:  # only the tiles that straddle the diagonal pay for this
            visible = visible & (cols[None, :] <= offs_m[:, None] + causal_offset)
        s = tl.where(visible, s, float("-inf"))
        # online softmax: new running max, rescale what we had by exp2(old max - new max)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet: avoid -inf - -inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)  # acc·alpha + P V
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _causal_bounds(start_m, T_q, T_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges for a causal query tile: [0, full) seen by every row, [full, hi) by some; the rest skipped.

    Query i sees key j iff j <= i + (T_k - T_q). The tile's first row sees keys
    < start_m * BLOCK_M + T_k - T_q + 1, its last row keys < (start_m + 1) * BLOCK_M + T_k - T_q.
    """
    offset = T_k - T_q
    first_row_sees = tl.minimum(tl.maximum(start_m * BLOCK_M + offset + 1, 0), T_k)
    full = (first_row_sees // BLOCK_N) * BLOCK_N  # whole key tiles below the diagonal: no causal mask
    hi = tl.minimum(tl.maximum((start_m + 1) * BLOCK_M + offset, 0), T_k)  # past it every key is masked
    return full, hi


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, qk_scale,
                stride_qb, stride_qh, stride_qm, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_ob, stride_oh, stride_om, stride_od,
                H, T_q, T_k, GROUP, T_BUCKET,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: out and lse of BLOCK_M query rows of one (batch, head). Grid: (cdiv(T_q, BLOCK_M), B * H).

    GROUP = H // H_kv query heads share a kv head. T_BUCKET is not used here: it is the autotuner's key.
    """
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    h_kv = h // GROUP  # grouped-query attention: several query heads read the same kv head, no copy
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h_kv * stride_kh
    V += b * stride_vb + h_kv * stride_vh
    Out += b * stride_ob + h * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this tile
    offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D = HEAD_DIM rounded up to a power of two; the extra columns are masked
    q_mask = (offs_m[:, None] < T_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running sum of exp2(s - m_i) * v
    if CAUSAL:
        full, hi = _causal_bounds(start_m, T_q, T_k, BLOCK_M, BLOCK_N)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                   offs_m, offs_d, T_k, T_k - T_q, 0, full, qk_scale, HEAD_DIM,
                                   False, BLOCK_N, DOT_PRECISION)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                   offs_m, offs_d, T_k, T_k - T_q, full, hi, qk_scale, HEAD_DIM,
                                   True, BLOCK_N, DOT_PRECISION)
    else:
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                   offs_m, offs_d, T_k, 0, 0, T_k, qk_scale, HEAD_DIM,
                                   False, BLOCK_N, DOT_PRECISION)

    # finish: divide by the softmax denominator; a row that saw no key (causal, T_q > T_k) gives 0 and lse -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    # back to natural log: lse = ln sum_j exp(scale * q.k_j) = (m + log2 l) / log2(e); -inf for a row with no key
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) / LOG2E_CONST)
    tl.store(Out + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty),
             mask=q_mask)
    tl.store(Lse + bh * T_q + offs_m, lse, mask=offs_m < T_q)


# --- Backward --------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess(Out, DO, Delta,
                    stride_ob, stride_oh, stride_om, stride_od,
                    stride_dob, stride_doh, stride_dom, stride_dod,
                    H, T_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """D_i = sum_d dO_id * O_id for BLOCK_M rows: the term softmax's backward subtracts, computed once per row."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + bh * T_q + offs_m, tl.sum(o * do, 1), mask=offs_m < T_q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, Lse, Delta, stride_qm, stride_qd, stride_dom, stride_dod,
                    offs_n, offs_d, T_q, T_k, causal_offset, lo, hi, qk_scale, HEAD_DIM: tl.constexpr,
                    CAUSAL_MASK: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add the contributions of query tiles lo, lo + BLOCK_M, ..., < hi to one key tile's dK and dV.

    It works on the transposed tile S^T (keys x queries), so that dV = P^T dO
    and dK = dS^T Q are plain matmuls of what is in registers, no transposes of
    computed tiles; Q^T is loaded transposed straight from memory instead.
    """
    mask_d = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_mask = rows < T_q
        qT = tl.load(Q + rows[None, :] * stride_qm + offs_d[:, None] * stride_qd,  # (BLOCK_D, BLOCK_M)
                     mask=mask_d[:, None] & row_mask[None, :], other=0.0)
        do = tl.load(DO + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,  # (BLOCK_M, BLOCK_D)
                     mask=row_mask[:, None] & mask_d[None, :], other=0.0)
        lse2 = tl.load(Lse + rows, mask=row_mask, other=0.0) * LOG2E_CONST
        delta = tl.load(Delta + rows, mask=row_mask, other=0.0)
        # recompute the probabilities from the saved lse: P = exp(S - lse), no running max needed any more
        sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        visible = (offs_n[:, None] < T_k) & row_mask[None, :]
        if CAUSAL_MASK:
            visible = visible & (offs_n[:, None] <= rows[None, :] + causal_offset)
        pT = tl.where(visible, tl.exp2(sT - lse2[None, :]), 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # dV += P^T dO
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # dP^T = V dO^T
        dsT = pT * (dpT - delta[None, :])  # dS = P * (dP - D): softmax's backward, row by row
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)  # dK += dS^T Q (scale later)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, qk_scale, sm_scale,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_dob, stride_doh, stride_dom, stride_dod,
                     H, H_kv, T_q, T_k, GROUP, T_BUCKET,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: dK, dV of BLOCK_N keys of one kv head, summed over its query heads.

    Grid: (cdiv(T_k, BLOCK_N), B * H_kv).
    """
    start_n = tl.program_id(0)
    bh_kv = tl.program_id(1)
    b = bh_kv // H_kv
    h_kv = bh_kv % H_kv
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < T_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    offset = T_k - T_q
    if CAUSAL:
        # key j is seen by the queries i >= j - offset: skip the query tiles above the diagonal, mask the ones
        # that straddle it, and take the tiles below it whole
        lo = tl.maximum(start_n * BLOCK_N - offset, 0)
        lo = tl.minimum((lo // BLOCK_M) * BLOCK_M, T_q)
        all_see = tl.maximum(start_n * BLOCK_N + BLOCK_N - 1 - offset, 0)  # first row that sees every key here
        mid = tl.minimum(tl.maximum(((all_see + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo), T_q)
    for g in range(0, GROUP):  # the query heads that share this kv head
        h = h_kv * GROUP + g
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        row0 = (b * H + h) * T_q  # Lse and Delta are (B, H, T_q) contiguous
        if CAUSAL:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, Lse + row0, Delta + row0, stride_qm, stride_qd,
                                     stride_dom, stride_dod, offs_n, offs_d, T_q, T_k, offset, lo, mid,
                                     qk_scale, HEAD_DIM, True, BLOCK_M, DOT_PRECISION)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, Lse + row0, Delta + row0, stride_qm, stride_qd,
                                     stride_dom, stride_dod, offs_n, offs_d, T_q, T_k, offset, mid, T_q,
                                     qk_scale, HEAD_DIM, False, BLOCK_M, DOT_PRECISION)
        else:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, Lse + row0, Delta + row0, stride_qm, stride_qd,
                                     stride_dom, stride_dod, offs_n, offs_d, T_q, T_k, offset, 0, T_q,
                                     qk_scale, HEAD_DIM, False, BLOCK_M, DOT_PRECISION)
    dk = dk * sm_scale  # S = scale * Q K^T, so dK = scale * dS^T Q
    # DK and DV are contiguous (B, H_kv, T_k, D), allocated by the wrapper
    offsets = bh_kv * T_k * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + offsets, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                  offs_m, offs_d, T_q, T_k, causal_offset, lo, hi, qk_scale, HEAD_DIM: tl.constexpr,
                  CAUSAL_MASK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add the contributions of key tiles lo, ..., < hi to one query tile's dQ."""
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < T_k) & mask_d[None, :]
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = (offs_m[:, None] < T_q) & (cols[None, :] < T_k)
        if CAUSAL_MASK:
            visible = visible & (cols[None, :] <= offs_m[:, None] + causal_offset)
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)  # dQ += dS K (scale later)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DQ, qk_scale, sm_scale,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   H, T_q, T_k, GROUP, T_BUCKET,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: dQ of BLOCK_M query rows of one (batch, head). Grid: (cdiv(T_q, BLOCK_M), B * H)."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    h_kv = h // GROUP
    K += b * stride_kb + h_kv * stride_kh
    V += b * stride_vb + h_kv * stride_vh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < T_q
    q_mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=q_mask, other=0.0)
    lse2 = tl.load(Lse + bh * T_q + offs_m, mask=row_mask, other=0.0) * LOG2E_CONST
    delta = tl.load(Delta + bh * T_q + offs_m, mask=row_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        full, hi = _causal_bounds(start_m, T_q, T_k, BLOCK_M, BLOCK_N)  # the forward's tiles, the same skipping
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d,
                           T_q, T_k, T_k - T_q, 0, full, qk_scale, HEAD_DIM, False, BLOCK_N, DOT_PRECISION)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d,
                           T_q, T_k, T_k - T_q, full, hi, qk_scale, HEAD_DIM, True, BLOCK_N, DOT_PRECISION)
    else:
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d,
                           T_q, T_k, 0, 0, T_k, qk_scale, HEAD_DIM, False, BLOCK_N, DOT_PRECISION)
    dq = dq * sm_scale
    # DQ is contiguous (B, H, T_q, D), allocated by the wrapper
    tl.store(DQ + bh * T_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_mask)


# --- Launching: tile sizes, checks, autograd -------------------------------------------------------------------------
def _gpu_configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) -> autotuner candidates."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Under the interpreter autotuning has nothing to measure (and fails with 2+ configs), so one small tile:
# 16 is the smallest tile tl.dot accepts, and small tiles keep the numpy work per program cheap.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)
FWD_CONFIGS = _gpu_configs([(128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4)])
BWD_CONFIGS = _gpu_configs([(32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (32, 128, 4, 3)])
# autotune once per (length rounded up to a power of two, head dim, causal): keying on the exact length would
# re-tune at every step of generation, where T_k grows by one token at a time
TUNE_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL"]


def _tuned(kernel, gpu_configs: list[triton.Config]):
    """The kernel with tile sizes picked by ``@triton.autotune`` on a GPU, or the one interpreter config."""
    return triton.autotune([INTERPRETER_CONFIG] if INTERPRET else gpu_configs, key=TUNE_KEY)(kernel)


_fwd = _tuned(_fwd_kernel, FWD_CONFIGS)
_bwd_dkdv = _tuned(_bwd_dkdv_kernel, BWD_CONFIGS)
_bwd_dq = _tuned(_bwd_dq_kernel, BWD_CONFIGS)
PREPROCESS_BLOCK = 16 if INTERPRET else 128


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise one ValueError that says what is wrong and what to pass instead."""
    check_qkv(q, k, v)  # the shapes, devices and dtypes that any FlashAttention needs
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"flash attention needs non-empty inputs; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[3]} > {MAX_HEAD_DIM}: the tiles would not fit in on-chip memory; "
                         "use flash_attention_torch or attention='sdpa'")
    if q.device.type == "cuda":
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"on CUDA the kernels take float32, float16 or bfloat16; got {q.dtype}")
    elif q.device.type == "cpu":
        if not INTERPRET:
            raise ValueError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing "
                             "llmbook.kernels.flash_triton, or move q, k, v to CUDA")
        if q.dtype != torch.float32:
            raise ValueError(f"on CPU (Triton's interpreter) use float32; got {q.dtype}")
    else:
        raise ValueError(f"the Triton kernels run on CUDA or (interpreted) CPU tensors; got {q.device}")


def _constants(q: Tensor, k: Tensor, causal: bool) -> dict:
    """The compile-time arguments every kernel shares."""
    D = q.shape[3]
    return {
        "HEAD_DIM": D,
        "BLOCK_D": max(16, triton.next_power_of_2(D)),  # tl.arange needs a power of two, tl.dot at least 16
        "CAUSAL": bool(causal),
        # float32 inputs: exact fp32 products (the default would round them to tf32, ~1e-3 off); halves: unchanged
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "T_BUCKET": triton.next_power_of_2(max(q.shape[2], k.shape[2])),
    }


def flash_forward_triton(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                         scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Attention output ``(B, H, T_q, D)`` and log-sum-exp ``(B, H, T_q)`` float32, by ``_fwd_kernel``.

    ``k, v`` are ``(B, H_kv, T_k, D)``; causal is bottom-right aligned (query i
    sees key j iff j <= i + T_k - T_q), like ``llmbook.attention.causal_mask``.
    """
    _check_inputs(q, k, v)
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty((B, H, T_q, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T_q), dtype=torch.float32, device=q.device)

    def grid(meta):  # one program per (query tile, batch x head)
        return (triton.cdiv(T_q, meta["BLOCK_M"]), B * H)

    _fwd[grid](q, k, v, out, lse, scale * LOG2E,
               *q.stride(), *k.stride(), *v.stride(), *out.stride(),
               H, T_q, T_k, H // H_kv, **_constants(q, k, causal))
    return out, lse


def flash_backward_triton(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                          causal: bool = False, scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV from the inputs, the forward's out and lse, and dL/dout; nothing T_q x T_k is stored."""
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    consts = _constants(q, k, causal)
    delta = torch.empty_like(lse)  # (B, H, T_q) float32
    _bwd_preprocess[(triton.cdiv(T_q, PREPROCESS_BLOCK), B * H)](
        out, dout, delta, *out.stride(), *dout.stride(), H, T_q,
        HEAD_DIM=D, BLOCK_M=PREPROCESS_BLOCK, BLOCK_D=consts["BLOCK_D"])
    dq = torch.empty((B, H, T_q, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H_kv, T_k, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H_kv, T_k, D), dtype=v.dtype, device=v.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())

    def grid_kv(meta):  # one program per (key tile, batch x kv head)
        return (triton.cdiv(T_k, meta["BLOCK_N"]), B * H_kv)

    def grid_q(meta):  # one program per (query tile, batch x head)
        return (triton.cdiv(T_q, meta["BLOCK_M"]), B * H)

    _bwd_dkdv[grid_kv](q, k, v, dout, lse, delta, dk, dv, scale * LOG2E, scale, *strides,
                       H, H_kv, T_q, T_k, H // H_kv, **consts)
    _bwd_dq[grid_q](q, k, v, dout, lse, delta, dq, scale * LOG2E, scale, *strides,
                    H, T_q, T_k, H // H_kv, **consts)
    return dq, dk, dv


class FlashAttentionTriton(torch.autograd.Function):
    """Differentiable FlashAttention: saves only q, k, v, out and lse; the backward recomputes the scores."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None) -> Tensor:
        out, lse = flash_forward_triton(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward_triton(q, k, v, out, lse, dout, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention_triton(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                           scale: float | None = None) -> Tensor:
    """``softmax(scale * q k^T [+ causal mask]) v`` by the Triton kernels, differentiable.

    q ``(B, H, T_q, D)``, k and v ``(B, H_kv, T_k, D)`` with H a multiple of H_kv.
    On CPU this runs under Triton's interpreter: exact but slow, for small shapes.
    """
    _check_inputs(q, k, v)  # here, so bad input fails before autograd wraps the error
    return FlashAttentionTriton.apply(q, k, v, causal, scale)
