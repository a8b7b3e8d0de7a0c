"""posttrain.onpolicy: pairs from a model's own samples, chosen passing the task's check and rejected failing it."""

from __future__ import annotations

import pytest
import torch

from llmbook.bpe import Tokenizer
from llmbook.model import GPT
from llmbook.posttrain.onpolicy import onpolicy_pairs, onpolicy_pairs_with_stats, pick_pair
from llmbook.posttrain.rollouts import Rollout
from llmbook.posttrain.tasks import make_task_split
from llmbook.posttrain.templates import CHATML_SPECIAL_TOKENS, ENDOFTEXT
from llmbook.posttrain.vocab import add_special_tokens


def chat_tokenizer() -> Tokenizer:
    return add_special_tokens(Tokenizer({i: bytes([i]) for i in range(256)}, [], [ENDOFTEXT], name="bytes"),
                              CHATML_SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def split():
    return make_task_split(0, n_train=40, n_val=0, n_test=0)


def capitals_item(split):
    return next(i for i in split.train if i.family == "capitals")


def group(item, texts):
    return [Rollout(item, [1], [2], t, item.check(t), True) for t in texts]


def test_chosen_passes_and_rejected_fails(split):
    item = capitals_item(split)
    texts = ["Not in capitals at all.", "IT IS A TRUTH", "HALF in capitals", "", "ALL OF THEM HERE"]
    chosen, rejected = pick_pair(group(item, texts))
    assert chosen == "IT IS A TRUTH"  # the first of the passing answers
    assert rejected == "Not in capitals at all."  # the lowest reward (0.0) that is not empty
    assert item.passed(chosen) and not item.passed(rejected)


def test_no_pair_without_both_sides_or_with_identical_texts(split):
    item = capitals_item(split)
    assert pick_pair(group(item, ["IT IS A TRUTH", "ALL OF THEM"])) is None  # all pass
    assert pick_pair(group(item, ["no", "not this one"])) is None  # all fail
    assert pick_pair(group(item, ["IT IS A TRUTH", ""])) is None  # the failing one is empty
    # "IT IS A TRUTH<|im_end|>..." grades as its clean text, which passes: never paired against itself
    assert pick_pair(group(item, ["IT IS A TRUTH", "  IT IS A TRUTH  "])) is None


def test_onpolicy_pairs_are_deterministic_and_valid(split):
    torch.manual_seed(0)
    model = GPT.from_preset("llama-tiny", vocab_size=320, context_length=256, dropout=0.0).eval()
    tok, items = chat_tokenizer(), split.train[:8]
    pairs, stats = onpolicy_pairs_with_stats(model, tok, items, 3, seed=5, max_new_tokens=8)
    assert stats.prompts == 8 and stats.samples == 24 and stats.with_pairs == len(pairs)
    assert sum(n for n, _ in stats.per_family.values()) == 8
    by_prompt = {tuple(i.messages(False)): i for i in items}
    for pair in pairs:
        item = by_prompt[pair.prompt]
        assert item.passed(pair.chosen) and not item.passed(pair.rejected)
    assert onpolicy_pairs(model, tok, items, 3, seed=5, max_new_tokens=8) == pairs
    with pytest.raises(ValueError, match="n_samples must be >= 2"):
        onpolicy_pairs(model, tok, items, 1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        onpolicy_pairs(model, tok, items, 2, temperature=0.0)
