"""Multiple-choice scoring by log-likelihood, exactly as lm-evaluation-harness scores ``multiple_choice`` tasks.

A multiple-choice item is a context and k choices; the model never writes an answer. For each choice, lm-eval
asks for ``log p(delimiter + choice | context)`` (``construct_requests`` in lm_eval/api/task.py, the delimiter
is the task's ``target_delimiter``, " " by default) and then (``process_results``):

- ``acc``: the choice with the highest summed log-likelihood is the prediction (``np.argmax``: the first one
  on a tie). Summing favours short choices: every extra token costs log-probability.
- ``acc_norm``: the highest ``loglikelihood / len(choice)``, the length in *characters* of the choice
  itself (not its tokens, not its bytes, without the delimiter), which removes most of that bias.

Tokenization matters as much as the arithmetic, so this module copies lm-eval's (``_encode_pair`` in
lm_eval/api/model.py): trailing whitespace of the context moves to the front of the continuation, the pair is
encoded as ``encode(context + continuation)``, and the continuation's tokens are what follows the first
``len(encode(context))`` tokens. With an empty context, the continuation is conditioned on the prefix token
(``<|endoftext|>``, lm-eval's ``prefix_token_id``; a newline for a tokenizer without it). Text is encoded
with ``encode_ordinary``: no special tokens are read from task text. The log-likelihoods themselves come from
``likelihood.loglikelihoods``, which mirrors lm-eval's Hugging Face model class.

Not covered: lm-eval's ``multiple_input`` tasks (one continuation after several contexts), several gold
answers, and ``acc_mutual_info``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmbook.bpe.tokenizer import Tokenizer
from llmbook.evaluation.bootstrap import bootstrap_ci
from llmbook.evaluation.likelihood import default_prefix_id, loglikelihoods
from llmbook.model import GPT


@dataclass(frozen=True)
class MCItem:
    """One question: ``context`` (the prompt as lm-eval's ``doc_to_text`` renders it), ``choices``, ``gold`` index."""

    id: str
    context: str
    choices: tuple[str, ...]
    gold: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        if len(self.choices) < 2:
            raise ValueError(f"item {self.id!r} has {len(self.choices)} choice(s); a multiple-choice item needs at "
                             f"least 2")
        if not all(isinstance(c, str) and c for c in self.choices):
            raise ValueError(f"item {self.id!r}: every choice must be a non-empty string (acc_norm divides by its "
                             f"length)")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"item {self.id!r}: gold={self.gold} is out of range for {len(self.choices)} choices "
                             f"(0..{len(self.choices) - 1})")


@dataclass(frozen=True)
class MCScore:
    """lm-eval's per-item result: each choice's log-likelihood and is_greedy, both predictions, 0/1 scores."""

    id: str
    logprobs: tuple[float, ...]
    greedy: tuple[bool, ...]
    pred: int
    pred_norm: int
    acc: float
    acc_norm: float


def argmax(values: Sequence[float]) -> int:
    """The index of the largest value, the first on a tie (``np.argmax``'s rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def predictions(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """``(pred, pred_norm)``: argmax of the summed log-likelihoods, and of them divided by ``len(choice)``."""
    return argmax(logprobs), argmax([ll / float(len(c)) for ll, c in zip(logprobs, choices, strict=True)])


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, prefix_id: int | None = None
                ) -> tuple[list[int], list[int]]:
    """lm-eval's split of ``(context, continuation)`` into token ids (``LM.loglikelihood`` and ``_encode_pair``)."""
    if context == "":
        cont = tokenizer.encode_ordinary(continuation)
        prefix_id = default_prefix_id(tokenizer) if prefix_id is None else prefix_id
        # lm-eval: condition on the prefix token, unless the continuation already starts with it
        return ([prefix_id], cont) if not cont or prefix_id != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:  # "Answer: " + "Paris" -> "Answer:" + " Paris": the space belongs to the word's token
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode_ordinary(context + continuation)
    context_enc = tokenizer.encode_ordinary(context)
    return context_enc, whole[len(context_enc):]


def score_items(model: GPT, tokenizer: Tokenizer, items: Sequence[MCItem], batch_size: int = 32,
                delimiter: str = " ", prefix_id: int | None = None) -> list[MCScore]:
    """Score every item as lm-eval's ``multiple_choice`` output type does, with all requests in one batched call.

    ``delimiter`` is lm-eval's ``target_delimiter``; ``prefix_id`` (default ``<|endoftext|>``, or a newline:
    ``likelihood.default_prefix_id``) conditions a choice whose context is empty. Raises ``ValueError`` naming
    the item for a context of only whitespace, a choice that adds no token, or one longer than the model's context.
    """
    if not items:
        raise ValueError("score_items needs at least one item")
    prefix_id = default_prefix_id(tokenizer) if prefix_id is None else prefix_id
    requests = []
    for item in items:
        for k, choice in enumerate(item.choices):
            if item.context and not item.context.strip():
                raise ValueError(f"item {item.id!r}: the context is only whitespace; use an empty context or text")
            context_enc, cont_enc = encode_pair(tokenizer, item.context, delimiter + choice, prefix_id)
            if not cont_enc:
                raise ValueError(f"item {item.id!r} choice {k}: the choice adds no token after the context (it merged "
                                 f"into the context's tokens); change the delimiter or the text")
            if len(cont_enc) > model.cfg.context_length:
                raise ValueError(f"item {item.id!r} choice {k}: {len(cont_enc)} tokens do not fit the model's "
                                 f"context_length={model.cfg.context_length}, even with the context cut away")
            requests.append((context_enc, cont_enc))
    results = iter(loglikelihoods(model, requests, batch_size))
    scores = []
    for item in items:
        lls, greedy = zip(*(next(results) for _ in item.choices), strict=True)
        pred, pred_norm = predictions(lls, item.choices)
        scores.append(MCScore(item.id, tuple(lls), tuple(greedy), pred, pred_norm,
                              float(pred == item.gold), float(pred_norm == item.gold)))
    return scores


def accuracy(scores: Sequence[MCScore], draws: int = 1000, seed: int = 0, level: float = 0.95
             ) -> dict[str, tuple[float, float, float]]:
    """``{"acc": (mean, low, high), "acc_norm": (...)}``: the means with percentile bootstrap intervals over items."""
    if not scores:
        raise ValueError("accuracy needs at least one score")
    return {name: bootstrap_ci([getattr(s, name) for s in scores], draws=draws, seed=seed, level=level)
            for name in ("acc", "acc_norm")}
