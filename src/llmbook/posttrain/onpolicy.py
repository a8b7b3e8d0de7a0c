"""On-policy preference pairs: the SFT model's own answers to the verifiable task, a passing one against a failing one.

DPO learns from pairs; the polite data's pairs were written by someone else,
so their answers are off-policy (the model would never write them). Here the
pairs come from the model itself, as in RL: sample ``n_samples`` answers to
each task prompt, grade them with ``TaskItem.check``, and pair

    chosen    the best answer that passes (reward 1.0), the first sampled among equals
    rejected  the worst answer that fails (reward < 1.0), the first sampled among equals

A prompt whose samples all pass, or all fail, gives no pair: there is nothing
to prefer. That is GRPO's "a group of equal rewards teaches nothing" in
DPO's terms, and it is why the number of pairs per family (``OnPolicyStats``)
says where DPO can learn at all. Answers are the graded text
(``tasks.clean_response``: up to the first special token, stripped), and an
empty answer or one equal to the chosen one is never paired.

Deterministic: one ``torch.Generator`` seeded with ``seed`` samples every
prompt in order, so the same model, items and seed give the same pairs.
Cost: ``len(items) * n_samples`` sampled answers of at most ``max_new_tokens``
tokens, in batches of 64 rows. Measured with the book's ``sft-full`` (1.3 M
parameters): 1,600 answers of at most 32 tokens took 14 s on one thread of a
shared 2-core machine. What to expect from it (50 training prompts per family,
8 samples at temperature 1): short_line and capitals give a pair for nearly
every prompt (a passing and a failing sample), last_word and word_in_limit
for almost none (under 0.5% of their samples pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llmbook.bpe.tokenizer import Tokenizer
from llmbook.model import GPT
from llmbook.posttrain.pairs import PreferencePair
from llmbook.posttrain.rollouts import Rollout, sample_groups
from llmbook.posttrain.tasks import FAMILIES, TaskItem, clean_response
from llmbook.posttrain.templates import Template


@dataclass
class OnPolicyStats:
    """Prompts sampled and prompts that gave a pair, overall and per family (``{family: (prompts, pairs)}``)."""

    prompts: int = 0
    with_pairs: int = 0
    samples: int = 0
    passed: int = 0  # samples that passed
    per_family: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def pair_rate(self) -> float:
        return self.with_pairs / self.prompts if self.prompts else 0.0

    def __str__(self) -> str:
        fams = ", ".join(f"{f} {n_pairs}/{n}" for f, (n, n_pairs) in self.per_family.items())
        return (f"{self.with_pairs} pairs from {self.prompts} prompts ({self.pair_rate:.0%}; {self.passed} of "
                f"{self.samples} samples passed); per family: {fams}")


def pick_pair(group: Sequence[Rollout]) -> tuple[str, str] | None:
    """``(chosen, rejected)`` texts from one prompt's samples, or None when no passing or no failing answer differs.

    Chosen: the highest reward among the passing answers (all 1.0; the first
    sampled). Rejected: the lowest reward among the failing answers that are not
    empty and not the chosen text (the first sampled among equals).
    """
    answers = [(clean_response(r.text), r.reward) for r in group]
    passing = [(i, text) for i, (text, reward) in enumerate(answers) if reward == 1.0 and text]
    if not passing:
        return None
    chosen = max(passing, key=lambda p: (answers[p[0]][1], -p[0]))[1]
    failing = [(i, text) for i, (text, reward) in enumerate(answers) if reward < 1.0 and text and text != chosen]
    if not failing:
        return None
    rejected = min(failing, key=lambda p: (answers[p[0]][1], p[0]))[1]
    return chosen, rejected


def onpolicy_pairs_with_stats(
    model: GPT, tokenizer: Tokenizer, items: Sequence[TaskItem], n_samples: int, template: Template | str = "chatml",
    seed: int = 0, temperature: float = 1.0, max_new_tokens: int = 48,
) -> tuple[list[PreferencePair], OnPolicyStats]:
    """``onpolicy_pairs``, and the ``OnPolicyStats`` of how many prompts gave a pair."""
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 to compare answers, got {n_samples}")
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    batch = sample_groups(model, tokenizer, items, n_samples, template, temperature, max_new_tokens, generator)
    pairs: list[PreferencePair] = []
    stats = OnPolicyStats(samples=len(batch), passed=int(batch.passed.sum()))
    counts = {f: [0, 0] for f in FAMILIES}
    for p, item in enumerate(batch.items):
        group = batch.rollouts[p * n_samples:(p + 1) * n_samples]
        picked = pick_pair(group)
        counts.setdefault(item.family, [0, 0])[0] += 1
        stats.prompts += 1
        if picked is not None:
            prompt = tuple(item.messages(with_reference=False))
            pairs.append(PreferencePair(prompt, *picked))
            counts[item.family][1] += 1
            stats.with_pairs += 1
    stats.per_family = {f: (n, k) for f, (n, k) in counts.items() if n}
    return pairs, stats


def onpolicy_pairs(
    model: GPT, tokenizer: Tokenizer, items: Sequence[TaskItem], n_samples: int, template: Template | str = "chatml",
    seed: int = 0, temperature: float = 1.0, max_new_tokens: int = 48,
) -> list[PreferencePair]:
    """Preference pairs from ``model``'s own samples: chosen passes ``item.check``, rejected fails it.

    ``n_samples`` answers per item at ``temperature`` (> 0), seeded by ``seed``;
    items whose samples do not include both a passing and a different failing
    answer give no pair. See the module docstring; ``onpolicy_pairs_with_stats``
    also says how many prompts gave pairs.
    """
    return onpolicy_pairs_with_stats(model, tokenizer, items, n_samples, template, seed, temperature,
                                     max_new_tokens)[0]
