"""posttrain.rollouts: G samples per prompt with their ids and rewards, and a batch whose loss covers only them."""

from __future__ import annotations

import pytest
import torch

from llmbook.bpe import Tokenizer
from llmbook.model import GPT
from llmbook.posttrain.logprobs import token_logprobs
from llmbook.posttrain.masking import IGNORE_INDEX
from llmbook.posttrain.rollouts import sample_groups
from llmbook.posttrain.tasks import make_task_split
from llmbook.posttrain.templates import CHATML_SPECIAL_TOKENS, ENDOFTEXT
from llmbook.posttrain.vocab import add_special_tokens


def chat_tokenizer() -> Tokenizer:
    return add_special_tokens(Tokenizer({i: bytes([i]) for i in range(256)}, [], [ENDOFTEXT], name="bytes"),
                              CHATML_SPECIAL_TOKENS)


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT.from_preset("llama-tiny", vocab_size=320, context_length=256, dropout=0.0).eval()


@pytest.fixture(scope="module")
def items():
    split = make_task_split(0, n_train=8, n_val=0, n_test=0)
    return split.train[:3]


def test_groups_hold_ids_texts_and_rewards(items):
    tok, model = chat_tokenizer(), tiny_model()
    gen = torch.Generator().manual_seed(0)
    batch = sample_groups(model, tok, items, 4, "chatml", 1.0, 12, gen, batch_size=5)
    assert len(batch) == 12 and batch.n_prompts == 3 and batch.rewards.shape == batch.passed.shape == (3, 4)
    assert batch.items == list(items)
    stop = tok.special_tokens["<|im_end|>"]
    for k, r in enumerate(batch.rollouts):
        assert r.item is items[k // 4]
        assert 1 <= len(r.completion_ids) <= 12
        assert r.stopped == (r.completion_ids[-1] == stop)
        assert r.text == tok.decode(r.completion_ids[:-1] if r.stopped else r.completion_ids)
        assert r.reward == r.item.check(r.text) and 0.0 <= r.reward <= 1.0
    again = sample_groups(model, tok, items, 4, "chatml", 1.0, 12, torch.Generator().manual_seed(0), batch_size=5)
    assert [r.completion_ids for r in again.rollouts] == [r.completion_ids for r in batch.rollouts]  # seeded


def test_batch_mask_covers_exactly_the_completion_tokens(items):
    tok, model = chat_tokenizer(), tiny_model()
    batch = sample_groups(model, tok, items, 2, "chatml", 1.0, 10, torch.Generator().manual_seed(1))
    x, y, mask, positions = batch.to_batch(pad_id=tok.special_tokens[ENDOFTEXT])
    for row, r in enumerate(batch.rollouts):
        n_p, n_c = len(r.prompt_ids), len(r.completion_ids)
        assert x[row, :n_p + n_c].tolist() == r.prompt_ids + r.completion_ids
        assert mask[row].sum() == n_p + n_c
        trained = (y[row] != IGNORE_INDEX).nonzero().squeeze(-1).tolist()
        assert trained == list(range(n_p - 1, n_p + n_c - 1))  # the position before each sampled token
        assert y[row, trained].tolist() == r.completion_ids
    with torch.no_grad():
        logp = token_logprobs(model(x, positions=positions, mask=mask)[0], y)
    assert ((logp != 0) <= (y != IGNORE_INDEX)).all() and (logp <= 0).all()


def test_bad_arguments_are_clear(items):
    tok, model = chat_tokenizer(), tiny_model()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_groups(model, tok, items, 2, temperature=0.0)
    with pytest.raises(ValueError, match="group_size"):
        sample_groups(model, tok, items, 0)
    with pytest.raises(ValueError, match="does not fit the context"):
        sample_groups(model, tok, items, 2, max_new_tokens=250)
