"""Decoding: filters on hand-made distributions, cache vs recomputation, padding, stop tokens, streaming."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from llmbook.generate import apply_temperature, filter_top_k, filter_top_p, generate, stream
from llmbook.model import GPT

SMALL = ["gpt-tiny", "llama-tiny"]  # learned positions and RoPE
NEG = float("-inf")


pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py


def model_for(name: str) -> GPT:
    """A tiny random model with larger weights, so that its logits are not nearly uniform (no argmax near-ties)."""
    torch.manual_seed(1)
    model = GPT.from_preset(name)
    with torch.no_grad():
        model.norm_f.weight.mul_(20)
    return model


def kept(logits):
    return (logits != NEG).tolist()


def test_filter_top_p_hand_made():
    logits = torch.tensor([0.5, 0.3, 0.1, 0.1]).log()
    assert kept(filter_top_p(logits, 0.75)) == [True, True, False, False]
    assert kept(filter_top_p(logits, 0.5)) == [True, False, False, False]
    assert kept(filter_top_p(logits, 0.85)) == [True, True, True, False]  # the tie is broken by token id
    assert kept(filter_top_p(logits, 1.0)) == [True] * 4
    assert kept(filter_top_p(logits, 1e-9)) == [True, False, False, False]  # the top token always stays
    assert_close(filter_top_p(logits, 0.75)[:2], logits[:2])  # kept logits are unchanged
    shuffled = torch.tensor([0.1, 0.3, 0.1, 0.5]).log()  # order in the vocabulary does not matter
    assert kept(filter_top_p(shuffled, 0.75)) == [False, True, False, True]
    with pytest.raises(ValueError):
        filter_top_p(logits, 0.0)


def test_filter_top_p_batch_dims():
    probs = torch.tensor([[[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]], [[0.1, 0.1, 0.1, 0.7], [1.0, 0, 0, 0]]])
    out = filter_top_p(probs.log(), 0.6)  # (2, 2, 4)
    assert out.shape == (2, 2, 4)
    assert kept(out) == [
        [[True, True, False, False], [True, True, True, False]],
        [[False, False, False, True], [True, False, False, False]],
    ]


def test_filter_top_k_hand_made():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [4.0, 3.0, 2.0, 1.0]])
    assert kept(filter_top_k(logits, 1)) == [[False, True, False, False], [True, False, False, False]]  # tie: low id
    assert kept(filter_top_k(logits, 2)) == [[False, True, True, False], [True, True, False, False]]
    assert kept(filter_top_k(logits, 3)) == [[False, True, True, True], [True, True, True, False]]
    assert torch.equal(filter_top_k(logits, 10), logits)
    assert filter_top_k(torch.randn(2, 3, 5, 50), 7).isfinite().sum(-1).eq(7).all()
    with pytest.raises(ValueError):
        filter_top_k(logits, 0)


def test_temperature():
    logits = torch.tensor([2.0, 0.0])
    assert_close(torch.softmax(apply_temperature(logits, 2.0), -1), torch.tensor([math.e, 1]) / (math.e + 1))
    with pytest.raises(ValueError):
        apply_temperature(logits, 0.0)


@pytest.mark.parametrize("name", SMALL)
def test_greedy_same_with_and_without_cache(name):
    model = model_for(name)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    with_cache = generate(model, prompts, 12, temperature=0)
    without = generate(model, prompts, 12, temperature=0, use_cache=False)
    assert with_cache == without
    assert [len(r) for r in with_cache] == [12, 12]
    assert len(set(with_cache[0])) > 1  # not a degenerate constant continuation


@pytest.mark.parametrize("name", SMALL)
def test_greedy_is_argmax_of_the_model(name):
    model = model_for(name).eval()
    prompt = [7, 8, 9]
    tokens = generate(model, [prompt], 5, temperature=0)[0]
    seq = list(prompt)
    for _ in range(5):
        seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert tokens == seq[3:]


def test_temperature_zero_equals_greedy_and_tiny_top_p():
    model = model_for("gpt-tiny")
    greedy = generate(model, [[1, 2, 3]], 10, temperature=0)
    assert generate(model, [[1, 2, 3]], 10, top_p=1e-9, generator=torch.Generator().manual_seed(0)) == greedy
    assert generate(model, [[1, 2, 3]], 10, top_k=1, generator=torch.Generator().manual_seed(0)) == greedy


@pytest.mark.parametrize("use_cache", [True, False])
def test_seeded_sampling_is_reproducible(use_cache):
    model = model_for("llama-tiny")
    runs = [
        generate(model, [[5, 6], [7]], 15, temperature=1.5, top_k=50, top_p=0.95, use_cache=use_cache,
                 generator=torch.Generator().manual_seed(seed))
        for seed in (1, 1, 2)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stop_tokens_end_generation():
    model = model_for("gpt-tiny")
    full = generate(model, [[1, 2, 3], [4, 5]], 10, temperature=0)
    stop = full[0][3]  # the fourth token of row 0
    out = generate(model, [[1, 2, 3], [4, 5]], 10, temperature=0, stop_tokens=[stop])
    first = full[0].index(stop)
    assert out[0] == full[0][: first + 1]  # up to and including the stop token
    row1_stop = full[1].index(stop) + 1 if stop in full[1] else len(full[1])
    assert out[1] == full[1][:row1_stop]
    assert list(stream(model, [1, 2, 3], 10, temperature=0, stop_tokens=[stop])) == out[0]


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_equals_each_prompt_alone(name, use_cache):
    model = model_for(name)
    prompts = [[11, 12, 13, 14, 15, 16, 17], [21, 22], [31, 32, 33, 34]]
    batched = generate(model, prompts, 8, temperature=0, use_cache=use_cache, pad_id=0)
    alone = [generate(model, [p], 8, temperature=0, use_cache=use_cache)[0] for p in prompts]
    assert batched == alone
    assert generate(model, prompts, 8, temperature=0, pad_id=99) == alone  # the pad id does not matter


@pytest.mark.parametrize("name", SMALL)
def test_stream_yields_the_same_tokens(name):
    model = model_for(name)
    assert list(stream(model, [4, 2], 9, temperature=0)) == generate(model, [[4, 2]], 9, temperature=0)[0]
    streamed = list(stream(model, [4, 2], 9, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(3)))
    sampled = generate(model, [[4, 2]], 9, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(3))[0]
    assert streamed == sampled


def test_model_mode_restored_and_no_grad():
    model = model_for("gpt-tiny")
    model.train()
    generate(model, [[1, 2]], 3)
    assert model.training
    model.eval()
    generate(model, [[1, 2]], 3)
    assert not model.training
    model.train()
    it = stream(model, [1, 2], 3)
    next(it)
    assert not model.training  # eval while streaming ...
    assert torch.is_grad_enabled()  # ... but the caller's grad mode is untouched between tokens
    list(it)
    assert model.training


def test_inputs_and_errors():
    model = model_for("gpt-tiny")  # context_length 64
    assert generate(model, torch.tensor([[1, 2, 3]]), 4, temperature=0) == generate(model, [[1, 2, 3]], 4,
                                                                                      temperature=0)
    assert generate(model, torch.tensor([1, 2, 3]), 4, temperature=0) == generate(model, [[1, 2, 3]], 4,
                                                                                    temperature=0)
    assert generate(model, [[1, 2]], 0) == [[]]
    assert len(generate(model, [[1] * 60], 4, temperature=0)[0]) == 4  # exactly fills the context
    with pytest.raises(ValueError, match=r"61 tokens.*context_length=64"):
        generate(model, [[1] * 61], 4)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], 4)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], 4, temperature=-1)


def test_vocab_size_masks_the_padding_ids():
    """A model wider than its tokenizer (padded to 64): ids >= vocab_size are never chosen, however likely."""
    model = model_for("gpt-tiny")  # 256 outputs; pretend the tokenizer has 200 ids
    padding = torch.arange(200, model.cfg.vocab_size)
    model.lm_head.register_forward_hook(lambda module, inputs, out: out.index_fill(-1, padding, 50.0))
    prompt = [[1, 2, 3]]
    assert min(generate(model, prompt, 8, temperature=0)[0]) >= 200  # unmasked: only padding
    for kw in ({"temperature": 0}, {"temperature": 1.0}, {"top_k": 5}, {"top_p": 0.9}):
        gen = torch.Generator().manual_seed(0)
        assert max(generate(model, prompt, 8, generator=gen, vocab_size=200, **kw)[0]) < 200, kw
    assert max(stream(model, prompt[0], 8, vocab_size=200)) < 200
    with pytest.raises(ValueError, match="vocab_size must be in 1..256"):
        generate(model, prompt, 2, vocab_size=257)
