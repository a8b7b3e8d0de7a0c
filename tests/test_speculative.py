"""Speculative decoding: the target's greedy tokens exactly, and the target's distribution when sampling."""

import copy

import pytest
import torch
from scipy.stats import chisquare

from llmbook.generate import generate
from llmbook.inference import speculative
from llmbook.inference.speculative import (
    SpecResult,
    accept_or_resample,
    expected_speedup,
    expected_tokens_per_round,
    measure_speedup,
    output_distribution,
    residual_distribution,
    speculative_generate,
)
from llmbook.model import GPT, ModelConfig


@pytest.fixture(autouse=True)
def _one_thread(seed_and_one_thread):
    """Tensors this small run ~10x slower when two threads contend for 2 cores (conftest.py)."""


def _model(seed: int, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**kw)).eval()


def _noisy_copy(model: GPT, scale: float, seed: int) -> GPT:
    """A draft that agrees with the target on some tokens and not others."""
    torch.manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * scale)
    return other


@pytest.fixture(scope="module")
def pairs():
    """Target/draft pairs sharing a vocabulary of 256: GPT-2 style and Llama style, drafts of every quality."""
    gpt = _model(0, vocab_size=256, context_length=64, d_model=64, n_layers=2, n_heads=4)
    llama = GPT(ModelConfig.preset("llama-tiny", context_length=64)).eval()
    small = _model(1, vocab_size=256, context_length=64, d_model=32, n_layers=1, n_heads=2)
    return [
        (gpt, small),  # unrelated models (that both like to repeat the last token)
        (gpt, gpt),  # the target itself: every proposal accepted, the bonus token every round
        (gpt, _noisy_copy(gpt, 0.01, 2)),  # some accepted, some not
        (llama, _noisy_copy(llama, 0.003, 3)),  # RoPE: the rolled-back cache must re-rotate from the right offset
        (llama, _noisy_copy(llama, 0.03, 4)),  # almost every proposal rejected
    ]


PROMPTS = [[1], [5, 6, 7], list(range(10, 30)), [200, 3, 3, 3, 3, 3]]


def test_greedy_equals_target_greedy(pairs):
    for target, draft in pairs:
        for prompt in PROMPTS:
            ref = generate(target, [prompt], 24, temperature=0.0)[0]
            for k in range(1, 9):
                res = speculative_generate(target, draft, prompt, 24, k=k)
                assert res.tokens == ref, (k, prompt)
                assert res.target_calls == len(res.accepted_per_round) and sum(res.accepted_per_round) == res.accepted
                assert res.draft_calls == res.proposed
                assert len(res.tokens) == res.accepted + res.target_calls  # each round: its accepted tokens + one


def test_greedy_counts_for_perfect_and_useless_drafts(pairs):
    gpt, same = pairs[1]
    res = speculative_generate(gpt, same, [1, 2, 3], 30, k=4)
    assert res.acceptance_rate == 1.0 and res.target_calls == 6 and res.accepted_per_round == [4] * 6
    assert res.tokens_per_target_call == 5.0
    llama, bad = pairs[4]
    res = speculative_generate(llama, bad, [1, 2, 3], 30, k=4)
    assert res.acceptance_rate < 0.2 and res.target_calls >= 20 and res.draft_calls == res.proposed


def test_greedy_with_stop_tokens_and_vocab_mask(pairs):
    target, draft = pairs[2]
    full = generate(target, [[5, 6, 7]], 40, temperature=0.0)[0]
    stop = full[17]  # a token the target writes: generation ends there, in the middle of a round
    for k in (1, 3, 8):
        ref = generate(target, [[5, 6, 7]], 40, temperature=0.0, stop_tokens=[stop])[0]
        res = speculative_generate(target, draft, [5, 6, 7], 40, k=k, stop_tokens=[stop])
        assert res.tokens == ref and res.tokens[-1] == stop and stop not in res.tokens[:-1]
        # ids >= vocab_size never come out, as with generate(vocab_size=...)
        ref = generate(target, [[5, 6, 7]], 40, temperature=0.0, vocab_size=100)[0]
        res = speculative_generate(target, draft, [5, 6, 7], 40, k=k, vocab_size=100)
        assert res.tokens == ref and max(res.tokens) < 100


def test_fills_the_context_exactly(pairs):
    target, draft = pairs[1]  # all accepted: the last round must shrink k to stay within max_new_tokens
    prompt = list(range(1, 11))
    for k in (3, 7, 8):
        res = speculative_generate(target, draft, prompt, 64 - len(prompt), k=k)
        assert res.tokens == generate(target, [prompt], 54, temperature=0.0)[0] and len(res.tokens) == 54


# --- The rule, exactly ------------------------------------------------------------------------------------------------
def test_one_position_outputs_the_target_distribution_exactly():
    """P(x) = accepted(x) + resampled(x) = min(p, q) + max(0, p - q) = p, for many random p and q."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        p = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64) * 2, dim=-1)
        q = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64) * 2, dim=-1)
        accepted, resampled = output_distribution(p, q)
        torch.testing.assert_close(accepted, torch.minimum(p, q))
        torch.testing.assert_close(accepted + resampled, p, rtol=0, atol=1e-12)
    # a draft with zeros (top-k) where the target has mass: the residual makes them up
    p, q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    accepted, resampled = output_distribution(p, q)
    torch.testing.assert_close(accepted + resampled, p)
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(residual_distribution(p, p), p)  # never rejected: any answer; p is safe


def test_accept_or_resample_samples_p():
    """One position, sampled: the tokens accept_or_resample returns follow p, not q."""
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    g = torch.Generator().manual_seed(1)
    n = 8000
    drafts = torch.multinomial(q[0], n, replacement=True, generator=g)
    first = torch.tensor([int(accept_or_resample(p, q, drafts[i : i + 1], g)[0][0]) for i in range(n)])
    counts = torch.bincount(first, minlength=4)
    assert _chi2_p(counts, p[0]) > 1e-3
    assert _chi2_p(counts, q[0]) < 1e-6


def test_accept_or_resample_edges():
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    tokens, j = accept_or_resample(p, torch.tensor([[0.5, 0.5]]), torch.tensor([1]))
    assert j == 1 and tokens.tolist() == [1, 0]  # p/q = 2 >= 1: kept; the bonus from p[1]
    tokens, j = accept_or_resample(p, torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert j == 0 and tokens.tolist() == [1]  # p/q = 0: rejected; the residual is all on token 1
    with pytest.raises(ValueError, match="need p"):
        accept_or_resample(p, torch.tensor([[0.5, 0.5]]), torch.tensor([0, 1]))


# --- The sampler draws from the target's distribution -----------------------------------------------------------------
V = 5


@pytest.fixture(scope="module")
def small_vocab():
    """A target and a draft over 5 tokens whose distributions differ clearly (larger logits than at init)."""
    target = _model(20, vocab_size=V, context_length=16, d_model=16, n_layers=1, n_heads=2)
    draft = _model(21, vocab_size=V, context_length=16, d_model=16, n_layers=1, n_heads=2)
    with torch.no_grad():
        target.lm_head.weight.mul_(6)
        draft.lm_head.weight.mul_(6)
    return target, draft


def _exact_two_tokens(target: GPT, prompt: list[int], temperature: float, top_k: int | None) -> torch.Tensor:
    """P(first two new tokens = (a, b)) by enumeration: p(a | prompt) · p(b | prompt, a), ``(V·V,)``."""
    with torch.no_grad():
        logits, _ = target(torch.tensor([prompt + [a] for a in range(V)]))  # (V, T+1, V)
    first = speculative._probs(logits[0, -2].double(), temperature, top_k, None, None)  # (V,)
    second = speculative._probs(logits[:, -1].double(), temperature, top_k, None, None)  # (V, V)
    return (first[:, None] * second).flatten()


def _sampled_two_tokens(target, draft, prompt, n, temperature, top_k, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V * V, dtype=torch.float64)
    for _ in range(n):
        # 3 new tokens: the first round proposes 2 (k=2), so rejection at 1, at 2, and the bonus all occur
        res = speculative_generate(target, draft, prompt, 3, k=2, temperature=temperature, top_k=top_k, generator=g)
        counts[res.tokens[0] * V + res.tokens[1]] += 1
    return counts


def _chi2_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    counts, probs = counts.double(), probs.double()
    keep = probs * counts.sum() >= 5  # chi-square wants expected counts >= 5: pool the rare cells into one
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([probs[keep], probs[~keep].sum()[None]]) * counts.sum()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    obs, exp = obs.double().numpy(), exp.double().numpy()
    return float(chisquare(obs, exp / exp.sum() * obs.sum()).pvalue)


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 3)])
def test_sampling_follows_the_target_and_a_wrong_rule_is_caught(small_vocab, monkeypatch, temperature, top_k):
    target, draft = small_vocab
    prompt = [1, 3]
    exact = _exact_two_tokens(target, prompt, temperature, top_k)
    draft_exact = _exact_two_tokens(draft, prompt, temperature, top_k)
    assert (exact - draft_exact).abs().sum() > 0.5  # the draft alone would be easy to tell apart
    n = 1000
    counts = _sampled_two_tokens(target, draft, prompt, n, temperature, top_k, seed=0)
    assert _chi2_p(counts, exact) > 1e-3

    def accept_always(p, q, draft_tokens, generator=None):  # the wrong rule: trust the draft, add the bonus
        j = draft_tokens.shape[0]
        return torch.cat([draft_tokens, torch.multinomial(p[j], 1, generator=generator)]), j

    monkeypatch.setattr(speculative, "accept_or_resample", accept_always)
    wrong = _sampled_two_tokens(target, draft, prompt, 200, temperature, top_k, seed=0)
    assert _chi2_p(wrong, exact) < 1e-6


# --- Bad input and the measurement ------------------------------------------------------------------------------------
def test_bad_input(pairs):
    target, draft = pairs[0]
    with pytest.raises(ValueError, match="k .* at least 1"):
        speculative_generate(target, draft, [1], 5, k=0)
    other = _model(4, vocab_size=128, context_length=64, d_model=32, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match="draft's vocabulary .* differs"):
        speculative_generate(target, other, [1], 5)
    with pytest.raises(ValueError, match="context_length=64"):
        speculative_generate(target, draft, list(range(60)), 5)
    short = _model(5, vocab_size=256, context_length=16, d_model=32, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match="draft's context_length=16"):
        speculative_generate(target, short, list(range(10)), 10)
    with pytest.raises(ValueError, match="at least one token"):
        speculative_generate(target, draft, [], 5)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, draft, [1], 5, temperature=-1.0)
    with pytest.raises(ValueError, match="vocab_size"):
        speculative_generate(target, draft, [1], 5, vocab_size=300)
    assert speculative_generate(target, draft, [1], 0) == SpecResult([], 0, 0, 0, 0)


def test_measure_speedup_reports_every_k(pairs):
    target, draft = pairs[2]
    rows = measure_speedup(target, draft, [[1, 2], [7, 8, 9]], ks=[1, 4], max_new_tokens=12)
    assert [r["k"] for r in rows] == [1, 4]
    for r in rows:
        assert r["identical"] and 0.0 <= r["acceptance"] <= 1.0 and 1.0 <= r["tokens_per_call"] <= r["k"] + 1
        assert r["tokens_per_s"] > 0 and r["speedup"] > 0 and r["cost_ratio"] > 0
        assert r["predicted_speedup"] == pytest.approx(expected_speedup(r["tokens_per_call"], r["k"], r["cost_ratio"]))
    with pytest.raises(ValueError, match="at least one prompt"):
        measure_speedup(target, draft, [], ks=[1])


def test_expected_tokens_per_round():
    assert expected_tokens_per_round(0.0, 4) == 1.0 and expected_tokens_per_round(1.0, 4) == 5.0
    # by enumeration: j proposals accepted (j < k) with probability α^j (1 − α), all k with α^k; each round adds one
    alpha, k = 0.7, 5
    mean = sum((j + 1) * alpha**j * (1 - alpha) for j in range(k)) + (k + 1) * alpha**k
    assert expected_tokens_per_round(alpha, k) == pytest.approx(mean)
    assert expected_speedup(3.0, 4, 0.25) == pytest.approx(1.5)
