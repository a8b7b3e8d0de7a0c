"""Our attention against PyTorch's F.scaled_dot_product_attention, the KV cache against recomputation."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from llmbook import attention
from llmbook.attention import (
    ATTENTION_BACKENDS,
    KVCache,
    MultiHeadAttention,
    attention_weights,
    attention_with_lse,
    causal_mask,
    kv_cache_bytes,
    register_backend,
    repeat_kv,
    scaled_dot_product_attention,
    softmax,
)
from llmbook.planning import ModelShape, count_params
from llmbook.rope import RotaryEmbedding

FP32 = {"atol": 1e-6, "rtol": 1e-5}


def make_qkv(batch=(2,), h_q=4, h_kv=None, t_q=6, t_k=None, d=8, dtype=torch.float32, grad=False):
    """Random q (*batch, h_q, t_q, d), k and v (*batch, h_kv, t_k, d)."""
    h_kv, t_k = h_q if h_kv is None else h_kv, t_q if t_k is None else t_k
    q = torch.randn(*batch, h_q, t_q, d, dtype=dtype)
    k = torch.randn(*batch, h_kv, t_k, d, dtype=dtype)
    v = torch.randn(*batch, h_kv, t_k, d, dtype=dtype)
    return [x.requires_grad_(grad) for x in (q, k, v)]


def make_mask(kind: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A mask of ``shape`` (..., T_q, T_k): random, with no row fully masked and the first row fully open."""
    if kind == "none":
        return None
    allowed = torch.rand(shape) > 0.4  # most rows partially masked
    allowed[..., 0] = True  # every query may see at least key 0
    allowed[..., 0, :] = True  # and query 0 sees everything
    if kind == "bool":
        return allowed
    return torch.randn(shape).masked_fill(~allowed, -math.inf)  # "float": a bias, -inf where masked


def test_module_doctests():
    torch.manual_seed(0)
    result = doctest.testmod(attention)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 6)])
@pytest.mark.parametrize("dim", [-1, 0])
def test_softmax_matches_torch(shape, dim):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    assert_close(softmax(x, dim=dim), torch.softmax(x, dim=dim), **FP32)


def test_softmax_is_stable_for_huge_logits():
    torch.manual_seed(0)
    x = torch.randn(4, 10) + 1e4  # exp(1e4) overflows float32 (and float64)
    x[0, 3] = 2e4
    out = softmax(x)
    assert torch.isfinite(out).all()
    assert_close(out, torch.softmax(x, dim=-1), **FP32)
    assert out[0, 3] == 1.0
    assert_close(softmax(torch.tensor([1e4, 1e4])), torch.tensor([0.5, 0.5]))


def test_softmax_fully_masked_rows_give_zeros_and_finite_gradients():
    torch.manual_seed(0)
    x = torch.randn(3, 5).masked_fill(torch.tensor([False, True, False])[:, None], -math.inf)
    x[2, :2] = -math.inf  # partially masked row
    x.requires_grad_(True)
    out = softmax(x)
    assert not out.isnan().any()
    assert (out[1] == 0).all()
    assert (out[2, :2] == 0).all() and out[2].sum().item() == pytest.approx(1.0)
    (out * torch.randn(3, 5)).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()


# ---------------------------------------------------------------------------
# The causal mask and its alignment
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("t_q", "t_k"), [(1, 1), (4, 4), (1, 5), (3, 7), (5, 3)])
def test_causal_mask_is_bottom_right_aligned(t_q, t_k):
    torch.manual_seed(0)
    mask = causal_mask(t_q, t_k)
    assert mask.shape == (t_q, t_k) and mask.dtype == torch.bool
    for i in range(t_q):
        position = t_k - t_q + i  # the absolute position of query i
        assert mask[i].tolist() == [j <= position for j in range(t_k)]
    if t_q == t_k:
        assert torch.equal(mask, torch.ones(t_q, t_k, dtype=torch.bool).tril())


def test_pytorch_is_causal_aligns_top_left():
    torch.manual_seed(0)
    q, k, v = make_qkv(t_q=3, t_k=5)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    top_left = torch.ones(3, 5, dtype=torch.bool).tril()  # query 0 sees key 0 only
    assert_close(theirs, F.scaled_dot_product_attention(q, k, v, attn_mask=top_left), **FP32)
    ours = scaled_dot_product_attention(q, k, v, is_causal=True)  # query 0 sees keys 0..2
    assert not torch.allclose(ours, theirs)
    assert_close(theirs[..., 0, :], v[..., 0, :], **FP32)  # attending to one key returns its value


# ---------------------------------------------------------------------------
# scaled_dot_product_attention against PyTorch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["none", "bool", "float"])
@pytest.mark.parametrize(("t_q", "t_k"), [(6, 6), (3, 7), (7, 3), (1, 5)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_matches_sdpa_with_masks(kind, t_q, t_k, scale):
    torch.manual_seed(0)
    q, k, v = make_qkv(t_q=t_q, t_k=t_k)
    mask = make_mask(kind, (2, 1, t_q, t_k))  # broadcast over heads
    ours = scaled_dot_product_attention(q, k, v, mask=mask, scale=scale)
    assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), **FP32)


def test_matches_sdpa_causal_square():
    torch.manual_seed(0)
    q, k, v = make_qkv(t_q=9)
    ours = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True), **FP32)


@pytest.mark.parametrize(("t_q", "t_k"), [(1, 8), (3, 8), (8, 8)])
@pytest.mark.parametrize("kind", ["none", "bool"])
def test_causal_with_fewer_queries_matches_explicit_bottom_right_mask(t_q, t_k, kind):
    torch.manual_seed(0)
    q, k, v = make_qkv(t_q=t_q, t_k=t_k)
    mask = make_mask(kind, (2, 4, t_q, t_k))
    explicit = causal_mask(t_q, t_k) if mask is None else causal_mask(t_q, t_k) & mask
    ours = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=True)
    assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=explicit), **FP32)


@pytest.mark.parametrize(("h_q", "h_kv"), [(4, 4), (4, 2), (6, 3), (4, 1)])  # MHA, GQA, GQA, MQA
@pytest.mark.parametrize("kind", ["none", "bool", "causal"])
def test_grouped_query_attention_matches_sdpa(h_q, h_kv, kind):
    torch.manual_seed(0)
    q, k, v = make_qkv(h_q=h_q, h_kv=h_kv, t_q=5)
    mask = make_mask(kind if kind != "causal" else "none", (2, h_q, 5, 5))
    causal = kind == "causal"
    ours = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    gqa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    k_rep, v_rep = repeat_kv(k, h_q // h_kv), repeat_kv(v, h_q // h_kv)
    repeated = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask, is_causal=causal)
    assert_close(ours, gqa, **FP32)
    assert_close(ours, repeated, **FP32)


@pytest.mark.parametrize("n_rep", [1, 2, 3])
def test_repeat_kv_matches_repeat_interleave(n_rep):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 4)
    out = repeat_kv(x, n_rep)
    assert out.shape == (2, 3 * n_rep, 5, 4)
    assert torch.equal(out, x.repeat_interleave(n_rep, dim=1))


@pytest.mark.parametrize("kind", ["none", "bool", "float", "causal"])
def test_arbitrary_leading_batch_dims(kind):
    torch.manual_seed(0)
    q, k, v = make_qkv(batch=(2, 3), h_q=4, t_q=5)  # (2, 3, 4, 5, 8)
    mask = make_mask(kind if kind != "causal" else "none", (3, 1, 5, 5))
    ours = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=kind == "causal")
    assert ours.shape == (2, 3, 4, 5, 8)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=kind == "causal")
    assert_close(ours, ref, **FP32)


@pytest.mark.parametrize(("h_kv", "kind"), [(4, "none"), (4, "causal"), (2, "causal"), (4, "bool")])
def test_bfloat16_is_as_accurate_as_pytorch(h_kv, kind):
    """In bf16 neither is exact: both must be close to a float64 reference, ours no worse than PyTorch's."""
    torch.manual_seed(0)
    q, k, v = (x.bfloat16() for x in make_qkv(h_kv=h_kv, t_q=16, d=16))
    mask = make_mask("bool", (2, 1, 16, 16)) if kind == "bool" else None
    causal = kind == "causal"
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, is_causal=causal,
                                         enable_gqa=True)
    ours = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    assert ours.dtype == torch.bfloat16
    err_ours, err_theirs = (ours.double() - ref).abs().max(), (theirs.double() - ref).abs().max()
    assert err_ours < 1e-2  # about one bf16 rounding of outputs of size 1..4
    assert err_ours <= err_theirs + 1e-3
    assert_close(ours.double(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(("h_kv", "kind"), [(4, "none"), (4, "bool"), (4, "float"), (2, "causal"), (1, "causal")])
def test_gradients_match_sdpa(h_kv, kind):
    torch.manual_seed(0)
    q, k, v = make_qkv(h_kv=h_kv, t_q=5, t_k=5, grad=True)
    mask = make_mask(kind if kind != "causal" else "none", (2, 1, 5, 5))
    causal = kind == "causal"
    upstream = torch.randn(2, 4, 5, 8)  # a random dL/d(output)
    out = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    ours = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    theirs = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    for g_ours, g_theirs in zip(ours, theirs, strict=True):
        assert_close(g_ours, g_theirs, atol=1e-5, rtol=1e-5)


def test_dropout_is_reproducible_with_a_generator_and_keeps_the_mean():
    torch.manual_seed(0)
    q, k, v = make_qkv(t_q=6)
    no_drop = scaled_dot_product_attention(q, k, v)
    first = scaled_dot_product_attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(1))
    again = scaled_dot_product_attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(1))
    other = scaled_dot_product_attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other) and not torch.allclose(first, no_drop)
    # averaged over many masks, dropout with rescaling leaves the output unchanged
    ones = torch.ones(4000, 1, 4, 4)  # 4000 independent dropout masks
    mean = scaled_dot_product_attention(ones, ones, ones, dropout_p=0.3).mean(0)
    assert_close(mean, torch.ones_like(mean), atol=0.05, rtol=0)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        scaled_dot_product_attention(q, k, v, dropout_p=1.0)


# ---------------------------------------------------------------------------
# attention_with_lse and attention_weights
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["none", "bool", "float", "causal"])
@pytest.mark.parametrize(("t_q", "t_k", "h_kv"), [(6, 6, 4), (3, 8, 4), (6, 6, 2)])
def test_attention_with_lse(kind, t_q, t_k, h_kv):
    torch.manual_seed(0)
    q, k, v = make_qkv(h_kv=h_kv, t_q=t_q, t_k=t_k)
    mask = make_mask(kind if kind != "causal" else "none", (2, 4, t_q, t_k))
    causal = kind == "causal"
    out, lse = attention_with_lse(q, k, v, mask=mask, is_causal=causal, scale=0.5)
    assert lse.shape == (2, 4, t_q) and lse.dtype == torch.float32

    # the reference scores, built independently: scaled, then masked the way the mask says
    scores = q @ repeat_kv(k, 4 // h_kv).transpose(-2, -1) * 0.5
    if causal:
        scores = scores.masked_fill(~causal_mask(t_q, t_k), -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
    assert_close(lse, torch.logsumexp(scores, dim=-1), **FP32)
    explicit = causal_mask(t_q, t_k) if causal else mask
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=explicit, scale=0.5, enable_gqa=True)
    assert_close(out, ref, **FP32)
    # lse recovers the probabilities: p = exp(s - lse)
    assert_close(torch.exp(scores - lse[..., None]), attention_weights(q, k, mask, causal, scale=0.5), **FP32)


def test_lse_of_huge_and_fully_masked_rows():
    torch.manual_seed(0)
    q = torch.tensor([[1.0], [1.0]])  # two queries, head_dim 1
    k = torch.tensor([[1e4], [1e4]])
    _, lse = attention_with_lse(q, k, k, scale=1.0)
    assert_close(lse, torch.full((2,), 1e4 + math.log(2)))
    out, lse = attention_with_lse(q, k, k, mask=torch.tensor([[True, True], [False, False]]))
    assert lse[1] == -math.inf and (out[1] == 0).all() and not out.isnan().any()


@pytest.mark.parametrize("kind", ["none", "bool", "causal"])
def test_attention_weights_are_probabilities_and_give_the_output(kind):
    torch.manual_seed(0)
    q, k, v = make_qkv(h_kv=2, t_q=5)
    mask = make_mask(kind if kind != "causal" else "none", (5, 5))
    w = attention_weights(q, k, mask=mask, is_causal=kind == "causal")
    assert w.shape == (2, 4, 5, 5) and (w >= 0).all()
    assert_close(w.sum(-1), torch.ones(2, 4, 5))
    if kind == "causal":
        assert (w[..., ~causal_mask(5, 5)] == 0).all()
    out = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=kind == "causal")
    assert_close(w @ repeat_kv(v, 2), out, **FP32)


# ---------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------


def test_errors_name_the_problem():
    torch.manual_seed(0)
    q, k, v = make_qkv(h_q=4, t_q=5, d=8)
    with pytest.raises(ValueError, match="same head_dim"):
        scaled_dot_product_attention(q, k[..., :6], v)
    with pytest.raises(ValueError, match="query heads must be a multiple of k/v heads"):
        scaled_dot_product_attention(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match=r"mask \(5, 4\) cannot broadcast to the scores \(2, 4, 5, 5\)"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="cannot broadcast"):
        attention_with_lse(q, k, v, mask=torch.ones(3, 2, 4, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="same batch dims"):
        scaled_dot_product_attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="same tokens"):
        scaled_dot_product_attention(q, k, v[..., :4, :])
    with pytest.raises(ValueError, match="same head_dim"):
        attention_weights(q, k[..., :4])


def test_module_errors_say_what_to_change():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"d_model=30 is not divisible by n_heads=4.*choose n_heads that divides"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match=r"n_heads=6 is not a multiple of n_kv_heads=4.*choose n_kv_heads"):
        MultiHeadAttention(48, 6, n_kv_heads=4)
    with pytest.raises(ValueError, match="rope was built for head_dim 16"):
        MultiHeadAttention(32, 4, rope=RotaryEmbedding(16))
    m = MultiHeadAttention(32, 4, backend="nope")  # the backend may be registered after construction
    with pytest.raises(ValueError, match="unknown attention backend 'nope'; choose one of: manual, sdpa"):
        m(torch.randn(1, 3, 32))


# ---------------------------------------------------------------------------
# MultiHeadAttention
# ---------------------------------------------------------------------------


def make_mha(n_kv_heads, use_rope, d_model=32, n_heads=4, **kw) -> MultiHeadAttention:
    rope = RotaryEmbedding(d_model // n_heads, max_seq_len=64) if use_rope else None
    return MultiHeadAttention(d_model, n_heads, n_kv_heads=n_kv_heads, rope=rope, **kw)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_manual_and_sdpa_backends_agree(n_kv_heads, use_rope, padding):
    torch.manual_seed(0)
    m = make_mha(n_kv_heads, use_rope, bias=True)
    x = torch.randn(2, 7, 32, requires_grad=True)
    # right padding: the second sequence has 5 real tokens; every query still sees at least itself
    mask = (torch.arange(7) < torch.tensor([[7], [5]]))[:, None, None, :] if padding else None  # (B, 1, 1, T)
    upstream = torch.randn(2, 7, 32)
    results = {}
    for backend in ("manual", "sdpa"):
        m.backend = backend
        m.zero_grad()
        x.grad = None
        out = m(x, mask=mask)
        (out * upstream).sum().backward()
        results[backend] = (out, x.grad, m.qkv.weight.grad, m.proj.weight.grad, m.qkv.bias.grad)
    for ours, theirs in zip(results["manual"], results["sdpa"], strict=True):
        assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["manual", "sdpa"])
def test_dropout_only_in_training(backend):
    torch.manual_seed(0)
    m = make_mha(2, True, dropout=0.5, backend=backend)
    x = torch.randn(2, 6, 32)
    m.eval()
    eval_out = m(x)
    assert torch.equal(eval_out, m(x))  # deterministic in eval mode
    m.train()
    train_out = m(x)
    assert not torch.allclose(train_out, eval_out)
    assert not torch.allclose(train_out, m(x))  # a fresh dropout mask every call


def test_non_causal_attention_sees_the_future():
    torch.manual_seed(0)
    m = make_mha(4, False, causal=False)
    x = torch.randn(1, 5, 32)
    y = x.clone()
    y[:, -1] += 1.0  # change only the last token
    assert not torch.allclose(m(x)[:, 0], m(y)[:, 0])  # the first token notices
    m.causal = True
    assert_close(m(x)[:, :4], m(y)[:, :4])  # with a causal mask it cannot


@pytest.mark.parametrize(("d_model", "n_heads", "n_kv_heads"), [(32, 4, None), (32, 4, 2), (48, 6, 1), (64, 8, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_parameter_count_matches_planning(d_model, n_heads, n_kv_heads, bias):
    torch.manual_seed(0)
    m = MultiHeadAttention(d_model, n_heads, n_kv_heads=n_kv_heads, bias=bias)
    shape = ModelShape("one-layer", 100, 64, d_model, 1, n_heads, n_kv_heads, bias=bias)
    assert sum(p.numel() for p in m.parameters()) == count_params(shape).attention


def test_register_backend():
    torch.manual_seed(0)
    calls = []

    def spy(q, k, v, mask, is_causal, dropout_p):
        calls.append((q.shape, k.shape, is_causal))
        return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), is_causal=is_causal)

    register_backend("spy", spy)
    try:
        m = make_mha(2, True)
        x = torch.randn(1, 5, 32)
        expected = m(x)
        m.backend = "spy"
        assert_close(m(x), expected, **FP32)
        assert calls == [((1, 4, 5, 8), (1, 2, 5, 8), True)]
    finally:
        del ATTENTION_BACKENDS["spy"]


# ---------------------------------------------------------------------------
# The KV cache
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("backend", ["manual", "sdpa"])
@torch.no_grad()
def test_decoding_token_by_token_equals_full_recomputation(n_kv_heads, use_rope, backend):
    torch.manual_seed(0)
    m = make_mha(n_kv_heads, use_rope, backend=backend).eval()
    x = torch.randn(2, 10, 32)
    full = m(x)  # every position at once, causal
    cache = m.new_cache(batch_size=2, max_len=16)
    steps = [m(x[:, t : t + 1], cache=cache) for t in range(10)]
    assert cache.length == 10
    assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunks", [[4, 1, 1, 1, 1, 1, 1], [6, 2, 1, 1], [1, 9], [10]])
@pytest.mark.parametrize("n_kv_heads", [4, 1])
@torch.no_grad()
def test_prefill_then_decode_equals_full_recomputation(chunks, n_kv_heads):
    torch.manual_seed(0)
    m = make_mha(n_kv_heads, True).eval()
    x = torch.randn(2, 10, 32)
    full = m(x)
    for backend in ("manual", "sdpa"):
        m.backend = backend
        cache = m.new_cache(2, 10)
        outs, start = [], 0
        for n in chunks:
            outs.append(m(x[:, start : start + n], cache=cache))
            start += n
        assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cache_overflow_and_reset():
    torch.manual_seed(0)
    m = make_mha(2, True).eval()
    x = torch.randn(1, 8, 32)
    cache = m.new_cache(1, max_len=8)
    first = m(x[:, :6], cache=cache)
    with pytest.raises(ValueError, match=r"holds max_len=8 tokens; it has 6 and 3 more were requested.*larger cache"):
        m(torch.randn(1, 3, 32), cache=cache)
    assert cache.length == 6  # the failed append stored nothing
    cache.reset()
    assert cache.length == 0
    assert_close(m(x[:, :6], cache=cache), first)  # as good as new
    assert_close(m(x[:, 6:], cache=cache), m(x)[:, 6:], atol=1e-5, rtol=1e-5)


def test_cache_append_returns_views_of_the_filled_part():
    torch.manual_seed(0)
    cache = KVCache.empty(2, 3, max_len=5, head_dim=4)
    assert cache.length == 0 and cache.max_len == 5 and cache.k.shape == (2, 3, 5, 4)
    k1, v1 = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    k2, v2 = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    cache.append(k1, v1)
    k_all, v_all = cache.append(k2, v2)
    assert torch.equal(k_all, torch.cat([k1, k2], dim=2)) and torch.equal(v_all, torch.cat([v1, v2], dim=2))
    assert k_all.data_ptr() == cache.k.data_ptr()  # a view, not a copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_matches_a_real_cache(dtype):
    torch.manual_seed(0)
    m = MultiHeadAttention(64, 8, n_kv_heads=2)
    cache = m.new_cache(batch_size=3, max_len=50, dtype=dtype)
    element = torch.tensor([], dtype=dtype).element_size()
    assert cache.nbytes == kv_cache_bytes(1, 2, 8, 50, batch_size=3, bytes_per_value=element)
    assert cache.k.dtype == dtype
    # the whole model: one cache per layer
    assert 12 * cache.nbytes == kv_cache_bytes(12, 2, 8, 50, batch_size=3, bytes_per_value=element)


def test_integer_inputs_are_a_clear_error():
    q = torch.randint(0, 5, (1, 2, 4, 8))
    with pytest.raises(ValueError, match="floating point"):
        scaled_dot_product_attention(q, q, q)
