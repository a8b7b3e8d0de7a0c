"""Exercise 4.10's check: it passes the solution, reports the starter as not attempted, names typical mistakes.

The layer below is the solution of solutions/04_attention.md, written out
again with one typical mistake switched on by name; the check must name each
in a one-line message. The check's own by-hand reference is proven equal to
``llmbook.attention.MultiHeadAttention`` here. Layers of a few hundred
parameters: seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
from exercise_helpers import fresh_starter as _fresh_starter
from exercise_helpers import one_line_error as _one_line_error
from exercise_helpers import passes_and_starter_not_attempted as _passes_and_starter_not_attempted
from exercise_helpers import solution_lines as _solution_lines
from torch import nn

from llmbook import attention
from llmbook.exercises import ch04


class _Starter(nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("your solution goes here")


class _MHA(nn.Module):
    """The solution's MultiHeadAttention; ``mistake`` switches one typical mistake on."""

    mistake: str | None = None

    def __init__(self, d_model, n_heads, n_kv_heads=None, bias=False, rope=None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        out = (n_heads + 2 * n_kv_heads) * self.head_dim
        if self.mistake == "weight_transposed":
            self.qkv = nn.Module()
            self.qkv.weight = nn.Parameter(torch.zeros(d_model, out))
            self.proj = nn.Module()
            self.proj.weight = nn.Parameter(torch.zeros(d_model, d_model))
        else:
            self.qkv = nn.Linear(d_model, out, bias=bias)
            self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.rope = rope

    def new_cache(self, batch_size, max_len):
        shape = (batch_size, self.n_kv_heads, max_len, self.head_dim)
        return {"k": torch.zeros(shape), "v": torch.zeros(shape), "length": 0}

    def forward(self, x, cache=None):
        m = self.mistake
        B, T, C = x.shape
        nh, nkv, hs = self.n_heads, self.n_kv_heads, self.head_dim
        parts = self.qkv(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        q, k, v = {"kv_swapped": (0, 2, 1), "qk_swapped": (1, 0, 2)}.get(m, (0, 1, 2))
        q, k, v = parts[q], parts[k], parts[v]
        q = q.view(B, T, nh, hs).transpose(1, 2)
        k = k.view(B, T, nkv, hs).transpose(1, 2)
        v = v.view(B, T, nkv, hs).transpose(1, 2)
        start = 0 if cache is None else cache["length"]
        if self.rope is not None:
            position = 0 if m == "rope_not_offset" else start
            q, k = self.rope(q, position), self.rope(k, position)
        if cache is not None and m != "cache_ignored":
            end = start + T
            cache["k"][:, :, start:end], cache["v"][:, :, start:end] = k, v
            cache["length"] = end
            k, v = cache["k"][:, :, :end], cache["v"][:, :, :end]
        t_k = k.shape[2]
        if m == "repeat_tiled":
            k, v = k.repeat(1, nh // nkv, 1, 1), v.repeat(1, nh // nkv, 1, 1)
        else:
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        scores = q @ k.transpose(-2, -1)
        if m != "no_scale":
            scores = scores / math.sqrt(C if m == "scale_d_model" else hs)
        diagonal = {"mask_top_left": 0, "diagonal_masked": t_k - T - 1, "future_visible": t_k - T + 1}.get(m, t_k - T)
        visible = torch.ones(T, t_k, dtype=torch.bool).tril(diagonal=diagonal)
        if m == "no_mask" or (m == "no_mask_with_cache" and cache is not None):
            visible[:] = True
        scores = scores.masked_fill(~visible, float("-inf"))
        y = scores.softmax(dim=-1) @ v
        y = y.reshape(B, T, C) if m == "merge_view" else y.transpose(1, 2).reshape(B, T, C)
        if m == "no_proj":
            return y
        if m == "proj_transposed":
            return y @ self.proj.weight + (0 if self.proj.bias is None else self.proj.bias)
        if m == "detached":
            return self.proj(y).detach()
        return self.proj(y)


def _with(mistake: str) -> type[_MHA]:
    return type(f"MHA_{mistake}", (_MHA,), {"mistake": mistake})


def test_solution_passes_and_starter_is_not_attempted(capsys):
    _passes_and_starter_not_attempted(capsys, ch04.check_multi_head_attention, "4.10", (_MHA,), (_Starter,))


@pytest.mark.parametrize("case", ch04._GQA_CASES)
def test_by_hand_reference_is_the_library(case):
    """The check's by-hand layer, without a mistake, is llmbook's MultiHeadAttention, also when decoding."""
    B, T, C, H, Hkv, bias, use_rope = case
    ref = ch04._gqa_reference(C, H, Hkv, bias, use_rope, seed=1)
    x = torch.randn(B, 7, C)
    with torch.no_grad():
        assert torch.allclose(ch04._gqa_by_hand(ref, x), ref(x), atol=1e-5)
        assert torch.allclose(ch04._decode_by_hand(ref, x), ref(x), atol=1e-5)
        cache = ref.new_cache(B, 7)
        pieces = [ref(x[:, a:b], cache=cache) for a, b in ch04._DECODE_SPANS]
        assert torch.allclose(torch.cat(pieces, dim=1), ref(x), atol=1e-5)


@pytest.mark.parametrize(("mistake", "hint"), [
    ("no_scale", "the scores are not scaled: multiply q kᵀ by 1/sqrt(head_dim)"),
    ("scale_d_model", "not 1/sqrt(d_model)"),
    ("weight_transposed", "nn.Linear stores its weight as (out_features, in_features), yours are transposed"),
    ("proj_transposed", "the output projection's weight is used transposed"),
    ("kv_swapped", "k and v are swapped"),
    ("qk_swapped", "q and k are swapped"),
    ("diagonal_masked", "it hides the diagonal"),
    ("future_visible", "query i sees key i + 1"),
    ("no_mask", "the causal mask is missing"),
    ("repeat_tiled", "repeat_interleave, not repeat"),
    ("mask_top_left", "with a cache the causal mask must be offset"),
    ("no_mask_with_cache", "with a cache the new tokens still need the causal mask"),
    ("cache_ignored", "with a cache the new tokens attend only to themselves"),
    ("rope_not_offset", "rotate q and k with self.rope(q, start)"),
    ("no_proj", "the output projection is missing"),
    ("merge_view", "merge the heads back by transposing"),
    ("detached", "the output does not require grad"),
])
def test_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch04.check_multi_head_attention, _with(mistake))
    assert hint in message, message


@pytest.mark.parametrize("mistake", [m for m in ch04._GQA_HINTS if m not in ("qk_swapped", "diagonal_masked")])
def test_every_forward_mistake_is_told_apart(mistake):
    """On the first case where it changes the output, no earlier mistake in the list gives the same output."""
    names = list(ch04._GQA_HINTS)
    inputs = [(case, length) for case in ch04._GQA_CASES for length in (case[1], sum(ch04._DECODE_CHUNKS))]
    for (B, _, C, H, Hkv, bias, use_rope), T in inputs:  # the inputs the check runs, in its order
        ref = ch04._gqa_reference(C, H, Hkv, bias, use_rope, seed=3)
        x = torch.randn(B, T, C)
        with torch.no_grad():
            wrong = ch04._gqa_by_hand(ref, x, mistake)
            if torch.allclose(wrong, ref(x), atol=1e-4):
                continue
            for other in names[: names.index(mistake)]:
                if other != "qk_swapped" or H == Hkv:
                    assert not torch.allclose(ch04._gqa_by_hand(ref, x, other), wrong, atol=1e-4), other
        return
    pytest.fail(f"{mistake} never changes the output")


def test_a_constant_answer_fails_in_one_line():
    _one_line_error(ch04.check_multi_head_attention, lambda *args, **kwargs: 0)


def test_the_starter_is_generated_from_the_solutions():
    """exercises/04 is build_pdf's starter of solutions/04."""
    _fresh_starter("04_attention")


def test_solution_is_at_least_30_lines_of_the_readers_code():
    assert len(_solution_lines("04_attention", "## Exercise 4.10")) >= 30


def test_library_layer_is_what_the_check_loads():
    """The check loads MultiHeadAttention's state_dict: the names the exercise asks for."""
    layer = attention.MultiHeadAttention(24, 6, 2, bias=True)
    assert sorted(layer.state_dict()) == ["proj.bias", "proj.weight", "qkv.bias", "qkv.weight"]
