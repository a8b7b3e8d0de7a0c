"""Rollouts: G sampled answers per prompt from the current policy, with their token ids and their rewards.

Reinforcement learning on a language model alternates two things: *sample*
answers with the policy as it is now, then *score* them and push the policy
towards the better ones. A rollout is one sampled answer, kept with
everything the update needs:

    prompt_ids       the prompt in the chat template, as the model saw it
    completion_ids   the sampled tokens, ending in the template's end token when the answer stopped
    text             the completion decoded (without that end token): what the checker grades
    reward           ``item.check(text)`` in [0, 1]: Chapter 9's verifiable task, graded

GRPO (``llmbook.posttrain.grpo``) samples a *group* of G answers to each
prompt, so a batch is P prompts times G rollouts, stored prompt-major: the
g-th answer to prompt p is ``rollouts[p * G + g]`` and ``rewards`` is a
``(P, G)`` tensor. ``to_batch`` turns the rollouts into Chapter 9's padded
training batch, prompt and completion as one row, with labels -100 everywhere
but on the completion, so ``logprobs.token_logprobs`` gives the log-probability
of exactly the tokens that were sampled, and nothing of the prompt.

Sampling uses ``llmbook.generate.generate`` as ``measure.generate_responses``
does (left-padded batches, the end token stops a row, a seeded
``torch.Generator``), so the same seed gives the same rollouts on a machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llmbook.bpe.tokenizer import Tokenizer
from llmbook.generate import generate
from llmbook.model import GPT
from llmbook.posttrain.collate import Batch, collate
from llmbook.posttrain.masking import IGNORE_INDEX, Example, encode_prompt
from llmbook.posttrain.measure import end_token
from llmbook.posttrain.tasks import TaskItem
from llmbook.posttrain.templates import Template, get_template


@dataclass(frozen=True)
class Rollout:
    """One sampled answer to one task item, and its reward."""

    item: TaskItem
    prompt_ids: list[int]
    completion_ids: list[int]  # the sampled tokens; the last is the end token when ``stopped``
    text: str  # the completion decoded, without the end token
    reward: float  # item.check(text), in [0, 1]
    stopped: bool  # reached the end token within max_new_tokens

    @property
    def passed(self) -> bool:
        """The answer follows the instruction exactly (reward 1.0)."""
        return self.reward == 1.0


@dataclass(frozen=True)
class RolloutBatch:
    """P prompts times G rollouts, prompt-major: ``rollouts[p * group_size + g]``."""

    rollouts: list[Rollout]
    group_size: int

    def __post_init__(self) -> None:
        if self.group_size < 1 or not self.rollouts or len(self.rollouts) % self.group_size:
            raise ValueError(f"{len(self.rollouts)} rollouts do not make whole groups of {self.group_size}")

    def __len__(self) -> int:
        return len(self.rollouts)

    @property
    def n_prompts(self) -> int:
        return len(self.rollouts) // self.group_size

    @property
    def items(self) -> list[TaskItem]:
        """The P task items, one per group."""
        return [self.rollouts[p * self.group_size].item for p in range(self.n_prompts)]

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.rollouts]

    @property
    def rewards(self) -> Tensor:
        """``(P, G)`` float32 rewards, one row per prompt."""
        return torch.tensor([r.reward for r in self.rollouts], dtype=torch.float32).view(-1, self.group_size)

    @property
    def passed(self) -> Tensor:
        """``(P, G)`` booleans: which answers scored 1.0."""
        return torch.tensor([r.passed for r in self.rollouts]).view(-1, self.group_size)

    @property
    def completion_lengths(self) -> Tensor:
        """``(P * G,)`` tokens sampled per rollout, the end token included."""
        return torch.tensor([len(r.completion_ids) for r in self.rollouts])

    def to_batch(self, pad_id: int) -> Batch:
        """Chapter 9's right-padded ``(x, y, mask, positions)``: prompt + completion per row, loss on the completion.

        Labels are -100 on the prompt and on padding, so after the shift ``y``
        holds, at the position before each sampled token, that token: exactly
        the ``sum_t log pi(o_t | q, o_<t)`` terms a policy gradient needs.
        """
        examples = [Example(r.prompt_ids + r.completion_ids,
                            [IGNORE_INDEX] * len(r.prompt_ids) + r.completion_ids) for r in self.rollouts]
        return collate(examples, pad_id)


@torch.no_grad()
def sample_groups(
    policy: GPT, tokenizer: Tokenizer, items: Sequence[TaskItem], group_size: int, template: Template | str = "chatml",
    temperature: float = 1.0, max_new_tokens: int = 32, generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> RolloutBatch:
    """``group_size`` samples of ``policy``'s answer to each item, scored by ``item.check``: a ``RolloutBatch``.

    Rows are sampled ``batch_size`` at a time, each prompt repeated
    ``group_size`` times (the KV cache makes the repeats cheap). ``temperature``
    must be > 0: a greedy group is G copies of one answer, all with the same
    reward, which teaches nothing. Pass a seeded ``generator`` to make the
    rollouts reproducible; the policy is put in eval mode while sampling and
    handed back in the mode it came in.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to sample different answers, got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not items:
        raise ValueError("sample_groups needs at least one task item")
    template = get_template(template) if isinstance(template, str) else template
    stop = end_token(tokenizer, template)
    prompts = [encode_prompt(tokenizer, item.messages(with_reference=False), template, special_in_content="ordinary")
               for item in items]
    for item, ids in zip(items, prompts, strict=True):
        if len(ids) + max_new_tokens > policy.cfg.context_length:
            raise ValueError(f"the prompt {item.prompt!r} has {len(ids)} tokens: with max_new_tokens={max_new_tokens} "
                             f"it does not fit the context of {policy.cfg.context_length}; drop it or sample fewer")
    rows = [(i, ids) for i, ids in enumerate(prompts) for _ in range(group_size)]
    rollouts: list[Rollout] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        new = generate(policy, [ids for _, ids in chunk], max_new_tokens, temperature=temperature, stop_tokens=[stop],
                       generator=generator, vocab_size=tokenizer.vocab_size)
        for (i, ids), completion in zip(chunk, new, strict=True):
            stopped = bool(completion) and completion[-1] == stop
            text = tokenizer.decode(completion[:-1] if stopped else completion)
            rollouts.append(Rollout(items[i], ids, completion, text, items[i].check(text), stopped))
    return RolloutBatch(rollouts, group_size)
