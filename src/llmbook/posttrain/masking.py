"""Tokenizing a conversation for SFT: ids, and labels that are -100 everywhere but the responses.

Pretraining learns every token. SFT wants the model to learn to *answer*, not
to write questions, so the loss is taken only on the assistant's tokens and the
token that ends them; every other label is ``IGNORE_INDEX`` (-100), which
``F.cross_entropy(..., ignore_index=-100)`` in ``GPT.forward`` skips. An Alpaca
example, one label per id (``·`` = -100):

    ids      Below is an ... ### Response:\\n  Red  .  <|endoftext|>
    labels   ·     ·  ·  ... ·   ·        ·    Red  .  <|endoftext|>

Labels sit under their own ids here (the Hugging Face convention); the shift
that makes position t predict token t+1 is done once, in
``llmbook.posttrain.collate``. The end token carries loss because stopping is
part of the answer: without it the model never learns to end and rambles on
into a new "### Instruction:". Stanford Alpaca's ``train.py`` masks the same way
(``IGNORE_INDEX`` on the prompt's tokens). ``train_on_prompt=True`` puts the loss
on every token instead, for the ablation the chapter measures (Shi et al. 2024,
"Instruction Tuning With Loss Over Instructions", report it can help when
outputs are short).

Each segment of the template is encoded on its own and the ids concatenated,
rather than encoding the whole string: a merge can then never straddle the
boundary between prompt and response (so "which tokens are the response" has
an exact answer), the prompt encodes to the same ids in training and at
inference (``encode_prompt``), and the template's markup is the only place
special tokens are allowed (content is checked or encoded as ordinary text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from llmbook.bpe.tokenizer import Tokenizer
from llmbook.posttrain.templates import Message, Segment, Template

IGNORE_INDEX = -100  # the label F.cross_entropy skips (its default ignore_index, and GPT.forward's)


@dataclass
class Example:
    """One tokenized conversation: ``labels[i]`` is ``input_ids[i]`` where it carries loss, else -100."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        """How many tokens carry loss."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def _check_tokenizer(tokenizer: Tokenizer, template: Template) -> None:
    missing = [t for t in template.special_tokens if t not in tokenizer.special_tokens]
    if missing:
        raise ValueError(
            f"the tokenizer has no special token {missing[0]!r}, which the {template.name} template needs: "
            f"add them with add_special_tokens(tokenizer, {template.special_tokens}) and resize the model "
            f"with resize_token_embeddings (llmbook.posttrain.vocab)"
        )


def encode_segments(
    tokenizer: Tokenizer, segments: Sequence[Segment], template: Template,
    special_in_content: Literal["raise", "ordinary"] = "raise",
) -> list[tuple[list[int], bool]]:
    """Each segment's ids, with whether it is part of a response."""
    _check_tokenizer(tokenizer, template)
    allowed = set(template.special_tokens)
    out = []
    for segment in segments:
        if segment.kind == "markup":
            ids = tokenizer.encode(segment.text, allowed_special=allowed)
        elif special_in_content == "ordinary":
            ids = tokenizer.encode_ordinary(segment.text)
        else:  # tiktoken's contract: special-token text in ordinary text is an error unless the caller decides
            found = [t for t in tokenizer.special_tokens if t in segment.text]
            if found:
                raise ValueError(
                    f"a message contains the text of the tokenizer's special token {found[0]!r}; remove it, or "
                    f"pass special_in_content='ordinary' to encode it as ordinary text (tiktoken's encode_ordinary)"
                )
            ids = tokenizer.encode_ordinary(segment.text)
        out.append((ids, segment.train))
    return out


def encode_prompt(
    tokenizer: Tokenizer, messages: Sequence[Message], template: Template,
    special_in_content: Literal["raise", "ordinary"] = "raise",
) -> list[int]:
    """The ids of a prompt for generation: the template with ``add_generation_prompt=True``, encoded as in SFT."""
    segments = template.segments(messages, add_generation_prompt=True, check_special=special_in_content == "raise")
    return [i for ids, _ in encode_segments(tokenizer, segments, template, special_in_content) for i in ids]


def tokenize_example(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    template: Template,
    max_len: int,
    train_on_prompt: bool = False,
    truncate: bool = False,
    special_in_content: Literal["raise", "ordinary"] = "raise",
) -> Example:
    """Ids and labels of a conversation, at most ``max_len`` tokens (the model's context length).

    Every assistant message and its end token carry loss; the rest is -100,
    or nothing is with ``train_on_prompt``. A conversation longer than
    ``max_len`` is an error, or with ``truncate=True`` loses its last tokens:
    the right side, like Hugging Face tokenizers' default ``truncation_side``,
    because the kept tokens then have exactly the
    labels and the context they had in the full example (a token only sees
    what comes before it), whereas cutting the left would remove the
    instruction the response answers. The price: the response loses its end,
    so the example no longer teaches stopping; that is why the default raises.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    messages = list(messages)
    if not any(getattr(m, "role", None) == "assistant" for m in messages):
        raise ValueError(
            "the conversation has no assistant message, so there is no response to learn from; "
            "SFT examples need one (to prompt a model, use encode_prompt)"
        )
    segments = template.segments(messages, check_special=special_in_content == "raise")
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, train in encode_segments(tokenizer, segments, template, special_in_content):
        input_ids += ids
        labels += ids if train or train_on_prompt else [IGNORE_INDEX] * len(ids)
    if len(input_ids) > max_len:
        if not truncate:
            raise ValueError(
                f"the example has {len(input_ids)} tokens, more than max_len={max_len}: drop it (filter by "
                f"length), raise max_len, or pass truncate=True to cut its end (the response loses its end token)"
            )
        input_ids, labels = input_ids[:max_len], labels[:max_len]
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError(
                f"after truncation to max_len={max_len} no response token is left: the prompt alone has "
                f"{max_len} tokens or more; drop this example"
            )
    return Example(input_ids, labels)
