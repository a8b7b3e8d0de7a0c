"""Checks for Chapter 4's exercises: causal attention, the KV cache's size, RoPE, repeat_kv.

Every expected value comes from ``llmbook.attention`` and ``llmbook.rope``,
which the test suite checks against PyTorch, so a check and the chapter can
never disagree. When an answer is wrong, the check tries to name the usual
mistake (a missing scale, a flipped mask, the other RoPE convention, heads
repeated in the wrong order, ...) by comparing it with the wrong answers that
those mistakes produce.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from llmbook import attention, planning
from llmbook.exercises import exercise, expect_close
from llmbook.exercises.tensors import close as _close
from llmbook.exercises.tensors import first_hint as _first_hint
from llmbook.exercises.tensors import random_tensor as _random
from llmbook.exercises.tensors import returned_tensor as _returned_tensor
from llmbook.rope import RotaryEmbedding

# ---------------------------------------------------------------------------
# 4.1 causal attention
# ---------------------------------------------------------------------------


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float, dim: int = -1) -> Tensor:
    """softmax(q kᵀ · scale) v with the keys where ``keep`` is False removed: the usual wrong answers."""
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~keep, float("-inf"))
    return scores.softmax(dim=dim) @ v


@exercise("4.1", solution="causal_softmax_attention")
def check_causal_softmax_attention(causal_softmax_attention):
    cases = [(1, 1, 1, 8), (1, 1, 4, 2), (2, 3, 7, 16), (1, 2, 33, 64)]  # (B, H, T, D)
    for seed, (B, H, T, D) in enumerate(cases):
        q, k, v = _random(3, B, H, T, D, seed=seed).unbind(0)
        given = [t.clone() for t in (q, k, v)]
        what = f"q, k, v of shape {(B, H, T, D)}"
        got = causal_softmax_attention(*given)
        got = _returned_tensor(got, "causal_softmax_attention", (B, H, T, D), what)
        if any(not torch.equal(a, b) for a, b in zip(given, (q, k, v), strict=True)):
            raise AssertionError("causal_softmax_attention changed its inputs; compute new tensors instead "
                                 "(masked_fill, not masked_fill_)")
        expected = attention.scaled_dot_product_attention(q, k, v, is_causal=True)
        if _close(got, expected):
            continue
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        everything = torch.ones(T, T, dtype=torch.bool)
        scale = 1 / math.sqrt(D)
        if torch.isnan(got).any():
            hint = ("; NaN in the output: a row whose keys are all masked gives 0/0. Query i may attend to "
                    "keys j <= i, itself included: mask only the keys above the diagonal (triu(diagonal=1))")
        else:
            hint = _first_hint(got, [
                (_masked_attention(q, k, v, everything, scale), "every query sees every key: mask the future "
                 "keys (j > i) with -inf before the softmax"),
                (_masked_attention(q, k, v, causal, 1.0), "the scores are not scaled: divide q kᵀ by sqrt(D)"),
                (_masked_attention(q, k, v, causal, 1 / D), "divide the scores by sqrt(D), not by D"),
                (_masked_attention(q, k, v, causal.T, scale), "the mask is flipped: query i may see keys j <= i "
                 "(lower triangle), not j >= i"),
                (_masked_attention(q, k, v, causal, scale, dim=-2), "take the softmax over the keys, the last "
                 "dim (dim=-1), so that every query's weights sum to 1"),
            ])
        err = (got - expected).abs().max().item()
        raise AssertionError(f"causal_softmax_attention({what}) differs from causal attention by up to "
                             f"{err:.3g}{hint}")


# ---------------------------------------------------------------------------
# 4.2 the KV cache's bill
# ---------------------------------------------------------------------------


def _ratio_hint(ratio: float, hints: dict[float, str]) -> str:
    for factor, hint in hints.items():
        if factor != 1 and abs(ratio - factor) <= 1e-6 * factor:
            return f" ({hint})"
    return ""


@exercise("4.2", solution="kv_cache_bytes_per_token")
def check_kv_cache_bytes_per_token(kv_cache_bytes_per_token):
    # GQA and MQA shapes come first: they tell kv_heads from n_heads
    names = ["tinyllama-1.1B", "llama2-70B", "llama2-7B", "gpt2-124M", "nanogpt-char-gpu"]
    shapes = [planning.PRESETS[n] for n in names]
    shapes.append(planning.ModelShape("mqa-toy", vocab_size=100, context_length=64, d_model=96, n_layers=3,
                                      n_heads=6, n_kv_heads=1))
    for shape in shapes:
        # an explicit 4 bytes first, so that a forgotten factor 2 and a forgotten bytes_per_value differ
        for bytes_per_value in (4, 2):
            expected = attention.kv_cache_bytes(shape.n_layers, shape.kv_heads, shape.head_dim, seq_len=1,
                                                bytes_per_value=bytes_per_value)
            if bytes_per_value == 2:
                got = kv_cache_bytes_per_token(shape)
                call = f"kv_cache_bytes_per_token({shape.name})"
            else:
                got = kv_cache_bytes_per_token(shape, bytes_per_value=4)
                call = f"kv_cache_bytes_per_token({shape.name}, bytes_per_value=4)"
            if got is None:
                raise AssertionError("kv_cache_bytes_per_token returned None; did you forget `return`?")
            if not isinstance(got, int | float) or isinstance(got, bool):
                raise AssertionError(f"{call} should return a number of bytes, got {type(got).__name__}")
            hints = {
                1 / bytes_per_value: "multiply the number of values by bytes_per_value",
                1 / shape.n_layers: "every layer keeps its own cache: multiply by shape.n_layers",
                1 / (2 * shape.n_layers): "every layer keeps a key and a value: multiply by 2 * n_layers",
                shape.n_heads / shape.kv_heads: "keys and values have shape.kv_heads heads, fewer than the "
                                                "query heads in GQA/MQA models; use shape.kv_heads",
                0.5: "a token stores a key *and* a value vector in every layer: multiply by 2",
            }
            if bytes_per_value == 2:
                hints[0.5] = "the default bytes_per_value is 2 (bf16), and a token stores a key and a value"
            hint = _ratio_hint(got / expected, hints)
            expect_close(got, expected, f"{call}: {shape.n_layers} layers, {shape.kv_heads} K/V heads of "
                                        f"{shape.head_dim} dims{hint}")


# ---------------------------------------------------------------------------
# 4.4 RoPE
# ---------------------------------------------------------------------------


def _rope_reference(x: Tensor, positions: Tensor, theta: float, interleaved: bool = False) -> Tensor:
    """``RotaryEmbedding`` applied to ``x`` of shape (..., T, D) at the given positions."""
    rotary = RotaryEmbedding(x.shape[-1], max_seq_len=int(positions.max()) + 1, theta=theta,
                             interleaved=interleaved)
    flat = x.reshape(-1, 1, *x.shape[-2:])  # (N, 1, T, D): RotaryEmbedding wants (B, H, T, D)
    return rotary(flat, positions).reshape(x.shape)


def _rope_by_hand(x: Tensor, positions: Tensor, inv_freq: Tensor, sign: float = 1.0) -> Tensor:
    """Half-split rotation with given frequencies; sign=-1 turns the other way."""
    angles = sign * positions.double()[:, None] * inv_freq.double()  # (T, D/2)
    cos, sin = angles.cos().float(), angles.sin().float()
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


@exercise("4.4", solution="rope_rotate")
def check_rope_rotate(rope_rotate):
    cases = [  # (what, x shape, positions, theta)
        ("one pair", (3, 2), torch.arange(3), 10000.0),
        ("head dim 8, positions 0..5", (6, 8), torch.arange(6), 10000.0),
        ("(B, H, T, D) = (2, 3, 5, 16), positions 100..104", (2, 3, 5, 16), torch.arange(100, 105), 10000.0),
        ("head dim 64, unordered positions", (1, 2, 4, 64), torch.tensor([7, 0, 300, 41]), 10000.0),
        ("head dim 32, theta=500000 (Llama 3)", (2, 7, 32), torch.arange(10, 17), 500000.0),
    ]
    for seed, (what, shape, positions, theta) in enumerate(cases):
        x = _random(*shape, seed=100 + seed)
        given = x.clone()
        got = rope_rotate(given, positions.clone(), theta=theta)
        got = _returned_tensor(got, "rope_rotate", tuple(shape), what)
        if not torch.equal(given, x):
            raise AssertionError("rope_rotate changed its input x; return a new tensor instead")
        expected = _rope_reference(x, positions, theta)
        if _close(got, expected):
            continue
        D = shape[-1]
        pairs = torch.arange(0, D, 2, dtype=torch.float64)
        candidates = [
            (x, "x came back unchanged: rotate pair i of the token at position m by m * theta_i"),
            (_rope_reference(x, positions, theta, interleaved=True),
             "that is the interleaved convention, pairs (x[2i], x[2i+1]); here pair i is (x[i], x[i + D/2]), "
             "as in Hugging Face's Llama"),
            (_rope_by_hand(x, positions, theta ** (-pairs / D), sign=-1.0),
             "the rotation turns the wrong way: (a, b) -> (a cos - b sin, a sin + b cos)"),
            (_rope_by_hand(x, positions, theta ** (-pairs / 2 / D)),
             "theta_i = theta^(-2i/D) for pair i = 0 .. D/2-1: the exponents are torch.arange(0, D, 2) / D"),
            (_rope_by_hand(x, positions, theta ** (-torch.arange(D // 2, dtype=torch.float64) / (D // 2 - 1)))
             if D > 2 else x, "theta_i = theta^(-2i/D): divide 2i by D, not by D/2 - 1"),
            (_rope_reference(x, torch.arange(len(positions)), theta),
             "use the given positions, not 0 .. T-1: a token's angle depends on where it sits"),
        ]
        if theta != 10000.0:
            candidates.append((_rope_reference(x, positions, 10000.0), "use the theta argument, not 10000"))
        hint = _first_hint(got, candidates)
        err = (got - expected).abs().max().item()
        raise AssertionError(f"rope_rotate on {what} differs from RotaryEmbedding by up to {err:.3g}{hint}")


# ---------------------------------------------------------------------------
# 4.6 repeat_kv
# ---------------------------------------------------------------------------


@exercise("4.6", solution="repeat_kv")
def check_repeat_kv(repeat_kv):
    cases = [(1, 2, 3, 4, 2), (2, 4, 5, 8, 1), (1, 1, 6, 16, 8), (2, 8, 3, 4, 3)]  # (B, H_kv, T, D, n_rep)
    for seed, (B, H_kv, T, D, n_rep) in enumerate(cases):
        x = _random(B, H_kv, T, D, seed=200 + seed)
        given = x.clone()
        what = f"x of shape {(B, H_kv, T, D)}, n_rep={n_rep}"
        got = repeat_kv(given, n_rep)
        got = _returned_tensor(got, "repeat_kv", (B, H_kv * n_rep, T, D), what)
        if not torch.equal(given, x):
            raise AssertionError("repeat_kv changed its input; return a new tensor (or a view) instead")
        expected = attention.repeat_kv(x, n_rep)
        if torch.equal(got, expected):
            continue
        hint = ""
        if torch.equal(got, x.repeat(1, n_rep, 1, 1)):
            hint = ("; the copies of one head must be adjacent, [a, a, b, b], not [a, b, a, b], because query "
                    "head h uses K/V head h // n_rep: use repeat_interleave(n_rep, dim=1), or expand and reshape, "
                    "instead of repeat")
        raise AssertionError(f"repeat_kv({what}) returned the wrong heads{hint}")
