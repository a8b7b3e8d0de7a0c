"""RoPE: relative positions, both pair conventions, and Meta's and Hugging Face's formulations."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch.testing import assert_close

from llmbook import rope as rope_module
from llmbook.attention import MultiHeadAttention
from llmbook.rope import RotaryEmbedding, interleaved_to_half_permutation


def test_module_doctests():
    torch.manual_seed(0)
    result = doctest.testmod(rope_module)
    assert result.attempted > 0 and result.failed == 0


def at_positions(rope: RotaryEmbedding, x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """The same vector x (D,) placed at each of ``positions``, rotated: (len(positions), D)."""
    xs = x.expand(1, 1, len(positions), x.shape[-1])  # (B=1, H=1, T, D)
    return rope(xs, torch.tensor(positions))[0, 0]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("offset", [0, 1, 7, 100, -3, -250])
def test_scores_depend_only_on_relative_position(interleaved, offset):
    """q at position m and k at position n = m - offset: the score is the same for every m."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, max_seq_len=4096, interleaved=interleaved)
    q, k = torch.randn(16), torch.randn(16)
    ms = [m for m in [1, 2, 5, *range(0, 4096, 131), 4095] if 0 <= m - offset < 4096]  # about 30 pairs
    scores = (at_positions(rope, q, ms) * at_positions(rope, k, [m - offset for m in ms])).sum(-1)
    assert len(ms) >= 25
    assert_close(scores, scores[:1].expand_as(scores), atol=1e-5, rtol=1e-5)
    if offset == 0:  # same position: the rotations cancel
        assert_close(scores[0], q @ k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_different_offsets_give_different_scores(interleaved):
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, interleaved=interleaved)
    q, k = torch.randn(16), torch.randn(16)
    scores = (at_positions(rope, q, [10] * 6) * at_positions(rope, k, [10, 9, 8, 5, 0, 2])).sum(-1)
    assert len(set(scores.round(decimals=4).tolist())) == 6  # position is information


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotation_preserves_norms(interleaved, dtype):
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=32, max_seq_len=512, interleaved=interleaved)
    x = torch.randn(2, 3, 50, 32, dtype=dtype)
    out = rope(x, 400)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert_close(rope(x)[..., 0, :], x[..., 0, :])  # position 0 is the identity


@pytest.mark.parametrize("interleaved", [False, True])
def test_int_offset_and_explicit_positions_agree(interleaved):
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=8, max_seq_len=64, interleaved=interleaved)
    x = torch.randn(2, 3, 5, 8)  # (B, H, T, D)
    by_offset = rope(x, 10)
    assert_close(by_offset, rope(x, torch.arange(10, 15)))  # (T,)
    assert_close(by_offset, rope(x, torch.arange(10, 15).expand(2, 5)))  # (B, T)
    # per-sequence positions: each row of the batch at its own offset
    per_row = rope(x, torch.stack([torch.arange(10, 15), torch.arange(0, 5)]))
    assert_close(per_row[0], by_offset[0])
    assert_close(per_row[1], rope(x)[1])
    # rotating a chunk at its offset equals rotating the whole sequence and slicing
    long = torch.randn(1, 2, 12, 8)
    assert_close(rope(long[:, :, 7:], 7), rope(long)[:, :, 7:])


def meta_reference(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Meta's Llama ``precompute_freqs_cis`` and ``apply_rotary_emb``, for x (B, H, T, D) from position 0."""
    dim, end = x.shape[-1], x.shape[-2]
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)  # complex64, (T, D/2)
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # pairs (x[2i], x[2i+1]) as complex
    return torch.view_as_real(x_ * freqs_cis).flatten(-2).type_as(x)


def hugging_face_reference(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Hugging Face's Llama ``rotate_half`` formulation, for x (B, H, T, D) from position 0."""
    dim, end = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(end).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    return x * emb.cos() + rotate_half(x) * emb.sin()


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("head_dim", [8, 64])
def test_interleaved_matches_metas_complex_formulation(theta, head_dim):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, head_dim)
    rope = RotaryEmbedding(head_dim, max_seq_len=128, theta=theta, interleaved=True)
    assert_close(rope(x), meta_reference(x, theta), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("head_dim", [8, 64])
def test_half_split_matches_hugging_faces_rotate_half(theta, head_dim):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, head_dim)
    rope = RotaryEmbedding(head_dim, max_seq_len=128, theta=theta)
    assert_close(rope(x), hugging_face_reference(x, theta), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [2, 6, 8, 64])
def test_permutation_turns_interleaved_into_half_split(head_dim):
    torch.manual_seed(0)
    perm = interleaved_to_half_permutation(head_dim)
    assert sorted(perm.tolist()) == list(range(head_dim))
    x = torch.randn(2, 1, 9, head_dim)
    inter = RotaryEmbedding(head_dim, 32, interleaved=True)
    half = RotaryEmbedding(head_dim, 32, interleaved=False)
    # rotating then permuting equals permuting then rotating the other way
    assert_close(inter(x)[..., perm], half(x[..., perm]))


@pytest.mark.parametrize(("n_heads", "n_kv_heads"), [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_conventions_agree_after_permuting_wq_and_wk(n_heads, n_kv_heads, bias):
    """Meta's checkpoint (interleaved) in Hugging Face's model (half-split): permute each head's rows of Wq, Wk."""
    torch.manual_seed(0)
    d_model, hs = 32, 8
    meta = MultiHeadAttention(d_model, n_heads, n_kv_heads, bias=bias, rope=RotaryEmbedding(hs, 64, interleaved=True))
    hf = MultiHeadAttention(d_model, n_heads, n_kv_heads, bias=bias, rope=RotaryEmbedding(hs, 64, interleaved=False))
    perm = interleaved_to_half_permutation(hs)

    def permute_rows(w: torch.Tensor) -> torch.Tensor:  # w: ((nh + 2 nkv) * hs, ...) fused q, k, v rows
        q, k, v = w.split([n_heads * hs, n_kv_heads * hs, n_kv_heads * hs])
        q = q.unflatten(0, (n_heads, hs))[:, perm].flatten(0, 1)  # reorder the rows of each q head
        k = k.unflatten(0, (n_kv_heads, hs))[:, perm].flatten(0, 1)  # and of each k head; v is untouched
        return torch.cat([q, k, v])

    state = meta.state_dict()
    state["qkv.weight"] = permute_rows(state["qkv.weight"])
    if bias:
        state["qkv.bias"] = permute_rows(state["qkv.bias"])
    hf.load_state_dict(state)

    x = torch.randn(2, 10, d_model)
    assert_close(hf(x), meta(x), atol=1e-5, rtol=1e-5)
    unpermuted = MultiHeadAttention(d_model, n_heads, n_kv_heads, bias=bias, rope=RotaryEmbedding(hs, 64))
    unpermuted.load_state_dict(meta.state_dict())
    assert not torch.allclose(unpermuted(x), meta(x), atol=1e-3)  # without the permutation they differ


def test_frequencies_and_buffers():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=8, max_seq_len=20, theta=10000.0)
    assert_close(rope.frequencies(), torch.tensor([1.0, 0.1, 0.01, 0.001]))
    assert rope.cos.shape == rope.sin.shape == (20, 4)
    assert_close(rope.cos[3, 1], torch.cos(torch.tensor(0.3)))
    assert rope.state_dict() == {}  # tables are derived, not saved
    assert sum(p.numel() for p in rope.parameters()) == 0


def test_bfloat16_inputs_keep_their_dtype():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, max_seq_len=64)
    x = torch.randn(1, 2, 30, 16)
    out = rope(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), rope(x.bfloat16().float()), atol=0, rtol=1e-2)


def test_errors():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="head_dim must be even; got 7"):
        RotaryEmbedding(head_dim=7)
    with pytest.raises(ValueError, match="head_dim must be even; got 5"):
        interleaved_to_half_permutation(5)
    rope = RotaryEmbedding(head_dim=8, max_seq_len=16)
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"position 16 requested.*max_seq_len=16 \(positions 0..15\)"):
        rope(x, 13)
    with pytest.raises(ValueError, match=r"position 20 requested.*max_seq_len=16"):
        rope(x, torch.tensor([0, 1, 2, 20]))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        rope(x, -1)
    with pytest.raises(ValueError, match=r"positions must be \(T,\) or \(B, T\) with T=4"):
        rope(x, torch.arange(5))
    with pytest.raises(ValueError, match="built for head_dim 8"):
        rope(torch.randn(1, 2, 4, 6))
    assert rope(x, 12).shape == x.shape  # positions 12..15: the last ones allowed
