"""Measuring a chat model: batched greedy replies, format adherence, and the verifiable task's success rate.

    >>> responses = generate_responses(model, tok, [item.messages(False) for item in test], "chatml")  # doctest: +SKIP
    >>> print(format_report(responses))                                       # doctest: +SKIP
    >>> print(score_task(model, tok, test, "chatml"))                         # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmbook.bpe.tokenizer import Tokenizer
from llmbook.generate import generate
from llmbook.model import GPT
from llmbook.posttrain.masking import encode_prompt
from llmbook.posttrain.tasks import TaskItem, TaskScore, score_responses, wilson_interval
from llmbook.posttrain.templates import Message, Template, get_template

# Text that belongs to the template, not to an answer: a response that contains it has run on into a new turn.
MARKUP = ("### Instruction", "### Input", "### Response", "<|im_start|>", "<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class FormatReport:
    """How often generated answers keep to the template, with 95% Wilson intervals (``(low, high)``)."""

    n: int
    stopped: int  # ended with the template's end token within the budget
    runaway: int  # contained template markup ("### Instruction", "<|im_start|>", ...): it started a new turn
    adherent: int  # stopped and no runaway

    def rate(self, what: str) -> float:
        return getattr(self, what) / self.n

    def interval(self, what: str) -> tuple[float, float]:
        return wilson_interval(getattr(self, what), self.n)

    def __str__(self) -> str:
        parts = [f"{what} {self.rate(what):.0%} [{self.interval(what)[0]:.0%}, {self.interval(what)[1]:.0%}]"
                 for what in ("adherent", "stopped", "runaway")]
        return f"{', '.join(parts)} of {self.n}"


def end_token(tokenizer: Tokenizer, template: Template) -> int:
    """The id that ends a response in ``template``: ``<|im_end|>`` for ChatML, ``<|endoftext|>`` for Alpaca."""
    return tokenizer.special_tokens[template.end_token]


@torch.no_grad()
def generate_responses(
    model: GPT, tokenizer: Tokenizer, conversations: Sequence[Sequence[Message]], template: Template | str,
    max_new_tokens: int = 64, batch_size: int = 32, temperature: float = 0.0, seed: int = 0,
) -> list[tuple[str, bool]]:
    """``(text, stopped)`` for each conversation: the reply up to the end token, and whether it reached it.

    Prompts are batched (left-padded, ``llmbook.generate``); ``temperature=0``
    is greedy, so the same model gives the same answers on every machine.
    A prompt that leaves no room for ``max_new_tokens`` in the context is a
    ValueError naming it.
    """
    template = get_template(template) if isinstance(template, str) else template
    stop = end_token(tokenizer, template)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    prompts = [encode_prompt(tokenizer, messages, template, special_in_content="ordinary")
               for messages in conversations]
    for i, ids in enumerate(prompts):
        if len(ids) + max_new_tokens > model.cfg.context_length:
            raise ValueError(f"prompt {i} has {len(ids)} tokens: with max_new_tokens={max_new_tokens} it does not "
                             f"fit the context of {model.cfg.context_length}; drop it or ask for fewer tokens")
    out: list[tuple[str, bool]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        new = generate(model, batch, max_new_tokens, temperature=temperature, stop_tokens=[stop],
                       generator=generator, vocab_size=tokenizer.vocab_size)
        for ids in new:
            stopped = bool(ids) and ids[-1] == stop
            text = tokenizer.decode(ids[:-1] if stopped else ids)
            out.append((text, stopped))
    return out


def format_report(responses: Sequence[tuple[str, bool]]) -> FormatReport:
    """Count, over ``generate_responses``' output, the answers that stopped, ran away, and kept the format."""
    if not responses:
        raise ValueError("format_report needs at least one response")
    stopped = sum(s for _, s in responses)
    runaway = sum(any(m in text for m in MARKUP) for text, _ in responses)
    adherent = sum(s and not any(m in text for m in MARKUP) for text, s in responses)
    return FormatReport(len(responses), stopped, runaway, adherent)


def score_task(
    model: GPT, tokenizer: Tokenizer, items: Sequence[TaskItem], template: Template | str = "chatml",
    max_new_tokens: int = 48, batch_size: int = 32,
) -> tuple[TaskScore, list[str]]:
    """Greedy replies to the task's prompts, graded: success rate with its 95% interval, and the replies."""
    responses = generate_responses(model, tokenizer, [item.messages(with_reference=False) for item in items],
                                   template, max_new_tokens, batch_size)
    texts = [text for text, _ in responses]
    return score_responses(items, texts), texts


@dataclass(frozen=True)
class SampledScore:
    """Pass@1 under sampling: the mean pass rate of ``samples`` answers per prompt, with a bootstrap 95% interval.

    ``per_prompt[i]`` is the fraction of prompt i's samples that passed. The
    interval resamples *prompts* (with all their samples), because samples of
    one prompt are not independent: a Wilson interval over every sample would
    be too narrow.
    """

    rate: float
    low: float
    high: float
    samples: int
    per_prompt: tuple[float, ...]
    per_family: dict[str, float]
    texts: tuple[tuple[str, ...], ...]

    def __str__(self) -> str:
        return (f"{self.rate:.1%} [{self.low:.1%}, {self.high:.1%}] ({self.samples} samples for each of "
                f"{len(self.per_prompt)} prompts)")


def bootstrap_interval(values: Sequence[float], draws: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (Efron 1979): resample, take the quantiles."""
    if not values:
        raise ValueError("bootstrap_interval needs at least one value")
    x = torch.tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = x[torch.randint(0, len(x), (draws, len(x)), generator=g)].mean(dim=1)
    tail = (1 - level) / 2
    return float(torch.quantile(means, tail)), float(torch.quantile(means, 1 - tail))


def sampled_score(
    model: GPT, tokenizer: Tokenizer, items: Sequence[TaskItem], template: Template | str = "chatml",
    samples: int = 4, temperature: float = 1.0, max_new_tokens: int = 48, seed: int = 0, batch_size: int = 64,
) -> SampledScore:
    """Sample ``samples`` answers per prompt at ``temperature`` (seeded) and grade them: pass@1 with its interval.

    Greedy decoding shows a model's single most likely answer; sampling shows
    the distribution it would train on in RL and what a user sees at
    temperature > 0. Chapter 10 reports both.
    """
    if samples < 1 or temperature <= 0:
        raise ValueError(f"need samples >= 1 and temperature > 0 (greedy is score_task), got {samples}, {temperature}")
    if not items:
        raise ValueError("sampled_score needs at least one task item")
    conversations = [item.messages(with_reference=False) for item in items for _ in range(samples)]
    responses = generate_responses(model, tokenizer, conversations, template, max_new_tokens, batch_size,
                                   temperature=temperature, seed=seed)
    texts = [tuple(text for text, _ in responses[i * samples:(i + 1) * samples]) for i in range(len(items))]
    per_prompt = [sum(item.passed(t) for t in group) / samples for item, group in zip(items, texts, strict=True)]
    low, high = bootstrap_interval(per_prompt, seed=seed)
    per_family = {}
    for family in sorted({item.family for item in items}):
        mine = [p for p, item in zip(per_prompt, items, strict=True) if item.family == family]
        per_family[family] = sum(mine) / len(mine)
    return SampledScore(sum(per_prompt) / len(per_prompt), low, high, samples, tuple(per_prompt), per_family,
                        tuple(texts))
