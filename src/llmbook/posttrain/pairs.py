"""Preference pairs: a prompt, a ``chosen`` and a ``rejected`` response, tokenized side by side.

Reward models and DPO learn from comparisons, not from answers: "for this
prompt, this response is better than that one". The book's pairs come from two places:

    polite      ``instruction-data-with-preference.json``: 1,100 Alpaca prompts, each with a polite
                ``chosen`` and an impolite ``rejected`` answer (Raschka's chapter 7 data)
    on-policy   samples of the SFT model itself on Chapter 9's verifiable task: chosen passes the
                checker, rejected fails it (``llmbook.posttrain.onpolicy``)

A pair is tokenized as two SFT examples that share the prompt's ids (labels -100
on the prompt, so only the responses' tokens count), and a batch of pairs is
one padded batch with the chosen rows first and the rejected rows after: one
forward pass scores both, as TRL's ``concatenated_forward`` does.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

from llmbook import data
from llmbook.bpe.tokenizer import Tokenizer
from llmbook.posttrain.collate import Batch, collate
from llmbook.posttrain.instructions import SPLIT_FRACTIONS, SPLIT_SEED
from llmbook.posttrain.masking import Example, tokenize_example
from llmbook.posttrain.templates import Message, Template


@dataclass(frozen=True)
class PreferencePair:
    """The user's side of a conversation and two answers to it, ``chosen`` preferred to ``rejected``."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str

    def __post_init__(self) -> None:
        if not self.prompt or any(m.role != "user" for m in self.prompt):
            raise ValueError("a preference pair's prompt is one or more user messages (the answers are separate)")
        for side in ("chosen", "rejected"):
            if not isinstance(getattr(self, side), str) or not getattr(self, side).strip():
                raise ValueError(f"a preference pair has an empty {side} response; drop the pair, there is nothing "
                                 "to compare")
        if self.chosen.strip() == self.rejected.strip():
            raise ValueError("a preference pair has the same chosen and rejected response: it teaches nothing "
                             "(its DPO loss is log 2 whatever the model); drop it")

    def messages(self, side: str) -> list[Message]:
        """The whole conversation with the ``"chosen"`` or the ``"rejected"`` answer."""
        if side not in ("chosen", "rejected"):
            raise ValueError(f"side is 'chosen' or 'rejected', got {side!r}")
        return [*self.prompt, Message("assistant", getattr(self, side))]


def pair_from_record(record: dict[str, str]) -> PreferencePair:
    """An ``instruction-data-with-preference.json`` record (instruction, input, chosen, rejected) as a pair."""
    missing = [k for k in ("instruction", "chosen", "rejected") if not isinstance(record.get(k), str)]
    if missing:
        raise ValueError(f"a preference record needs the strings instruction, chosen and rejected; {missing} "
                         f"missing (keys: {sorted(record)})")
    prompt = [Message("user", record["instruction"])]
    if record.get("input"):
        prompt.append(Message("user", record["input"]))
    return PreferencePair(tuple(prompt), record["chosen"], record["rejected"])


def load_polite_records() -> list[dict[str, str]]:
    """The 1,100 records of ``instruction-data-with-preference.json``, checked against the data registry."""
    records = json.loads(data.path("instruction-data-with-preference").read_text(encoding="utf-8"))
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError("instruction-data-with-preference.json is not a list of records")
    return records


def polite_split(seed: int = SPLIT_SEED) -> tuple[list[PreferencePair], list[PreferencePair], list[PreferencePair]]:
    """Train, validation and test pairs: shuffled once with ``seed``, cut 85 / 5 / 10 % like Chapter 9's split.

    A record whose chosen and rejected answers are the same text is dropped
    first (it carries no preference): 6 of the 1,100 are (a test counts them).
    """
    records = load_polite_records()
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    pairs = []
    for i in order:
        try:
            pairs.append(pair_from_record(records[i]))
        except ValueError as exc:
            if "same chosen and rejected" not in str(exc):
                raise
    n_train = int(SPLIT_FRACTIONS[0] * len(pairs))
    n_val = int(SPLIT_FRACTIONS[1] * len(pairs))
    return pairs[:n_train], pairs[n_train:n_train + n_val], pairs[n_train + n_val:]


@dataclass
class TokenizedPair:
    """A pair as two SFT examples with the same prompt ids; labels -100 on the prompt."""

    chosen: Example
    rejected: Example


def tokenize_pair(tokenizer: Tokenizer, pair: PreferencePair, template: Template, max_len: int) -> TokenizedPair:
    """Both conversations of ``pair`` through Chapter 9's ``tokenize_example`` (content encoded as ordinary text).

    A side longer than ``max_len`` is a ValueError: truncating one answer
    and not the other would compare a cut answer with a whole one.
    """
    sides = [tokenize_example(tokenizer, pair.messages(side), template, max_len, special_in_content="ordinary")
             for side in ("chosen", "rejected")]
    return TokenizedPair(*sides)


def tokenize_pairs(
    tokenizer: Tokenizer, pairs: Sequence[PreferencePair], template: Template, max_len: int,
) -> tuple[list[TokenizedPair], int]:
    """The pairs whose both sides fit ``max_len`` tokens, and how many were dropped for being longer."""
    out, dropped = [], 0
    for pair in pairs:
        try:
            out.append(tokenize_pair(tokenizer, pair, template, max_len))
        except ValueError as exc:
            if "more than max_len" not in str(exc):
                raise
            dropped += 1
    return out, dropped


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> Batch:
    """One right-padded batch of ``2 * len(pairs)`` rows: every chosen row, then every rejected row.

    ``sequence_logprobs(model, batch)`` of it splits with ``.chunk(2)`` into
    the chosen and the rejected log-probabilities, pair by pair.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
