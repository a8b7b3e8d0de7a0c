"""posttrain.best_of_n: n seeded samples per prompt, the reward model's argmax (ties: the first), bad input, the KL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llmbook.bpe import Tokenizer
from llmbook.model import GPT
from llmbook.posttrain import best_of_n as bon
from llmbook.posttrain.measure import generate_responses
from llmbook.posttrain.pairs import PreferencePair, tokenize_pair
from llmbook.posttrain.reward_model import RewardModel, pair_rewards
from llmbook.posttrain.templates import CHATML, CHATML_SPECIAL_TOKENS, ENDOFTEXT, Message
from llmbook.posttrain.vocab import add_special_tokens

pytestmark = pytest.mark.usefixtures("seed_and_one_thread")

CONVS = [[Message("user", "Name a colour.")], [Message("user", "Say hi.")], [Message("user", "Count.")]]


def chat_tokenizer() -> Tokenizer:
    return add_special_tokens(Tokenizer({i: bytes([i]) for i in range(256)}, [], [ENDOFTEXT], name="bytes"),
                              CHATML_SPECIAL_TOKENS)


def tiny_gpt(seed: int = 0, vocab_size: int = 320) -> GPT:
    torch.manual_seed(seed)
    return GPT.from_preset("llama-tiny", vocab_size=vocab_size, context_length=128, dropout=0.0).eval()


@pytest.fixture
def setup():
    tok = chat_tokenizer()
    return tiny_gpt(0), tok, RewardModel(tiny_gpt(1)).eval()


def test_best_of_n_returns_the_argmax_of_a_scripted_reward(setup, monkeypatch):
    policy, tok, reward_model = setup
    seen = {}

    def scripted(reward_model, tokenizer, conversations, replies, template="chatml", batch_size=32):
        seen["replies"] = list(replies)
        return torch.tensor([float(len(r) % 5) for r in replies])  # many ties: the first maximum must win

    monkeypatch.setattr(bon, "score_replies", scripted)
    result = bon.sample_and_score(policy, tok, reward_model, CONVS, n=6, max_new_tokens=12, seed=3)
    assert len(result.samples) == 3 and all(len(s) == 6 for s in result.samples)
    assert result.rewards.shape == (3, 6)
    assert [s for row in result.samples for s in row] == seen["replies"]  # prompt p's samples are rows p*n..
    for p, row in enumerate(result.samples):
        scores = [len(r) % 5 for r in row]
        first_best = scores.index(max(scores))
        assert result.best_index[p] == first_best and result.best[p] == row[first_best]
    assert bon.best_of_n(policy, tok, reward_model, CONVS, n=6, max_new_tokens=12, seed=3) == result.best


def test_samples_are_seeded_and_n1_is_plain_sampling(setup):
    policy, tok, reward_model = setup
    a = bon.sample_and_score(policy, tok, reward_model, CONVS, n=3, max_new_tokens=10, seed=7)
    b = bon.sample_and_score(policy, tok, reward_model, CONVS, n=3, max_new_tokens=10, seed=7)
    assert a.samples == b.samples and torch.equal(a.rewards, b.rewards)
    assert len({s for row in a.samples for s in row}) > 3  # temperature 1: the samples differ
    # n = 1 is the policy's own sampling, as measure.generate_responses draws it with the same seed
    one = bon.sample_and_score(policy, tok, reward_model, CONVS, n=1, max_new_tokens=10, seed=7, batch_size=32)
    plain = generate_responses(policy, tok, CONVS, "chatml", max_new_tokens=10, batch_size=32, temperature=1.0,
                               seed=7)
    assert [row[0] for row in one.samples] == [text for text, _ in plain]
    assert [row[0] for row in one.stopped] == [stopped for _, stopped in plain]


def test_replies_are_scored_as_the_reward_model_was_trained(setup):
    policy, tok, reward_model = setup
    replies = ["blue", "hi there", "one two"]
    got = bon.score_replies(reward_model, tok, CONVS, replies)
    pairs = [tokenize_pair(tok, PreferencePair(tuple(c), r, "other"), CHATML, 128)
             for c, r in zip(CONVS, replies, strict=True)]
    want, _ = pair_rewards(reward_model, pairs, pad_id=0)
    assert torch.allclose(got, want, atol=1e-5)
    result = bon.sample_and_score(policy, tok, reward_model, CONVS, n=2, max_new_tokens=8, seed=1)
    flat = [s for row in result.samples for s in row]
    again = bon.score_replies(reward_model, tok, [c for c in CONVS for _ in range(2)], flat)
    assert torch.allclose(result.rewards.flatten(), again, atol=1e-5)


def test_bad_input_is_one_clear_line(setup):
    policy, tok, reward_model = setup
    with pytest.raises(ValueError, match="n must be >= 1"):
        bon.best_of_n(policy, tok, reward_model, CONVS, n=0)
    with pytest.raises(ValueError, match="no conversations"):
        bon.best_of_n(policy, tok, reward_model, [], n=2)
    other = RewardModel(tiny_gpt(2, vocab_size=512))
    with pytest.raises(ValueError, match="vocabulary"):
        bon.best_of_n(policy, tok, other, CONVS, n=2)
    with pytest.raises(ValueError, match="does not fit"):
        bon.best_of_n(policy, tok, reward_model, CONVS, n=2, max_new_tokens=120)
    with pytest.raises(ValueError, match="one reply per conversation"):
        bon.score_replies(reward_model, tok, CONVS, ["a"])
    with pytest.raises(ValueError, match="n must be >= 1"):
        bon.best_of_n_kl(0)


def test_kl_formula_matches_the_exact_kl_of_best_of_n_over_many_distinct_answers():
    """π uniform over M answers with distinct rewards: best-of-n picks answer i (ranked) w.p. ((i+1)/M)^n - (i/M)^n."""
    M = 200_000
    i = np.arange(M, dtype=np.float64)
    for n in (1, 2, 4, 8, 64):
        q = ((i + 1) / M) ** n - (i / M) ** n
        kl = float(np.sum(q[q > 0] * np.log(q[q > 0] * M)))
        assert kl == pytest.approx(bon.best_of_n_kl(n), abs=1e-3)
    assert bon.best_of_n_kl(1) == 0.0 and bon.best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    # two equally likely answers: the true KL stays under log 2 however large n (Beirami et al. 2024)
    n = 8
    q = np.array([0.5 ** n, 1 - 0.5 ** n])
    assert float(np.sum(q * np.log(q / 0.5))) < math.log(2) < bon.best_of_n_kl(n)
