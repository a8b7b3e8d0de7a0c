"""Static batching gives one-at-a-time outputs and counts its padding and idle rows exactly."""

from __future__ import annotations

import pytest
import torch

from llmbook.generate import generate
from llmbook.inference.static_batching import static_generate
from llmbook.model import GPT, ModelConfig


def _model(name: str) -> GPT:
    torch.manual_seed(0)
    # float64: one-at-a-time and batched sums differ only in rounding, far below any gap between two logits
    model = GPT(ModelConfig.preset(name)).double().eval()
    with torch.no_grad():  # at its init scale a tied GPT-2 only repeats its input token: make the layers matter
        for n, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in n:
                p.mul_(10)
    return model


@pytest.mark.parametrize("name", ["llama-tiny", "gpt-tiny"])
def test_static_batches_equal_one_at_a_time(name):
    model = _model(name)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (int(t),), generator=g).tolist() for t in torch.randint(1, 10, (7,), generator=g)]
    wanted = torch.randint(1, 12, (7,), generator=g).tolist()
    result = static_generate(model, prompts, wanted, batch_size=3)
    for prompt, n, tokens in zip(prompts, wanted, result.tokens, strict=True):
        assert tokens == generate(model, [prompt], n, temperature=0)[0]
    assert all(0 < f <= t for f, t in zip(result.first_token_times, result.finish_times, strict=True))
    assert result.steps == sum(max(wanted[b : b + 3]) for b in range(0, 7, 3))


def test_stop_tokens_and_vocab_size():
    model = _model("gpt-tiny")
    prompts = [[1, 2, 3], [4], [5, 6]]
    free = generate(model, [prompts[0]], 12, temperature=0, vocab_size=100)[0]
    k = next(k for k in range(2, 12) if free[k] not in free[:k])  # a token first produced at step k
    stop = free[k]
    result = static_generate(model, prompts, 12, batch_size=2, stop_tokens=[stop], vocab_size=100)
    for prompt, tokens in zip(prompts, result.tokens, strict=True):
        assert tokens == generate(model, [prompt], 12, temperature=0, stop_tokens=[stop], vocab_size=100)[0]
    assert result.tokens[0][-1] == stop and len(result.tokens[0]) == k + 1


def test_waste_is_counted_by_hand():
    # one batch: prompts of 3 and 1 tokens (2 pad slots), wanting 1 and 4 tokens: the batch runs 4 steps and
    # the first row idles in the last 3
    result = static_generate(_model("llama-tiny"), [[1, 2, 3], [4]], [1, 4], batch_size=2)
    assert [len(t) for t in result.tokens] == [1, 4]
    assert (result.padding_slots, result.idle_slots, result.steps) == (2, 3, 4)
    assert result.wasted_slots == 5 and result.useful_slots == 4 + 5
    assert result.finish_times[0] < result.finish_times[1]
    # batch size 1: nothing wasted
    alone = static_generate(_model("llama-tiny"), [[1, 2, 3], [4]], [1, 4], batch_size=1)
    assert alone.wasted_slots == 0 and alone.tokens == result.tokens


def test_bad_input():
    model = _model("gpt-tiny")
    with pytest.raises(ValueError, match="no prompts"):
        static_generate(model, [], 3, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        static_generate(model, [[1]], 3, batch_size=0)
    with pytest.raises(ValueError, match="one per prompt"):
        static_generate(model, [[1], [2]], [3], batch_size=2)
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        static_generate(model, [[1], []], 3, batch_size=2)
    with pytest.raises(ValueError, match="more than the model's context_length=64"):
        static_generate(model, [[1] * 60], 10, batch_size=2)
