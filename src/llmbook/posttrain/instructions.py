"""The format task: 1,100 Alpaca-style instructions, split once, and how well a model keeps to the template.

A model of a million parameters cannot know what "the capital of France"
is, so ``instruction-data.json`` does not measure knowledge here. It measures
*format*: does the model answer after the template's response marker, stop
at the end-of-response token, and not run on into a new "### Instruction"
of its own making, as a base model that only continues text does.

    >>> train, val, test = instruction_split()                    # doctest: +SKIP
    >>> len(train), len(val), len(test)                           # doctest: +SKIP
    (935, 55, 110)
"""

from __future__ import annotations

import json
import random

from llmbook import data
from llmbook.posttrain.templates import Message, from_alpaca

SPLIT_FRACTIONS = (0.85, 0.05, 0.10)  # train, validation, test, as Raschka's chapter 7 splits the same file
SPLIT_SEED = 123


def load_records() -> list[dict[str, str]]:
    """The 1,100 records of ``instruction-data.json`` (instruction, input, output), checked against the registry."""
    records = json.loads(data.path("instruction-data").read_text(encoding="utf-8"))
    if not isinstance(records, list) or not all(isinstance(r, dict) and "instruction" in r for r in records):
        raise ValueError("instruction-data.json is not a list of {instruction, input, output} records")
    return records


def instruction_split(seed: int = SPLIT_SEED) -> tuple[list[dict], list[dict], list[dict]]:
    """Train, validation and test records: shuffled once with ``seed``, cut 85 / 5 / 10 %."""
    records = load_records()
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_train = int(SPLIT_FRACTIONS[0] * len(records))
    n_val = int(SPLIT_FRACTIONS[1] * len(records))
    shuffled = [records[i] for i in order]
    return shuffled[:n_train], shuffled[n_train:n_train + n_val], shuffled[n_train + n_val:]


def prompt_messages(record: dict[str, str]) -> list[Message]:
    """A record as the user's side of a conversation (its reference answer left out)."""
    return [m for m in from_alpaca(record) if m.role != "assistant"]
