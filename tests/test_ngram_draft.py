"""The n-gram draft: its counts are the most frequent followers, and speculative decoding with it is still exact."""

import collections

import numpy as np
import pytest
import torch

from llmbook.generate import generate
from llmbook.inference import speculative
from llmbook.inference.ngram_draft import NgramDraft, most_frequent_next
from llmbook.inference.speculative import measure_speedup, speculative_generate
from llmbook.model import GPT, ModelConfig


@pytest.fixture(autouse=True)
def _one_thread(seed_and_one_thread):
    """Tensors this small run ~10x slower when two threads contend for 2 cores (conftest.py)."""


def _brute_force(tokens: list[int], n: int) -> dict[tuple[int, ...], int]:
    followers = collections.defaultdict(collections.Counter)
    for i in range(len(tokens) - n):
        followers[tuple(tokens[i : i + n])][tokens[i + n]] += 1
    # the highest count; on a tie the smallest id
    return {ctx: min(c, key=lambda t: (-c[t], t)) for ctx, c in followers.items()}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_counts_equal_a_python_counter(n):
    rng = np.random.default_rng(n)
    tokens = rng.integers(0, 7, size=2000).tolist()  # a small vocabulary: many repeated contexts and ties
    assert most_frequent_next(np.array(tokens), n) == _brute_force(tokens, n)


def test_lookup_prefers_the_text_so_far_then_the_training_counts():
    draft = NgramDraft.fit([1, 2, 3, 1, 2, 3, 1, 2, 4])  # in training, 1 2 -> 3 (twice) and 2 -> 3
    state = draft.start([9, 1, 2, 5, 9, 1])
    assert state.propose(1) == [2]  # "9 1" occurred before, followed by 2
    assert state.propose(3) == [2, 5, 9]  # and then the text so far: 1 2 -> 5, 2 5 -> 9
    no_lookup = NgramDraft.fit([1, 2, 3, 1, 2, 3, 1, 2, 4], lookup=False).start([9, 1, 2, 5, 9, 1])
    assert no_lookup.propose(2) == [2, 3]  # training only: 1 -> 2, then 1 2 -> 3
    state.extend([2, 7])
    assert state.tokens[-2:] == [2, 7] and state.propose(1) == [7]  # an unseen context repeats the last token


@pytest.fixture(scope="module")
def target_and_draft():
    torch.manual_seed(0)
    target = GPT(ModelConfig(vocab_size=64, context_length=64, d_model=32, n_layers=2, n_heads=2)).eval()
    # the draft counts text the target itself wrote, so it agrees with it part of the time
    with torch.no_grad():
        text = generate(target, [[i] for i in range(16)], 40, temperature=1.0)
    return target, NgramDraft.fit(np.concatenate([np.array(t) for t in text]))


PROMPTS = [[1], [5, 6, 7], list(range(10, 30)), [20, 3, 3, 3, 3, 3]]


def test_greedy_equals_target_greedy(target_and_draft):
    target, draft = target_and_draft
    accepted = 0
    for prompt in PROMPTS:
        ref = generate(target, [prompt], 24, temperature=0.0)[0]
        for k in range(1, 9):
            res = speculative_generate(target, draft, prompt, 24, k=k)
            assert res.tokens == ref, (k, prompt)
            accepted += res.accepted
    assert accepted > 0  # some proposals were kept, so the accepting path ran too


def test_sampling_follows_the_target(target_and_draft):
    """One-hot proposals: the first new token's frequencies match the target's p (chi-square over 2,000 draws)."""
    from scipy.stats import chisquare

    target, draft = target_and_draft
    prompt = [5, 6, 7]
    with torch.no_grad():
        p = speculative._probs(target(torch.tensor([prompt]))[0][0, -1].double(), 1.0, 8, None, None)
    g = torch.Generator().manual_seed(0)
    counts = np.zeros(64)
    for _ in range(2000):
        res = speculative_generate(target, draft, prompt, 2, k=1, temperature=1.0, top_k=8, generator=g)
        counts[res.tokens[0]] += 1
    p = p.double().numpy()  # _probs works in float32; the chi-square wants sums that agree to 1e-8
    support = p > 0
    assert counts[~support].sum() == 0  # never a token top-k removed, even when the draft proposes one
    expected = p[support] / p[support].sum() * counts.sum()
    assert chisquare(counts[support], expected).pvalue > 1e-3


def test_bad_input(target_and_draft):
    target, _ = target_and_draft
    with pytest.raises(ValueError, match="target's tokenizer"):
        speculative_generate(target, NgramDraft.fit([1, 2, 100, 3]), [1], 5)
    with pytest.raises(ValueError, match="more than 3 training tokens"):
        NgramDraft.fit([1, 2, 3])
    with pytest.raises(ValueError, match="at least 1"):
        most_frequent_next(np.array([1, 2, 3]), 0)


def test_measure_speedup_counts_an_ngram_draft(target_and_draft):
    target, draft = target_and_draft
    rows = measure_speedup(target, draft, [[5, 6, 7], [1]], ks=[1, 3], max_new_tokens=16)
    assert [r["k"] for r in rows] == [1, 3] and all(r["identical"] for r in rows)
    assert 0 < rows[0]["cost_ratio"] < 0.5  # lookups are much cheaper than even this tiny model's step
