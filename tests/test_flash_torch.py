"""FlashAttention-2 in PyTorch tiles: outputs, lse and gradients equal untiled attention; causal tiles are skipped."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from llmbook.attention import attention_with_lse, causal_mask, scaled_dot_product_attention
from llmbook.kernels import flash_torch, tiling
from llmbook.kernels.flash_torch import flash_attention_torch, flash_backward_torch, flash_forward_torch
from llmbook.kernels.tiling import DIAGONAL, FULL, SKIP, tile_counts, tile_grid

F64 = {"atol": 1e-10, "rtol": 1e-10}
pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py


def test_module_doctests():
    result = doctest.testmod(tiling)
    assert result.attempted > 0 and result.failed == 0

LENGTHS = [(1, 1), (17, 17), (100, 100), (1, 17), (5, 17)]  # (T_q, T_k): ragged against blocks of 16
HEADS = [(4, 4), (8, 2), (4, 1)]  # (H, H_kv): multi-head, grouped-query 8:2, multi-query 4:1


def _qkv(B, H, H_kv, T_q, T_k, D, dtype=torch.float64):
    q = torch.randn(B, H, T_q, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H_kv, T_k, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H_kv, T_k, D, dtype=dtype, requires_grad=True)
    return q, k, v


def _sdpa(q, k, v, causal):
    """PyTorch's attention; its is_causal is top-left aligned, so pass our bottom-right mask instead."""
    mask = causal_mask(q.shape[-2], k.shape[-2]) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("H, H_kv", HEADS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T_q, T_k", LENGTHS)
def test_forward_and_gradients_match_untiled_attention(T_q, T_k, causal, H, H_kv, D):
    q, k, v = _qkv(2, H, H_kv, T_q, T_k, D)
    out, lse = flash_forward_torch(q.detach(), k.detach(), v.detach(), causal, block_q=16, block_k=16)
    want_out, want_lse = attention_with_lse(q.detach(), k.detach(), v.detach(), is_causal=causal)
    assert out.shape == (2, H, T_q, D) and lse.shape == (2, H, T_q)
    assert_close(out, want_out, **F64)
    assert_close(lse, want_lse.double(), atol=1e-5, rtol=1e-6)  # attention_with_lse rounds lse to float32

    dout = torch.randn(2, H, T_q, D, dtype=torch.float64)
    got = torch.autograd.grad(flash_attention_torch(q, k, v, causal, None, 16, 16), (q, k, v), dout)
    want = torch.autograd.grad(_sdpa(q, k, v, causal), (q, k, v), dout)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert_close(g, w, **F64, msg=lambda m, name=name: f"d{name}: {m}")


def test_float32_and_scale_and_blocks_of_every_shape():
    q, k, v = _qkv(1, 4, 2, 37, 37, 32, torch.float32)
    want = _sdpa(q, k, v, True)
    for block_q, block_k in [(1, 1), (8, 16), (16, 8), (37, 37), (128, 128)]:
        assert_close(flash_attention_torch(q, k, v, True, None, block_q, block_k), want, atol=2e-6, rtol=1e-5)
    scaled = flash_attention_torch(q, k, v, False, 0.3, 16, 16)
    assert_close(scaled, F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True), atol=2e-6, rtol=1e-5)


def test_bfloat16_is_accumulated_in_float32():
    q, k, v = (t.detach().bfloat16() for t in _qkv(2, 4, 2, 50, 50, 64, torch.float32))
    out, lse = flash_forward_torch(q, k, v, causal=True, block_q=16, block_k=16)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    want_out, want_lse = attention_with_lse(q.float(), k.float(), v.float(), is_causal=True)
    assert_close(out.float(), want_out, atol=1e-2, rtol=1.6e-2)  # one bf16 rounding of the output
    assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)  # lse never goes through 16 bits
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    flash_attention_torch(q, k, v, True, None, 16, 16).float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.bfloat16


def test_queries_that_see_no_key_output_zero():
    """T_q > T_k, causal bottom-right: the first T_q - T_k queries come before every key."""
    q, k, v = _qkv(1, 2, 1, 9, 4, 8)
    out, lse = flash_forward_torch(q.detach(), k.detach(), v.detach(), causal=True, block_q=2, block_k=2)
    assert out[:, :, :5].eq(0).all() and lse[:, :, :5].eq(float("-inf")).all() and lse[:, :, 5:].isfinite().all()
    assert_close(out, attention_with_lse(q.detach(), k.detach(), v.detach(), is_causal=True)[0], **F64)
    dout = torch.randn(1, 2, 9, 8, dtype=torch.float64)
    got = torch.autograd.grad(flash_attention_torch(q, k, v, True, None, 2, 2), (q, k, v), dout)
    want = torch.autograd.grad(scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), dout)
    for g, w in zip(got, want, strict=True):
        assert not g.isnan().any()
        assert_close(g, w, **F64)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    q, k, v = _qkv(1, 2, 1, 5, 5, 4)
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attention_torch(q, k, v, causal, None, 2, 3), (q, k, v))


def test_backward_function_directly():
    q, k, v = _qkv(1, 4, 2, 20, 20, 8)
    out, lse = flash_forward_torch(q.detach(), k.detach(), v.detach(), causal=True, block_q=8, block_k=8)
    dout = torch.randn_like(out)
    dq, dk, dv = flash_backward_torch(q.detach(), k.detach(), v.detach(), out, lse, dout, True, None, 8, 8)
    want = torch.autograd.grad(_sdpa(q, k, v, True), (q, k, v), dout)
    for g, w in zip((dq, dk, dv), want, strict=True):
        assert_close(g, w, **F64)


def test_causal_forward_visits_only_the_tiles_tile_counts_counts(monkeypatch):
    kinds = []

    def recording_tile_kind(*args):
        kinds.append(flash_torch_tile_kind(*args))
        return kinds[-1]

    flash_torch_tile_kind = flash_torch.tile_kind
    monkeypatch.setattr(flash_torch, "tile_kind", recording_tile_kind)
    q, k, v = (t.detach() for t in _qkv(1, 1, 1, 100, 100, 8, torch.float32))
    flash_forward_torch(q, k, v, causal=True, block_q=16, block_k=16)
    visited, total = tile_counts(100, 100, 16, 16, causal=True)
    assert kinds.count(FULL) + kinds.count(DIAGONAL) == visited == 28 and total == 49
    assert kinds.count(DIAGONAL) == 7  # one per query tile: only those are masked


def test_tile_counts_and_grid():
    assert tile_counts(1024, 1024, 128, 128, causal=True) == (36, 64)  # n(n+1)/2 of n² with n = 8
    assert tile_counts(1024, 1024, 128, 128, causal=False) == (64, 64)
    assert tile_counts(1, 1024, 128, 128, causal=True) == (8, 8)  # decoding: one query sees every key
    assert tile_counts(100, 100, 16, 16, causal=True) == (28, 49)  # ragged: 7 tiles a side
    grid = tile_grid(4, 4, 2, 2, causal=True)
    assert grid.tolist() == [[DIAGONAL, SKIP], [FULL, DIAGONAL]]
    assert tile_grid(2, 6, 2, 2, causal=True).tolist() == [[FULL, FULL, DIAGONAL]]  # bottom-right: 4 keys cached


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 8, 4), (2, 8, 4), (2, 8, 4)), "q of shape \\(B, H, T_q, D\\)"),
        (((1, 2, 8, 4), (1, 2, 8, 5), (1, 2, 8, 5)), "same batch and head_dim"),
        (((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 7, 4)), "same batch and head_dim"),
        (((1, 6, 8, 4), (1, 4, 8, 4), (1, 4, 8, 4)), "multiple of"),
    ],
)
def test_bad_shapes_are_one_clear_error(shapes, match):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        flash_attention_torch(q, k, v)


def test_bad_dtypes_and_blocks_are_clear_errors():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="one floating dtype"):
        flash_attention_torch(q, q.double(), q)
    with pytest.raises(ValueError, match="block sizes must be positive"):
        flash_attention_torch(q, q, q, block_q=0)
