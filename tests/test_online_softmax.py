"""Online softmax: block-by-block states merge into exactly the softmax over the whole row."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch.testing import assert_close

import llmbook.kernels.online_softmax as online_softmax_module
from llmbook.attention import attention_with_lse, softmax
from llmbook.kernels.online_softmax import SoftmaxState, finish, merge, online_softmax, partial_state

F64 = {"atol": 1e-12, "rtol": 1e-12}
NEG_INF = float("-inf")
pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py


def test_module_doctests():
    result = doctest.testmod(online_softmax_module)
    assert result.attempted > 0 and result.failed == 0


def test_merge_of_two_blocks_equals_softmax_over_the_union():
    scores = torch.randn(2, 3, 10, dtype=torch.float64) * 5  # (batch, queries, keys)
    values = torch.randn(2, 10, 4, dtype=torch.float64)  # (batch, keys, D)
    a, b = partial_state(scores[..., :4], values[:, :4]), partial_state(scores[..., 4:], values[:, 4:])
    whole = partial_state(scores, values)
    for merged in (merge(a, b), merge(b, a)):  # the order of the blocks does not matter
        assert merged.acc.shape == (2, 3, 4) and merged.m.shape == merged.l.shape == (2, 3)
        for got, want in zip(merged, whole, strict=True):
            assert_close(got, want, **F64)
    out, lse = finish(merge(a, b))
    assert_close(out, softmax(scores) @ values, **F64)
    assert_close(lse, torch.logsumexp(scores, dim=-1).float())


def test_many_ragged_blocks_match_attention_with_lse():
    q, k, v = torch.randn(2, 5, 8), torch.randn(2, 23, 8), torch.randn(2, 23, 8)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)  # (2, 5, 23)
    state = partial_state(scores[..., :7], v[:, :7])
    for start in range(7, 23, 7):  # blocks of 7, 7 and a ragged 2
        state = merge(state, partial_state(scores[..., start : start + 7], v[:, start : start + 7]))
    out, lse = finish(state)
    want_out, want_lse = attention_with_lse(q, k, v)
    assert_close(out, want_out, atol=1e-6, rtol=1e-5)
    assert_close(lse, want_lse, atol=1e-6, rtol=1e-5)


def test_docstring_example_and_huge_logits():
    values = torch.eye(3)  # value j is the one-hot e_j, so the output is the probabilities themselves
    first = partial_state(torch.tensor([[1.0, 3.0]]), values[:2])  # scores [1, 3] then [2], as in the docstring
    second = partial_state(torch.tensor([[2.0]]), values[2:])
    state = merge(first, second)
    assert state.m.item() == 3.0 and round(first.l.item(), 3) == 1.135 and round(state.l.item(), 3) == 1.503
    assert_close(finish(state)[0], torch.tensor([[0.0900, 0.6652, 0.2447]]), atol=1e-4, rtol=0)
    big = torch.tensor([[1e4, 1e4 - 1, -1e4, 1e4]])  # exp(1e4) = inf: the running max keeps every exponent <= 0
    assert_close(online_softmax(big, block=1), torch.softmax(big, dim=-1))


@pytest.mark.parametrize("block", [1, 3, 16, 37, 100])
def test_online_softmax_equals_softmax(block):
    x = torch.randn(4, 6, 37, dtype=torch.float64) * 3
    assert_close(online_softmax(x, block), torch.softmax(x, dim=-1), **F64)


def test_fully_masked_rows_give_zeros_and_minus_inf_not_nan():
    x = torch.tensor([[0.0, NEG_INF, 1.0, 2.0], [NEG_INF] * 4])  # row 1: a query allowed to see nothing
    probs = online_softmax(x, block=2)
    assert_close(probs, softmax(x))
    assert probs[1].eq(0).all()

    values = torch.randn(4, 3)
    blocks = [partial_state(x[:, i : i + 2], values[i : i + 2]) for i in (0, 2)]  # block 0 of row 1: all -inf
    out, lse = finish(merge(*blocks))
    assert not out.isnan().any() and not lse.isnan().any()
    assert_close(out[0], softmax(x[0]) @ values)
    q, k = torch.zeros(2, 1), torch.zeros(4, 1)  # zero scores, so the mask alone decides, as in x
    want_out, want_lse = attention_with_lse(q, k, values, mask=x == 0)  # row 1 masked everywhere
    assert out[1].eq(0).all() and want_out[1].eq(0).all()
    assert lse[1].item() == want_lse[1].item() == NEG_INF

    nothing = SoftmaxState(torch.full((2,), NEG_INF), torch.zeros(2), torch.zeros(2, 3))  # the state before any key
    for got, want in zip(merge(nothing, blocks[1]), blocks[1], strict=True):
        assert_close(got, want)


def test_bad_block_is_a_clear_error():
    with pytest.raises(ValueError, match="block must be a positive"):
        online_softmax(torch.randn(3), block=0)
