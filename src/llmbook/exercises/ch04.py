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
        pairs = [("the input x", x_theirs.grad, x_ref.grad)]
        pairs += [(f"the weight {name}", theirs[name].grad, p.grad) for name, p in ref.named_parameters()]
        for name, got_grad, ref_grad in pairs:
            if got_grad is None:
                raise AssertionError(f"no gradient reached {name}: keep every step of the forward in autograd "
                                     "(no .detach(), .data, .item() or torch.no_grad())")
            if not _grad_close(got_grad, ref_grad):
                err = (got_grad.float() - ref_grad).abs().max().item()
                raise AssertionError(f"CausalSelfAttention({what}): the outputs match, but the gradient of "
                                     f"{name} differs by up to {err:.3g}; is part of the forward computed "
                                     "outside autograd (.detach(), .data, numpy) or with constants that "
                                     "stand in for the weights?")
