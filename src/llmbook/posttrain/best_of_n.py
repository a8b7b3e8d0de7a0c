"""Best-of-n: sample n answers, keep the one the reward model scores highest.

The simplest way to use a reward model, and the baseline RL has to beat:
no weight changes, only more sampling at inference.

    for each prompt:   y_1 .. y_n ~ π(· | x)            n samples of the policy (temperature 1)
                       r_i = reward_model(x, y_i)        each scored (prompt + reply + end token)
                       answer = y_argmax r_i             ties: the first

What it costs: n samples and n reward-model passes for every answer, at
every query, forever; RL pays once, in training. What it buys: the answer
from the top of the policy's distribution as the reward model ranks it,
so it can only be as good as the best of n samples and as right as the
reward model (an oracle reward would give pass@n; a reward model that ranks
at chance gives the policy's own rate at temperature 1).

How far it moves from the policy: best-of-n is itself a policy, and its KL
divergence from π is

    KL(best-of-n || π) = log n - (n - 1) / n

(the expression used by Stiennon et al. 2020 and Gao, Schulman & Hilton 2023,
"Scaling Laws for Reward Model Overoptimization"). It is exact when every
sample has its own reward; Beirami et al. 2024 ("Theoretical Guarantees on the
Best-of-n Alignment Policy", abstract): "A commonly used analytical expression
in the literature claims that the KL divergence between the best-of-n policy
and the reference policy is equal to log(n) − (n−1)/n. We disprove the
validity of this claim, and show that it is an upper bound on the actual KL
divergence." (When samples repeat, as a small policy's answers often do, the
true KL is smaller: with two equally likely answers it never exceeds log 2.)
The derivation, for rewards with a continuous distribution: let F be the
distribution function of r(y) under π. The best of n has reward quantile
u = F(r) distributed as the max of n uniforms, density n u^(n-1), so
best-of-n's probability of y is π(y) · n F(r(y))^(n-1), and

    KL = E[log (n F^(n-1))] = log n + (n - 1) E[log U_max] = log n + (n - 1)(-1/n),

since E[log U_max] = ∫ n u^(n-1) log u du = -1/n. n = 4: 0.64 nats; n = 8: 1.20;
n = 64: 3.17. It grows only like log n: best-of-n stays close to the policy,
which is why it resists reward hacking better than RL pushed to a large KL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llmbook.bpe.tokenizer import Tokenizer
from llmbook.generate import generate
from llmbook.model import GPT
from llmbook.posttrain.collate import collate
from llmbook.posttrain.masking import encode_prompt, tokenize_example
from llmbook.posttrain.measure import end_token
from llmbook.posttrain.reward_model import RewardModel, ends_at_response
from llmbook.posttrain.templates import Message, Template, get_template


def best_of_n_kl(n: int) -> float:
    """``log n - (n - 1) / n``: the KL divergence of best-of-n from the policy, in nats (module docstring)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


@dataclass
class BestOfN:
    """Every sample and its reward: ``samples[p][i]`` and ``rewards[p, i]`` for prompt p's i-th sample."""

    samples: list[list[str]]  # (P, n) reply texts, without the end token
    stopped: list[list[bool]]  # (P, n) whether the sample reached the end token within max_new_tokens
    rewards: Tensor  # (P, n) float32, on the CPU

    @property
    def best_index(self) -> list[int]:
        """The index of each prompt's highest reward; on a tie, the first (``max`` keeps the first maximum)."""
        return [max(range(len(row)), key=row.__getitem__) for row in self.rewards.tolist()]

    @property
    def best(self) -> list[str]:
        """Each prompt's highest-scoring reply: what ``best_of_n`` returns."""
        return [samples[i] for samples, i in zip(self.samples, self.best_index, strict=True)]


def _check(policy: GPT, tokenizer: Tokenizer, reward_model: RewardModel, conversations: Sequence, n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1 (samples per prompt), got {n}")
    if not conversations:
        raise ValueError("no conversations given: pass at least one (a list of Messages per prompt)")
    if reward_model.cfg.vocab_size != policy.cfg.vocab_size or reward_model.cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the reward model's vocabulary ({reward_model.cfg.vocab_size} ids) differs from the "
                         f"policy's ({policy.cfg.vocab_size} ids, tokenizer {tokenizer.vocab_size}): use a reward "
                         "model trained from the same SFT model and tokenizer")


@torch.no_grad()
def score_replies(reward_model: RewardModel, tokenizer: Tokenizer, conversations: Sequence[Sequence[Message]],
                  replies: Sequence[str], template: Template | str = "chatml", batch_size: int = 32) -> Tensor:
    """``(N,)`` rewards of ``replies[i]`` as the answer to ``conversations[i]``, tokenized exactly as in training.

    Each is the conversation with the reply as the assistant's message, through
    ``tokenize_example`` (content as ordinary text), cut at the reply's end
    token: the rows the reward model was trained on look the same.
    """
    template = get_template(template) if isinstance(template, str) else template
    if len(conversations) != len(replies):
        raise ValueError(f"need one reply per conversation, got {len(replies)} for {len(conversations)}")
    ctx = reward_model.cfg.context_length
    examples = []
    for i, (messages, reply) in enumerate(zip(conversations, replies, strict=True)):
        try:
            example = tokenize_example(tokenizer, [*messages, Message("assistant", reply)], template, ctx,
                                       special_in_content="ordinary")
        except ValueError as exc:
            if "more than max_len" not in str(exc):
                raise
            raise ValueError(f"prompt {i} with its reply does not fit the reward model's context of {ctx} tokens: "
                             "ask for fewer new tokens") from None
        examples.append(ends_at_response(example))
    device = next(reward_model.parameters()).device
    was_training = reward_model.training
    reward_model.eval()
    out = []
    try:
        for start in range(0, len(examples), batch_size):
            x, _, mask, positions = collate(examples[start:start + batch_size], pad_id=0)
            out.append(reward_model(x.to(device), mask.to(device), positions.to(device)).float().cpu())
    finally:
        reward_model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def sample_and_score(
    policy: GPT, tokenizer: Tokenizer, reward_model: RewardModel, conversations: Sequence[Sequence[Message]], n: int,
    template: Template | str = "chatml", temperature: float = 1.0, max_new_tokens: int = 48, seed: int = 0,
    batch_size: int = 64,
) -> BestOfN:
    """n samples of the policy for each conversation, and the reward model's score of each (``BestOfN``).

    Sampling is batched (each prompt repeated n times, left-padded) from one
    ``torch.Generator`` seeded with ``seed``, stopping at the template's end
    token as ``measure.generate_responses`` does; the same arguments give the
    same samples. A reply that runs out of tokens before its end token is
    scored as if it ended there (its reward model row ends with the end token).
    """
    _check(policy, tokenizer, reward_model, conversations, n)
    template = get_template(template) if isinstance(template, str) else template
    stop = end_token(tokenizer, template)
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    prompts = [encode_prompt(tokenizer, messages, template, special_in_content="ordinary")
               for messages in conversations]
    for i, ids in enumerate(prompts):
        if len(ids) + max_new_tokens + 1 > policy.cfg.context_length:  # +1: the end token the reward model reads
            raise ValueError(f"prompt {i} has {len(ids)} tokens: with max_new_tokens={max_new_tokens} and the end "
                             f"token it does not fit the context of {policy.cfg.context_length}; drop it or ask for "
                             "fewer tokens")
    repeated = [ids for ids in prompts for _ in range(n)]  # prompt p's samples are rows p*n .. p*n + n-1
    texts, stopped = [], []
    for start in range(0, len(repeated), batch_size):
        new = generate(policy, repeated[start:start + batch_size], max_new_tokens, temperature=temperature,
                       stop_tokens=[stop], generator=generator, vocab_size=tokenizer.vocab_size)
        for ids in new:
            ended = bool(ids) and ids[-1] == stop
            texts.append(tokenizer.decode(ids[:-1] if ended else ids))
            stopped.append(ended)
    convs = [messages for messages in conversations for _ in range(n)]
    rewards = score_replies(reward_model, tokenizer, convs, texts, template, batch_size).view(len(prompts), n)
    return BestOfN([texts[p * n:(p + 1) * n] for p in range(len(prompts))],
                   [stopped[p * n:(p + 1) * n] for p in range(len(prompts))], rewards)


def best_of_n(
    policy: GPT, tokenizer: Tokenizer, reward_model: RewardModel, conversations: Sequence[Sequence[Message]], n: int,
    template: Template | str = "chatml", temperature: float = 1.0, max_new_tokens: int = 48, seed: int = 0,
    batch_size: int = 64,
) -> list[str]:
    """Each conversation's highest-scoring reply of ``n`` samples (ties: the first); see the module docstring.

    ``sample_and_score`` with the same arguments gives every sample and
    reward (for plots); this returns its ``.best``.
    """
    return sample_and_score(policy, tokenizer, reward_model, conversations, n, template, temperature,
                            max_new_tokens, seed, batch_size).best
