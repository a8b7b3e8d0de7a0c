"""The roofline: how fast this machine computes, how fast it moves bytes, and which one limits attention.

A kernel that does ``F`` floating-point operations and moves ``M`` bytes
between memory and the chip needs at least ``max(F / peak_flops, M /
bandwidth)`` seconds. Its *arithmetic intensity* ``I = F / M`` (FLOPs per
byte) decides which term wins: below the *ridge point* ``peak_flops /
bandwidth`` the memory is the bottleneck, above it the arithmetic. The
attainable speed is ``min(peak_flops, I * bandwidth)``, a line that rises and
then goes flat: the roofline (Williams, Waterman and Patterson, 2009).

This module measures the two numbers of this machine and counts, step by step,
the FLOPs and the bytes of attention's forward pass, computed naively (three
kernels that write the T x T scores and probabilities to memory and read them
back) and fused the FlashAttention way (q, k, v read, out and lse written;
nothing T x T leaves the chip). The counts are ideal: every tensor read or
written exactly once per step, caches ignored. Example, one head, T = 1024,
D = 64, float32: the naive score matmul does 134M FLOPs and moves 4.72 MB,
an intensity of 28 FLOPs per byte; softmax does 5 FLOPs per 8 bytes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from llmbook import planning

SOFTMAX_FLOPS_PER_SCORE = 5  # max, subtract, exp, sum, divide: one each per score


@dataclass(frozen=True)
class Traffic:
    """One step of a computation: its FLOPs and the bytes it reads from and writes to memory."""

    step: str
    flops: float
    bytes_read: float
    bytes_written: float

    @property
    def bytes(self) -> float:
        """All bytes moved, read plus written."""
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """Arithmetic intensity: FLOPs per byte moved."""
        return self.flops / self.bytes

    def time(self, peak_flops: float, bandwidth: float) -> float:
        """The roofline's lower bound on this step's seconds: compute or memory, whichever is slower."""
        return max(self.flops / peak_flops, self.bytes / bandwidth)


def total(steps: list[Traffic], name: str = "total") -> Traffic:
    """The steps added up (an intensity of the whole, not the mean of the intensities)."""
    return Traffic(name, sum(s.flops for s in steps), sum(s.bytes_read for s in steps),
                   sum(s.bytes_written for s in steps))


def _check_shape(B: int, H: int, T: int, D: int, kv_heads: int | None) -> int:
    if min(B, H, T, D) < 1:
        raise ValueError(f"B, H, T, D must all be at least 1, got {(B, H, T, D)}")
    kv_heads = H if kv_heads is None else kv_heads
    if kv_heads < 1 or H % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide the H={H} query heads")
    return kv_heads


def naive_attention_traffic(B: int, H: int, T: int, D: int, bytes_per_value: int = 4,
                            kv_heads: int | None = None) -> list[Traffic]:
    """The forward of softmax(q kᵀ / √D) v as three kernels, each going through memory.

    1. ``S = q kᵀ / √D``: reads q and k, writes the (B, H, T, T) scores;
       2·T·T·D FLOPs per head (the scale is fused into the matmul).
    2. ``P = softmax(S)``: reads S, writes P; 5 FLOPs per score.
    3. ``out = P v``: reads P and v, writes out; 2·T·T·D FLOPs per head.

    With grouped-query attention (``kv_heads`` < H), k and v are read once per
    query head all the same: the naive path repeats them (Chapter 4's ``repeat_kv``).
    One head, T=2, D=1, float32: the score matmul does 8 FLOPs and moves
    (2 + 2) * 4 bytes in and 4 * 4 out.
    """
    _check_shape(B, H, T, D, kv_heads)
    b = bytes_per_value
    qkvo = B * H * T * D * b  # bytes of one (B, H, T, D) tensor
    scores = B * H * T * T * b  # bytes of one (B, H, T, T) matrix
    return [
        Traffic("scores q @ k.T", 2 * B * H * T * T * D, 2 * qkvo, scores),
        Traffic("softmax", SOFTMAX_FLOPS_PER_SCORE * B * H * T * T, scores, scores),
        Traffic("P @ v", 2 * B * H * T * T * D, scores + qkvo, qkvo),
    ]


def flash_attention_traffic(B: int, H: int, T: int, D: int, block_q: int = 128, bytes_per_value: int = 4,
                            kv_heads: int | None = None) -> Traffic:
    """The fused FlashAttention forward: the same FLOPs, but nothing T x T goes to memory.

    Each program keeps one tile of ``block_q`` queries on chip and streams all
    of k and v past it, so k and v are read once per query tile: ``ceil(T /
    block_q)`` times per head. q is read once, out is written once, plus one
    float32 log-sum-exp per row. The FLOPs are the naive ones (the rescaling
    of the running output adds O(T·D) per key tile, which we leave out).
    The k and v reads are an upper bound: on a GPU, programs working on the
    same head run at the same time and often find those tiles in the L2 cache.
    """
    _check_shape(B, H, T, D, kv_heads)
    b = bytes_per_value
    qkvo = B * H * T * D * b
    passes = math.ceil(T / block_q)  # query tiles, each reading all of k and v
    flops = 4 * B * H * T * T * D + SOFTMAX_FLOPS_PER_SCORE * B * H * T * T
    read = qkvo + passes * 2 * qkvo  # q once; k and v once per query tile (per query head, as loaded)
    written = qkvo + B * H * T * 4  # out, and the float32 lse
    return Traffic("fused (FlashAttention)", flops, read, written)


def recompute_vs_store(B: int, H: int, T: int, D: int, bytes_per_value: int = 4) -> tuple[float, float]:
    """What the backward pays to recompute P instead of keeping it: ``(extra_flops, bytes_saved)``.

    Recomputing means ``q kᵀ`` again (2·T·T·D FLOPs per head) and one exp per
    score, from the saved lse. Storing means writing P in the forward and
    reading it in the backward: 2·T·T values per head moved, and T·T held in
    memory in between.
    """
    _check_shape(B, H, T, D, None)
    extra_flops = 2 * B * H * T * T * D + B * H * T * T
    bytes_saved = 2 * B * H * T * T * bytes_per_value
    return extra_flops, bytes_saved


def ridge_point(peak_flops: float, bandwidth: float) -> float:
    """FLOPs per byte where the roofline bends: below it a kernel waits for memory, above it for arithmetic."""
    if peak_flops <= 0 or bandwidth <= 0:
        raise ValueError(f"peak_flops and bandwidth must be positive, got {peak_flops} and {bandwidth}")
    return peak_flops / bandwidth


def attainable(intensity: float, peak_flops: float, bandwidth: float) -> float:
    """The roofline itself: the FLOP/s a kernel of this intensity can reach at best."""
    return min(peak_flops, intensity * bandwidth)


def matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """This machine's float32 matmul FLOP/s with torch's current thread count: the compute roof.

    A large square matmul has an intensity of about n/6 FLOPs per byte, far
    right of any ridge, so it runs as fast as the arithmetic allows. The best
    of ``repeats`` runs (Chapter 1's ``measure_matmul_flops``).
    """
    if n < 1 or repeats < 1:
        raise ValueError(f"n and repeats must be at least 1, got n={n}, repeats={repeats}")
    return planning.measure_matmul_flops(n=n, repeats=repeats)


def memory_bandwidth(nbytes: int = 1 << 26, repeats: int = 5) -> float:
    """This machine's copy bandwidth in bytes per second (bytes read + bytes written): the memory roof.

    Copies a float32 buffer of ``nbytes`` into another; 64 MB by default, more
    than a CPU's caches hold, so the bytes come from DRAM. A copy does no
    arithmetic, so its speed is the memory's. The best of ``repeats`` runs.
    """
    if nbytes < 4 or repeats < 1:
        raise ValueError(f"nbytes must be at least 4 and repeats at least 1, got {nbytes}, {repeats}")
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm up: touch every page once
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best
