"""Checks for Chapter 4's exercises: causal attention, the KV cache's size, RoPE, repeat_kv, whole layers.

Exercises 4.9 and 4.10 have the reader assemble a layer whose parameters are
named like ``llmbook.attention.MultiHeadAttention``'s, so the check loads the
library layer's weights into it and compares outputs, gradients and (4.10)
decoding with a KV cache.

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


# ---------------------------------------------------------------------------
# 4.9 a whole causal self-attention layer
# ---------------------------------------------------------------------------

_MHA_CASES = [(1, 1, 8, 2, False), (2, 5, 16, 2, False), (1, 7, 24, 3, True), (2, 6, 12, 4, False)]  # B, T, C, H, bias


def _mha_by_hand(x: Tensor, ref: attention.MultiHeadAttention, *, scale: str = "sqrt", mask: str = "causal",
                 softmax_dim: int = -1, split: str = "heads", merge: str = "transpose", proj: bool = True,
                 order: tuple[int, int, int] = (0, 1, 2)) -> Tensor:
    """The layer ``ref`` computed by hand, with one of the usual mistakes switched on by an argument."""
    B, T, C = x.shape
    H = ref.n_heads
    hs = C // H
    parts = ref.qkv(x).split(C, dim=-1)
    q, k, v = (parts[i] for i in order)

    def heads(t: Tensor) -> Tensor:
        if split == "interleaved":  # head h gets dims h, h + H, h + 2H, ...
            return t.view(B, T, hs, H).permute(0, 3, 1, 2)
        if split == "view":  # (B, T, C) viewed as (B, H, T, hs) without the transpose
            return t.reshape(B, H, T, hs)
        return t.view(B, T, H, hs).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    factor = {"sqrt": 1 / math.sqrt(hs), "none": 1.0, "d": 1 / hs, "d_model": 1 / math.sqrt(C)}[scale]
    keep = {"causal": torch.ones(T, T, dtype=torch.bool).tril(), "none": torch.ones(T, T, dtype=torch.bool),
            "flipped": torch.ones(T, T, dtype=torch.bool).triu()}[mask]
    y = _masked_attention(q, k, v, keep, factor, dim=softmax_dim)  # (B, H, T, hs)
    y = y.reshape(B, T, C) if merge == "view" else y.transpose(1, 2).reshape(B, T, C)
    return ref.proj(y) if proj else y


def _mha_hint(got: Tensor, x: Tensor, ref: attention.MultiHeadAttention) -> str:
    with torch.no_grad():
        candidates = [
            (_mha_by_hand(x, ref, mask="none"), "every query sees every key: set the scores of keys j > i to -inf "
             "before the softmax"),
            (_mha_by_hand(x, ref, mask="flipped"), "the mask is flipped: query i may see keys j <= i (lower "
             "triangle), not j >= i"),
            (_mha_by_hand(x, ref, scale="none"), "the scores are not scaled: divide q kᵀ by sqrt(head_dim)"),
            (_mha_by_hand(x, ref, scale="d"), "divide the scores by sqrt(head_dim), not by head_dim"),
            (_mha_by_hand(x, ref, scale="d_model"), "scale by 1/sqrt(head_dim), the width of one head "
             "(d_model // n_heads), not by 1/sqrt(d_model)"),
            (_mha_by_hand(x, ref, softmax_dim=-2), "take the softmax over the keys, the last dim (dim=-1)"),
            (_mha_by_hand(x, ref, proj=False), "the output projection is missing: return self.proj(y)"),
            (_mha_by_hand(x, ref, order=(1, 0, 2)), "q and k are swapped: self.qkv(x) holds q, k, v in that "
             "order along the last dim"),
            (_mha_by_hand(x, ref, order=(0, 2, 1)), "k and v are swapped: self.qkv(x) holds q, k, v in that "
             "order along the last dim"),
            (_mha_by_hand(x, ref, split="interleaved"), "head h owns the consecutive dims h*head_dim .. "
             "(h+1)*head_dim - 1: view (B, T, C) as (B, T, n_heads, head_dim), then transpose(1, 2)"),
            (_mha_by_hand(x, ref, split="view"), "(B, T, C) cannot be reshaped straight to (B, n_heads, T, "
             "head_dim): view it as (B, T, n_heads, head_dim), then transpose(1, 2)"),
            (_mha_by_hand(x, ref, merge="view"), "merge the heads back by transposing (B, n_heads, T, head_dim) "
             "to (B, T, n_heads, head_dim) before reshaping to (B, T, C)"),
        ]
    return _first_hint(got, candidates)


def _grad_close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.float(), b, atol=1e-4, rtol=1e-3))


@exercise("4.9", solution="CausalSelfAttention")
def check_causal_self_attention(CausalSelfAttention):
    for seed, (B, T, C, H, bias) in enumerate(_MHA_CASES):
        what = f"d_model={C}, n_heads={H}, bias={bias}"
        layer = CausalSelfAttention(C, H, bias=bias)
        if not isinstance(layer, torch.nn.Module):
            raise AssertionError(f"CausalSelfAttention({what}) should be an nn.Module, got {type(layer).__name__}; "
                                 "subclass nn.Module and call super().__init__() first")
        torch.manual_seed(300 + seed)  # the reference's weights; the reader's layer gets the same ones
        ref = attention.MultiHeadAttention(C, H, bias=bias)
        with torch.no_grad():  # nn.Linear's init is small; larger weights make the mistakes visible
            for i, p in enumerate(ref.parameters()):
                p.copy_(_random(*p.shape, seed=400 + 10 * seed + i) * 0.5)
        state = ref.state_dict()
        theirs = dict(layer.named_parameters())
        expected_shapes = {name: tuple(t.shape) for name, t in state.items()}
        got_shapes = {name: tuple(t.shape) for name, t in theirs.items()}
        if got_shapes != expected_shapes:
            raise AssertionError(f"CausalSelfAttention({what}) has the parameters {got_shapes}, but the check "
                                 f"loads {expected_shapes}: one fused nn.Linear self.qkv (d_model -> 3*d_model) "
                                 "and one nn.Linear self.proj (d_model -> d_model), with biases only if bias=True")
        layer.load_state_dict(state, strict=False)  # buffers of the reader's own (a mask) may stay

        x = _random(B, T, C, seed=500 + seed)
        x_theirs, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = layer(x_theirs)
        out = _returned_tensor(out, "CausalSelfAttention.forward", (B, T, C), f"x of shape {(B, T, C)}, {what}")
        expected = ref(x_ref)
        if not torch.equal(x_theirs.detach(), x):
            raise AssertionError("forward changed its input x; compute new tensors instead")
        if not _close(out.detach(), expected.detach(), atol=1e-4):
            err = (out.detach() - expected.detach()).abs().max().item()
            hint = _mha_hint(out.detach(), x, ref)
            raise AssertionError(f"CausalSelfAttention({what}) on x of shape {(B, T, C)} differs from "
                                 f"llmbook.attention.MultiHeadAttention by up to {err:.3g}{hint}")

        # gradients: the same upstream gradient into both layers
        upstream = _random(B, T, C, seed=600 + seed)
        if not out.requires_grad:
            raise AssertionError("the output does not require grad: do not detach, use .data, or wrap the "
                                 "forward in torch.no_grad(); the layer must be trainable")
        (out * upstream).sum().backward()
        (expected * upstream).sum().backward()
        _check_gradients(theirs, ref, x_theirs, x_ref, what, layer_name="CausalSelfAttention")


# ---------------------------------------------------------------------------
# 4.10 assemble it yourself: multi-head attention with GQA and a KV cache
# ---------------------------------------------------------------------------

# (B, T, d_model, n_heads, n_kv_heads, bias, rope): MHA first, then GQA and MQA, RoPE last, so that a mistake is
# named on the first, simplest case that shows it (tests/test_exercises_ch04.py proves each is told apart there)
_GQA_CASES = [
    (1, 5, 8, 2, 2, False, False),
    (2, 6, 16, 4, 4, False, False),
    (2, 7, 24, 6, 2, True, False),
    (1, 8, 32, 4, 2, False, True),
    (2, 6, 16, 4, 1, False, True),
    (1, 1, 16, 4, 2, False, True),  # a single token
]
_DECODE_CHUNKS = (3, 1, 1, 2)  # a prompt of 3 tokens, two single tokens, then 2 tokens at once
_DECODE_SPANS = [(sum(_DECODE_CHUNKS[:i]), sum(_DECODE_CHUNKS[: i + 1])) for i in range(len(_DECODE_CHUNKS))]

# the hints of the mistakes _gqa_by_hand can switch on, in the order the check tries them
_GQA_HINTS = {
    "no_proj": "the output projection is missing: return self.proj(y), which mixes the heads back into d_model",
    "proj_transposed": "the output projection's weight is used transposed: nn.Linear computes y @ W.T + b; "
                       "call self.proj(y)",
    "no_scale": "the scores are not scaled: multiply q kᵀ by 1/sqrt(head_dim)",
    "scale_d_model": "scale by 1/sqrt(head_dim), the width of one head (d_model // n_heads), not 1/sqrt(d_model)",
    "no_mask": "every query sees every key: the causal mask is missing (hide the keys j > i with -inf)",
    "future_visible": "the causal mask is off by one: query i sees key i + 1; hide keys j > i, "
                      "torch.ones(T, T_k).tril(diagonal=T_k - T) keeps the rest",
    "diagonal_masked": "the causal mask is off by one: it hides the diagonal, but query i must see itself, "
                       "keys j <= i; torch.ones(T, T_k).tril(diagonal=T_k - T) is what may be seen",
    "flipped": "the causal mask is flipped: query i may see keys j <= i (lower triangle), not j >= i",
    "qk_swapped": "q and k are swapped: self.qkv(x) holds q, then k, then v along the last dim",
    "kv_swapped": "k and v are swapped: self.qkv(x) holds q (n_heads * head_dim), then k, then v "
                  "(n_kv_heads * head_dim each)",
    "q_last": "wrong split order of the fused qkv: it holds q (n_heads * head_dim) first, then k, then v "
              "(n_kv_heads * head_dim each)",
    "qkv_grouped": "wrong split order of the fused qkv: it is not grouped per k/v head; split it into "
                   "[n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim] for q, k, v",
    "repeat_tiled": "the k/v heads are tiled [a, b, a, b], but query head h uses k/v head h // (n_heads // "
                    "n_kv_heads), so copies must be adjacent [a, a, b, b]: repeat_interleave, not repeat",
    "split_view": "(B, T, n * head_dim) cannot be reshaped straight to (B, n, T, head_dim): view it as "
                  "(B, T, n, head_dim), then transpose(1, 2)",
    "merge_view": "merge the heads back by transposing (B, n_heads, T, head_dim) to (B, T, n_heads, head_dim) "
                  "before reshaping to (B, T, d_model)",
    "softmax_queries": "take the softmax over the keys, the last dim (dim=-1)",
}
_CACHE_HINTS = {
    "cache_ignored": "with a cache the new tokens attend only to themselves: append their k, v to the cache and "
                     "attend over every stored key",
    "mask_top_left": "with a cache the causal mask must be offset: the T new queries are the last T of the T_k "
                     "positions, so query i sees keys j <= T_k - T + i: torch.ones(T, T_k).tril(diagonal=T_k - T)",
    "no_mask_with_cache": "with a cache the new tokens still need the causal mask among themselves (a prompt "
                          "of several tokens, or several new tokens at once)",
    "rope_not_offset": "with a cache the new tokens sit at positions cache length .. cache length + T - 1: "
                       "rotate q and k with self.rope(q, start), start = the number of tokens already cached",
}


def _gqa_by_hand(ref: attention.MultiHeadAttention, x: Tensor, mistake: str | None = None,
                 past: dict[str, Tensor] | None = None) -> Tensor:
    """``ref``'s forward written out, with one typical mistake switched on by name.

    ``past`` holds the keys and values of earlier tokens (``{"k", "v"}``, ``(B, Hkv, t, hs)``, after RoPE) and is
    extended in place: decoding chunk by chunk with it is the KV cache.
    """
    B, T, C = x.shape
    H, Hkv, hs = ref.n_heads, ref.n_kv_heads, ref.head_dim
    fused = ref.qkv(x)  # (B, T, (H + 2 Hkv) hs)
    if mistake == "qkv_grouped":  # [q of the group's heads, k, v] per k/v head
        g = H // Hkv
        parts = fused.view(B, T, Hkv, g + 2, hs)
        q, k, v = (parts[:, :, :, :g].reshape(B, T, H * hs), parts[:, :, :, g].reshape(B, T, Hkv * hs),
                   parts[:, :, :, g + 1].reshape(B, T, Hkv * hs))
    else:
        sizes = [Hkv * hs, Hkv * hs, H * hs] if mistake == "q_last" else [H * hs, Hkv * hs, Hkv * hs]
        a, b, c = fused.split(sizes, dim=-1)
        q, k, v = {"q_last": (c, a, b), "kv_swapped": (a, c, b), "qk_swapped": (b, a, c)}.get(mistake, (a, b, c))

    def heads(t: Tensor, n: int) -> Tensor:  # (B, T, n hs) -> (B, n, T, hs)
        return t.reshape(B, n, T, hs) if mistake == "split_view" else t.view(B, T, n, hs).transpose(1, 2)

    q, k, v = heads(q, H), heads(k, Hkv), heads(v, Hkv)
    cached = past is not None and mistake != "cache_ignored"
    start = past["k"].shape[2] if cached else 0
    if ref.rope is not None:
        position = 0 if mistake == "rope_not_offset" else start
        q, k = ref.rope(q, position), ref.rope(k, position)
    if cached:
        k, v = torch.cat([past["k"], k], dim=2), torch.cat([past["v"], v], dim=2)  # (B, Hkv, T_k, hs)
        past["k"], past["v"] = k, v
    t_k = k.shape[2]
    repeat = (lambda t: t.repeat(1, H // Hkv, 1, 1)) if mistake == "repeat_tiled" else (
        lambda t: t.repeat_interleave(H // Hkv, dim=1))
    k, v = repeat(k), repeat(v)  # (B, H, T_k, hs)
    scale = {"no_scale": 1.0, "scale_d_model": 1 / math.sqrt(C)}.get(mistake, 1 / math.sqrt(hs))
    offset = 0 if mistake == "mask_top_left" else t_k - T
    offset += {"future_visible": 1, "diagonal_masked": -1}.get(mistake, 0)
    keep = torch.ones(T, t_k, dtype=torch.bool).tril(diagonal=offset)
    if mistake == "flipped":
        keep = torch.ones(T, t_k, dtype=torch.bool).triu(diagonal=t_k - T)
    if mistake == "no_mask" or (mistake == "no_mask_with_cache" and past is not None):
        keep = torch.ones(T, t_k, dtype=torch.bool)
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~keep, float("-inf"))  # (B, H, T, T_k)
    y = attention.softmax(scores, dim=-2 if mistake == "softmax_queries" else -1) @ v  # (B, H, T, hs)
    y = y.reshape(B, T, C) if mistake == "merge_view" else y.transpose(1, 2).reshape(B, T, C)
    if mistake == "no_proj":
        return y
    if mistake == "proj_transposed":
        return y @ ref.proj.weight + (0 if ref.proj.bias is None else ref.proj.bias)
    return ref.proj(y)


def _decode_by_hand(ref: attention.MultiHeadAttention, x: Tensor, mistake: str | None = None) -> Tensor:
    past = {"k": x.new_zeros(x.shape[0], ref.n_kv_heads, 0, ref.head_dim)}
    past["v"] = past["k"]
    return torch.cat([_gqa_by_hand(ref, x[:, a:b], mistake, past) for a, b in _DECODE_SPANS], dim=1)


def _same(got: Tensor, wrong: Tensor) -> bool:
    return got.shape == wrong.shape and bool(torch.allclose(got, wrong, atol=1e-4, rtol=1e-3))


def _gqa_hint(got: Tensor, candidates: dict[str, Tensor], hints: dict[str, str]) -> str:
    for name, wrong in candidates.items():
        if _same(got, wrong):
            return f"; {hints[name]}"
    return ""


def _gqa_reference(d_model: int, n_heads: int, n_kv_heads: int, bias: bool, use_rope: bool,
                   seed: int) -> attention.MultiHeadAttention:
    """The library's layer with weights larger than nn.Linear's init, so that every mistake shows."""
    rotary = RotaryEmbedding(d_model // n_heads, max_seq_len=64) if use_rope else None
    ref = attention.MultiHeadAttention(d_model, n_heads, n_kv_heads, bias=bias, rope=rotary)
    with torch.no_grad():
        for i, p in enumerate(ref.parameters()):
            p.copy_(_random(*p.shape, seed=seed + i) * 0.5)
    return ref


def _load_reference(layer, ref: attention.MultiHeadAttention, what: str) -> dict[str, Tensor]:
    """Check the reader's parameters have the library's names and shapes, load the library's weights."""
    if not isinstance(layer, torch.nn.Module):
        raise AssertionError(f"MultiHeadAttention({what}) should be an nn.Module, got {type(layer).__name__}; "
                             "subclass nn.Module and call super().__init__() first")
    expected = {name: tuple(p.shape) for name, p in ref.named_parameters()}
    theirs = dict(layer.named_parameters())
    got = {name: tuple(p.shape) for name, p in theirs.items()}
    if got != expected:
        transposed = {name: shape[::-1] for name, shape in got.items()}
        hint = ("; nn.Linear stores its weight as (out_features, in_features), yours are transposed"
                if transposed == expected else
                "; self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim) for q of every query "
                "head and k, v of every k/v head, self.proj = nn.Linear(d_model, d_model), biases only if bias")
        raise AssertionError(f"MultiHeadAttention({what}) has the parameters {got}, but the check loads "
                             f"{expected}{hint}")
    layer.load_state_dict(ref.state_dict(), strict=False)  # buffers of the reader's own may stay
    return theirs


def _check_gradients(layer_params: dict[str, Tensor], ref: attention.MultiHeadAttention, x_theirs: Tensor,
                     x_ref: Tensor, what: str, layer_name: str = "MultiHeadAttention") -> None:
    """After one backward through each layer: the reader's gradients of x and of every weight equal the library's."""
    pairs = [("the input x", x_theirs.grad, x_ref.grad)]
    pairs += [(f"the weight {name}", layer_params[name].grad, p.grad) for name, p in ref.named_parameters()]
    for name, got_grad, ref_grad in pairs:
        if got_grad is None:
            raise AssertionError(f"no gradient reached {name}: keep every step of the forward in autograd "
                                 "(no .detach(), .data, .item() or torch.no_grad())")
        if not _grad_close(got_grad, ref_grad):
            err = (got_grad.float() - ref_grad).abs().max().item()
            raise AssertionError(f"{layer_name}({what}): the outputs match, but the gradient of {name} differs "
                                 f"by up to {err:.3g}; is part of the forward computed outside autograd (.detach(), "
                                 ".data, numpy) or with constants that stand in for the weights?")


def _check_decoding(layer, ref: attention.MultiHeadAttention, x: Tensor, what: str) -> None:
    """Token-by-token decoding with the reader's cache must equal the library's full recomputation."""
    B, T, _ = x.shape
    try:
        cache = layer.new_cache(B, T)
    except AttributeError as exc:
        raise AssertionError(f"MultiHeadAttention has no working new_cache(batch_size, max_len): {exc}") from None
    with torch.no_grad():
        expected = ref(x)
        try:
            pieces = [layer(x[:, a:b], cache=cache) for a, b in _DECODE_SPANS]
        except TypeError as exc:
            raise AssertionError(f"forward(x, cache=...) failed with TypeError: {exc}; forward must accept "
                                 "cache=None and the cache that new_cache returns") from None
        for (a, b), piece in zip(_DECODE_SPANS, pieces, strict=True):
            _returned_tensor(piece, "MultiHeadAttention.forward", (B, b - a, x.shape[-1]),
                             f"{b - a} new tokens with a cache, {what}")
        got = torch.cat([p.float() for p in pieces], dim=1)
        if _same(got, expected):
            return
        candidates = {name: _decode_by_hand(ref, x, name) for name in _CACHE_HINTS}
    err = (got - expected).abs().nan_to_num(float("inf")).max().item()
    hint = _gqa_hint(got, candidates, _CACHE_HINTS)
    steps = " + ".join(map(str, _DECODE_CHUNKS))
    raise AssertionError(f"MultiHeadAttention({what}): decoding {steps} tokens with the cache differs from the "
                         f"full forward by up to {err:.3g}{hint}")


def _check_forward(layer, params: dict[str, Tensor], ref: attention.MultiHeadAttention, x: Tensor,
                   what: str, seed: int) -> None:
    """The reader's output and the gradients of x and every weight must be the library's."""
    B, T, C = x.shape
    x_theirs, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    out = layer(x_theirs)
    out = _returned_tensor(out, "MultiHeadAttention.forward", (B, T, C), f"x of shape {(B, T, C)}, {what}")
    expected = ref(x_ref)
    if not torch.equal(x_theirs.detach(), x):
        raise AssertionError("forward changed its input x; compute new tensors instead")
    if not _same(out.detach(), expected.detach()):
        got = out.detach()
        err = (got - expected.detach()).abs().nan_to_num(float("inf")).max().item()
        if torch.isnan(got).any():
            hint = ("; NaN in the output: a query whose keys are all masked gives 0/0; the causal mask is off "
                    f"by one, it hides the diagonal: {_GQA_HINTS['diagonal_masked']}")
        else:
            with torch.no_grad():
                names = [n for n in _GQA_HINTS if n != "qk_swapped" or ref.n_heads == ref.n_kv_heads]
                hint = _gqa_hint(got, {n: _gqa_by_hand(ref, x, n) for n in names}, _GQA_HINTS)
        raise AssertionError(f"MultiHeadAttention({what}) on x of shape {(B, T, C)} differs from "
                             f"llmbook.attention.MultiHeadAttention by up to {err:.3g}{hint}")
    if not out.requires_grad:
        raise AssertionError("the output does not require grad: do not detach, use .data, or wrap the "
                             "forward in torch.no_grad(); the layer must be trainable")
    upstream = _random(B, T, C, seed=seed)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    _check_gradients(params, ref, x_theirs, x_ref, what)


@exercise("4.10", solution="MultiHeadAttention")
def check_multi_head_attention(MultiHeadAttention):
    for seed, (B, T, C, H, Hkv, bias, use_rope) in enumerate(_GQA_CASES):
        what = f"d_model={C}, n_heads={H}, n_kv_heads={Hkv}, bias={bias}" + (", with RoPE" if use_rope else "")
        ref = _gqa_reference(C, H, Hkv, bias, use_rope, seed=700 + 10 * seed)
        layer = MultiHeadAttention(C, H, n_kv_heads=Hkv, bias=bias, rope=ref.rope)
        params = _load_reference(layer, ref, what)
        _check_forward(layer, params, ref, _random(B, T, C, seed=800 + seed), what, seed=900 + seed)
        # the decoding sequence: first all at once (the full recomputation), then chunk by chunk with the cache
        x_decode = _random(B, sum(_DECODE_CHUNKS), C, seed=1000 + seed)
        _check_forward(layer, params, ref, x_decode, what, seed=1100 + seed)
        _check_decoding(layer, ref, x_decode, what)
