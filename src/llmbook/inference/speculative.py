"""Speculative decoding: a small draft model guesses k tokens, the big target model checks them all in one pass.

Decoding one token at a time leaves a model mostly waiting: at batch 1 a step
reads every weight to produce one token, and on a CPU at this book's sizes it
pays the same per-layer overhead whether it processes 1 token or 9. A cheap
*draft* model (here one layer instead of four, trained on the same data with
the same tokenizer) proposes k tokens one after the other; the *target* then
scores the k proposals in ONE forward pass, which gives its own next-token
distribution p at each of the k + 1 positions. The rule of Leviathan et al.
2023 ("Fast Inference from Transformers via Speculative Decoding") and Chen
et al. 2023 ("Accelerating Large Language Model Decoding with Speculative
Sampling") decides how many proposals to keep:

    for i = 1..k:  keep draft token x_i with probability min(1, p_i(x_i) / q_i(x_i))
    at the first rejection: draw the token from norm(max(0, p_i − q_i)) and stop
    if all k are kept:      draw one bonus token from p_{k+1}

Every round yields between 1 and k + 1 tokens for one target pass, and the
tokens are distributed *exactly* as if the target had sampled them itself:
for one position, token x comes out either as an accepted proposal,
probability q(x)·min(1, p(x)/q(x)) = min(p(x), q(x)), or from the residual
after a rejection, probability (1 − Σ_y min(p(y), q(y))) · max(0, p(x) − q(x))
/ Σ_y max(0, p(y) − q(y)) = max(0, p(x) − q(x)), as the two sums are equal.
Together: min(p, q) + max(0, p − q) = p. ``output_distribution`` computes
these two parts and the tests check they add up to p, and that the sampler
draws from the target's distribution over many samples.

At temperature 0 both models are one-hot at their argmax, and the rule becomes:
keep proposals while they equal the target's argmax, then take the target's
argmax. The output is then *identical* to the target's greedy decoding (tests:
equality with ``llmbook.generate.generate`` for k = 1..8); only the speed changes.

Both models keep a KV cache (Chapter 4). After a round the target's cache holds
the proposals it scored, accepted or not: its ``length`` is set back to the
accepted ones (the buffers past ``length`` are simply overwritten later), and
the draft's likewise. How fast it goes depends on the acceptance rate α and
the draft's cost c per step relative to the target's: k draft steps plus one
target pass give on average (1 − α^(k+1)) / (1 − α) tokens (the paper's Eq. 1).
``measure_speedup`` measures both, against plain greedy decoding with the KV cache.

Where it pays: a big target on a GPU, memory-bound, with a draft 10-100x
cheaper per step. The book's models on a CPU are the opposite case: a step
costs mostly a fixed Python and kernel-launch overhead per layer, so even a
one-layer draft costs about a third of the four-layer target (c ≈ 0.37), and
it agrees with the target's greedy token about half the time. Then the best
k is small (1-2) and the speed-up modest; ``expected_speedup`` says what α and
c would be needed for more (α ≈ 0.85 with c ≈ 0.37 for 1.5x). A draft with
no layers, ``ngram_draft.NgramDraft`` (counts from the training data and the
text so far), is accepted about as often at k = 1 and costs almost nothing
(c ≈ 0), so its best k is larger and its speed-up too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmbook.generate import apply_temperature, filter_top_k, filter_top_p, generate, mask_padding
from llmbook.inference.ngram_draft import NgramDraft
from llmbook.model import GPT

Draft = GPT | NgramDraft  # a neural draft with its own KV cache, or n-gram counts (``ngram_draft``)


@dataclass
class SpecResult:
    """What one ``speculative_generate`` call produced and what it cost."""

    tokens: list[int]  # the new tokens (through the first stop token, if any)
    proposed: int  # draft tokens proposed in all rounds
    accepted: int  # of those, how many the target kept
    target_calls: int  # target forward passes (one per round)
    draft_calls: int  # draft forward passes (one per proposed token)
    accepted_per_round: list[int] = field(default_factory=list)  # proposals kept in each round, 0..k

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        """New tokens per target pass; plain decoding makes exactly 1."""
        return len(self.tokens) / self.target_calls if self.target_calls else 0.0


# --- The rule, one round ----------------------------------------------------------------------------------------------
def acceptance_probability(p: Tensor, q: Tensor, draft_tokens: Tensor) -> Tensor:
    """min(1, p_i(x_i) / q_i(x_i)) for each proposal: ``p (≥k, V)``, ``q (k, V)``, ``draft_tokens (k,)`` -> ``(k,)``.

    A proposal the target likes at least as much as the draft does is always
    kept; one the draft overrates (q > p) is kept in proportion p / q, which
    takes back exactly the extra probability the draft gave it.
    """
    rows = torch.arange(draft_tokens.shape[0], device=draft_tokens.device)
    p_x, q_x = p[rows, draft_tokens], q[rows, draft_tokens]  # (k,) each
    # q_x > 0 for a token drawn from q; the guard only keeps a hand-made q = 0 from dividing by zero
    return torch.where(q_x > 0, p_x / q_x.clamp_min(torch.finfo(q.dtype).tiny), torch.ones_like(p_x)).clamp(max=1.0)


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """norm(max(0, p − q)) over the last dim: where to draw from after a rejection, ``(..., V) -> (..., V)``.

    It puts the mass on the tokens the draft *under*rates, the ones a rejection
    must make up for. p = [0.5, 0.3, 0.2], q = [0.2, 0.6, 0.2] give [1, 0, 0].
    When p == q nothing is ever rejected and the residual is empty; then p is returned.
    """
    r = (p - q).clamp(min=0.0)
    total = r.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), p)


def output_distribution(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """For one position, the probability of each token coming out of the rule, in its two parts, ``(V,)`` each.

    ``accepted[x]`` = q(x)·min(1, p(x)/q(x)): the draft proposed x and it was kept.
    ``resampled[x]`` = P(reject)·residual(x): a proposal was rejected and x drawn instead.
    Their sum is p, whatever q is (with q > 0 wherever p > 0 or not): the proof
    that speculative sampling draws from the target, as numbers.
    """
    tokens = torch.arange(p.shape[-1], device=p.device)
    accept = acceptance_probability(p.expand(len(tokens), -1), q.expand(len(tokens), -1), tokens)  # (V,)
    accepted = q * accept  # q(x) · min(1, p(x)/q(x)) = min(p(x), q(x)) where q(x) > 0
    reject = 1.0 - accepted.sum()
    return accepted, reject * residual_distribution(p, q)


def accept_or_resample(
    p: Tensor, q: Tensor, draft_tokens: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, int]:
    """One round of the rule: the tokens to keep ``(j + 1,)`` and j, the number of proposals accepted.

    ``p (k + 1, V)``: the target's probabilities at the k proposals' positions
    and one more; ``q (k, V)``: the draft's, from which ``draft_tokens (k,)``
    were drawn. Proposal i is kept with probability min(1, p_i(x_i)/q_i(x_i));
    at the first rejection, j, a token is drawn from norm(max(0, p_j − q_j))
    and the rest are dropped (they were conditioned on a rejected token); if
    all k are kept, a bonus token is drawn from p_k, the target's prediction
    after the last proposal. So a round always yields at least one token.

    >>> p = torch.tensor([[0.0, 1.0], [0.5, 0.5]]); q = torch.tensor([[0.5, 0.5]])
    >>> accept_or_resample(p, q, torch.tensor([1]))[1]  # p(1)/q(1) = 2: always accepted
    1
    """
    k = draft_tokens.shape[0]
    if p.shape[0] != k + 1 or q.shape[0] != k or p.shape[-1] != q.shape[-1]:
        raise ValueError(f"need p (k+1, V) and q (k, V) for k={k} proposals; got p {tuple(p.shape)}, "
                         f"q {tuple(q.shape)}")
    # u < a happens with probability a for u uniform in [0, 1): all k coins at once, independent as they must be
    u = torch.rand(k, generator=generator, device=p.device, dtype=p.dtype)
    kept = u < acceptance_probability(p[:k], q, draft_tokens)  # (k,)
    j = int(kept.cumprod(dim=0).sum())  # proposals accepted before the first rejection
    dist = residual_distribution(p[j], q[j]) if j < k else p[k]  # (V,)
    extra = torch.multinomial(dist, 1, generator=generator)  # (1,)
    return torch.cat([draft_tokens[:j], extra]), j


# --- Decoding ---------------------------------------------------------------------------------------------------------
def _probs(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
           vocab_size: int | None) -> Tensor:
    """The sampling distribution ``(..., V)`` that ``llmbook.generate`` draws from, for the target and the draft alike.

    Both must use the same transformation (padding mask, temperature, top-k,
    top-p): the rule makes the output follow whatever p it is given.
    """
    logits = apply_temperature(mask_padding(logits, vocab_size).float(), temperature)
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    return torch.softmax(logits, dim=-1)


def _check(target: GPT, draft: Draft, prompt: Sequence[int], max_new_tokens: int, k: int, temperature: float,
           vocab_size: int | None) -> None:
    if k < 1:
        raise ValueError(f"k (draft tokens per round) must be at least 1, got {k}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if isinstance(draft, NgramDraft):
        if draft.vocab_size > target.cfg.vocab_size:
            raise ValueError(
                f"the n-gram draft was counted over ids up to {draft.vocab_size - 1}, past the target's "
                f"{target.cfg.vocab_size} ids: count it over tokens from the target's tokenizer"
            )
    elif target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(
            f"the draft's vocabulary ({draft.cfg.vocab_size} ids) differs from the target's ({target.cfg.vocab_size}): "
            "the draft must be trained with the target's tokenizer so that its token ids mean the same"
        )
    if vocab_size is not None and not 0 < vocab_size <= target.cfg.vocab_size:
        raise ValueError(f"vocab_size must be in 1..{target.cfg.vocab_size} (the models' output size), "
                         f"got {vocab_size}")
    if len(prompt) == 0:
        raise ValueError("the prompt needs at least one token (e.g. the <|endoftext|> id)")
    total = len(prompt) + max_new_tokens
    for name, model in (("target", target), ("draft", draft)):
        if isinstance(model, GPT) and total > model.cfg.context_length:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) plus max_new_tokens={max_new_tokens} is {total}, more than the "
                f"{name}'s context_length={model.cfg.context_length}; shorten the prompt or generate fewer tokens"
            )


def speculative_generate(
    target: GPT, draft: Draft, prompt: Sequence[int] | Tensor, max_new_tokens: int, k: int = 4,
    temperature: float = 0.0, generator: torch.Generator | None = None, vocab_size: int | None = None,
    stop_tokens: Sequence[int] = (), top_k: int | None = None, top_p: float | None = None,
) -> SpecResult:
    """The target's continuation of one prompt, decoded k draft tokens at a time; with the counts of what it took.

    Options as ``llmbook.generate.generate``: ``temperature=0`` is greedy and
    gives exactly the target's greedy tokens; above 0 the tokens follow the
    target's distribution (with the same ``top_k``/``top_p``/``vocab_size``,
    applied to the draft's distribution too). Stops after max_new_tokens or
    through the first stop token. Prompt + max_new_tokens must fit in both
    models' context length, and both must share the vocabulary, else ValueError.
    ``draft`` is a ``GPT`` (it keeps a KV cache, rolled back like the
    target's) or an ``NgramDraft`` (its proposals are one-hot: q(x) = 1).
    """
    prompt = prompt.tolist() if isinstance(prompt, Tensor) else list(prompt)
    _check(target, draft, prompt, max_new_tokens, k, temperature, vocab_size)
    result = SpecResult([], 0, 0, 0, 0)
    if max_new_tokens == 0:
        return result
    device = next(target.parameters()).device
    n, total = len(prompt), len(prompt) + max_new_tokens
    seq = torch.zeros(1, total, dtype=torch.long, device=device)  # the sequence to be; proposals written ahead
    seq[0, :n] = torch.tensor(prompt, dtype=torch.long, device=device)
    stops = set(stop_tokens)
    greedy = temperature == 0
    V = vocab_size or target.cfg.vocab_size  # greedy: argmax over the first V ids is argmax after mask_padding
    neural = isinstance(draft, GPT)
    # .train()/.eval() walk every module: only where needed
    training = [m for m in (target, draft) if isinstance(m, GPT) and m.training]
    for m in training:
        m.eval()
    try:
        with torch.inference_mode():
            t_caches = target.new_caches(1, total)
            d_caches = draft.new_caches(1, total) if neural else []
            state = None if neural else draft.start(prompt)
            q_rows = None if greedy else torch.empty(k, target.cfg.vocab_size, device=device)  # reused every round
            while n < total:
                kk = min(k, total - n - 1)  # never propose past max_new_tokens: the round's bonus token is the last
                # 1. the draft proposes kk tokens; a neural one with one forward each, whose first feeds what its
                # cache lacks (1-2 tokens); an n-gram one with dictionary lookups, q one-hot at its proposals
                if neural:
                    for i in range(kk):
                        logits, _ = draft(seq[:, d_caches[0].length : n + i], caches=d_caches)  # (1, T_new, V)
                        if greedy:
                            seq[0, n + i] = logits[0, -1, :V].argmax()
                        else:
                            q_rows[i] = _probs(logits[0, -1], temperature, top_k, top_p, vocab_size)
                            seq[0, n + i] = torch.multinomial(q_rows[i], 1, generator=generator)[0]
                elif kk:
                    proposals = torch.tensor(state.propose(kk), dtype=torch.long, device=device)
                    seq[0, n : n + kk] = proposals
                    if not greedy:
                        q_rows[:kk] = 0.0
                        q_rows[torch.arange(kk, device=device), proposals] = 1.0
                # 2. the target scores the kk proposals, and predicts the token after them, in one pass
                logits, _ = target(seq[:, t_caches[0].length : n + kk], caches=t_caches)  # (1, T_new, V)
                logits = logits[0, -(kk + 1):]  # (kk + 1, V): its next-token logits at each proposal and after
                if greedy:
                    best = logits[:, :V].argmax(dim=-1)  # (kk + 1,)
                    j = int((seq[0, n : n + kk] == best[:kk]).cumprod(dim=0).sum())  # proposals equal to argmax
                    seq[0, n + j] = best[j]  # the target's own token after them
                else:
                    p = _probs(logits, temperature, top_k, top_p, vocab_size)  # (kk + 1, V)
                    kept, j = accept_or_resample(p, q_rows[:kk], seq[0, n : n + kk], generator)
                    seq[0, n : n + j + 1] = kept
                new = seq[0, n : n + j + 1].tolist()
                result.proposed += kk
                result.accepted += j
                result.target_calls += 1
                result.draft_calls += kk
                result.accepted_per_round.append(j)
                # 3. roll both caches back to the tokens now in the sequence; the last new token is fed next round
                n += j + 1
                for c in t_caches:
                    c.length = n - 1
                for c in d_caches:
                    c.length = min(c.length, n - 1)
                if state is not None:
                    state.extend(new)
                if stops and not stops.isdisjoint(new):
                    first = next(i for i, t in enumerate(new) if t in stops)
                    result.tokens += new[: first + 1]
                    break
                result.tokens += new
    finally:
        for m in training:
            m.train()
    return result


# --- Measuring --------------------------------------------------------------------------------------------------------
def expected_tokens_per_round(alpha: float, k: int) -> float:
    """Tokens one round yields if each proposal is accepted with probability α independently: (1 − α^(k+1)) / (1 − α).

    The accepted prefix plus the one token the target always adds (Leviathan et al. 2023, Eq. 1):

    >>> round(expected_tokens_per_round(0.8, 4), 3)
    3.362
    """
    if not 0.0 <= alpha <= 1.0 or k < 0:
        raise ValueError(f"need 0 <= alpha <= 1 and k >= 0, got alpha={alpha}, k={k}")
    return float(k + 1) if alpha == 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def expected_speedup(tokens_per_round: float, k: int, cost_ratio: float) -> float:
    """Speed-up over plain decoding: tokens per round / (k·c + 1), c = a draft step's time over a target step's.

    It counts the verification pass as one target step, which at batch 1 it
    nearly is (k + 1 tokens read the weights once). A draft that costs a third
    of the target (c = 1/3) and yields 3 tokens a round with k = 4 gives 3 / (4/3 + 1) ≈ 1.29.
    """
    return tokens_per_round / (k * cost_ratio + 1.0)


def measure_speedup(
    target: GPT, draft: Draft, prompts: Sequence[Sequence[int]], ks: Sequence[int] = range(1, 9),
    max_new_tokens: int = 64, vocab_size: int | None = None, repeats: int = 1, threads: int | None = 1,
) -> list[dict]:
    """Greedy speculative decoding vs plain greedy decoding with the KV cache, one dict per k.

    Each prompt is decoded by ``llmbook.generate.generate`` (the baseline),
    by ``speculative_generate`` for every k, and by the draft alone (a
    neural one with ``generate``, an n-gram one proposing one token at a
    time and committing it), interleaved (baseline, draft, k=1, ..., k=8, baseline again,
    per prompt), so that a machine busy with other work slows all of them
    alike; a speed-up is a ratio of total times. Every dict has ``k``,
    ``acceptance`` (accepted / proposed), ``tokens_per_call`` (new tokens per
    target pass), ``tokens_per_s``, ``baseline_tokens_per_s``, ``speedup``,
    ``cost_ratio`` (the draft's time per token over the target's, alone),
    ``predicted_speedup`` (``expected_speedup`` of the measured tokens per call
    and cost ratio) and ``identical`` (the outputs equal the baseline's for every prompt).
    ``threads`` (default 1; None: leave as is) is PyTorch's thread count while
    measuring: at batch 1 these models' matrices are too small to share.
    """
    ks = list(ks)
    if not prompts or not ks:
        raise ValueError("measure_speedup needs at least one prompt and one k")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(target, draft, prompts, ks, max_new_tokens, vocab_size, repeats)
    finally:
        torch.set_num_threads(old_threads)


def _greedy_alone(model: Draft, prompt: list[int], max_new_tokens: int, vocab_size: int | None) -> list[int]:
    """One model decoding alone, greedy: the baseline (the target), and what a draft step costs."""
    if isinstance(model, GPT):
        return generate(model, [prompt], max_new_tokens, temperature=0.0, vocab_size=vocab_size)[0]
    state = model.start(prompt)
    for _ in range(max_new_tokens):
        state.extend(state.propose(1))
    return state.tokens[len(prompt):]


def _measure(target: GPT, draft: Draft, prompts: Sequence[Sequence[int]], ks: list[int], max_new_tokens: int,
             vocab_size: int | None, repeats: int) -> list[dict]:
    base_time, base_tokens, draft_time, draft_tokens = 0.0, 0, 0.0, 0
    stats = {k: {"time": 0.0, "tokens": 0, "proposed": 0, "accepted": 0, "calls": 0, "identical": True} for k in ks}

    def plain(model: Draft, prompt: list[int]) -> tuple[float, list[int]]:
        start = time.perf_counter()
        out = _greedy_alone(model, prompt, max_new_tokens, vocab_size)
        return time.perf_counter() - start, out

    for _ in range(repeats):
        for prompt in prompts:
            prompt = list(prompt)
            t0, ref = plain(target, prompt)
            t_draft, out = plain(draft, prompt)
            draft_time, draft_tokens = draft_time + t_draft, draft_tokens + len(out)
            for k in ks:
                start = time.perf_counter()
                res = speculative_generate(target, draft, prompt, max_new_tokens, k=k, vocab_size=vocab_size)
                s = stats[k]
                s["time"] += time.perf_counter() - start
                s["tokens"] += len(res.tokens)
                s["proposed"] += res.proposed
                s["accepted"] += res.accepted
                s["calls"] += res.target_calls
                s["identical"] &= res.tokens == ref
            t1, _ = plain(target, prompt)
            base_time += (t0 + t1) / 2
            base_tokens += len(ref)
    base_rate = base_tokens / base_time
    cost_ratio = base_rate / (draft_tokens / draft_time)  # time per token: draft / target
    rows = []
    for k in ks:
        s = stats[k]
        rate, per_call = s["tokens"] / s["time"], s["tokens"] / s["calls"]
        rows.append({
            "k": k, "acceptance": s["accepted"] / max(s["proposed"], 1), "tokens_per_call": per_call,
            "tokens_per_s": rate, "baseline_tokens_per_s": base_rate, "speedup": rate / base_rate,
            "cost_ratio": cost_ratio, "predicted_speedup": expected_speedup(per_call, k, cost_ratio),
            "identical": s["identical"],
        })
    return rows
