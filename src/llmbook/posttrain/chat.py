"""Chatting with a fine-tuned model: the template applied, sampling until the end-of-response token.

A chat model answers because of the format it was fine-tuned on, so the prompt
at inference must be exactly what SFT showed it: the conversation rendered by
the same template with the generation prompt at the end (``<|im_start|>assistant\\n``
for ChatML), encoded segment by segment as in training
(``llmbook.posttrain.masking.encode_prompt``). Generation then stops when the
model writes the template's end token (``<|im_end|>``, or ``<|endoftext|>`` for
Alpaca) -- the token SFT taught it to write -- and that token is not part of
the reply. ``<|endoftext|>`` also stops a ChatML reply: a model that ends a
document has ended its answer too (Hugging Face generation configs list
several end-of-sequence ids for the same reason).

Three details a chat loop must get right:

- **Only real ids are sampled.** A resized model has output rows beyond the
  tokenizer's ids (padding to a multiple of 64 gets the mean init of
  ``llmbook.posttrain.vocab``, and so some probability); they stand for no text,
  so sampling is restricted to ids ``< tokenizer.vocab_size``.
- **Streaming yields whole characters.** A token is a run of bytes and a
  character of UTF-8 can be split across two tokens ("é" is 0xC3 0xA9); an
  incremental UTF-8 decoder holds a partial character until its last byte
  arrives, so every piece printed is complete text, and the pieces join to
  exactly the decoded reply.
- **The conversation must fit the context.** The prompt plus the reply must fit
  the model's ``context_length``. We drop the oldest turns (keeping the system
  message and the latest user message), as chat front-ends do, because a user
  in a long conversation wants an answer, not an error; if even the latest
  message does not fit, ``ContextError`` says so in one line. Alpaca holds
  one exchange, so only the system message and the latest user message are
  rendered (earlier turns are not part of its format).

What a user types is text, never markup: a message containing the characters
"<|im_end|>" is encoded as ordinary text (tiktoken's ``encode_ordinary``), so
typing them cannot close the user's turn and open a fake one (a prompt
injection). SFT's ``tokenize_example`` raises on such text instead, because
training data should be clean; a chat must accept whatever is typed.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from llmbook.bpe.tokenizer import Tokenizer
from llmbook.generate import stream
from llmbook.model import GPT
from llmbook.posttrain.masking import encode_prompt
from llmbook.posttrain.templates import ENDOFTEXT, Message, Template, get_template

MIN_REPLY_FRACTION = 4  # with max_new_tokens=None, at least context_length // 4 tokens are left for the reply


class ContextError(ValueError):
    """The latest message alone (with the system message) leaves no room for a reply in the model's context."""


@dataclass
class Prompt:
    """The ids to generate from, the messages they render (old turns dropped) and the reply's token budget."""

    ids: list[int]
    messages: list[Message]
    max_new_tokens: int
    dropped: int  # how many old messages did not fit


def resolve_template(template: Template | str) -> Template:
    """A ``Template`` object from itself or its name ("chatml", "alpaca")."""
    return get_template(template) if isinstance(template, str) else template


def check_tokenizer(tokenizer: Tokenizer, template: Template | str) -> None:
    """One clear line if the tokenizer lacks a special token the template needs (the model was not tuned for it)."""
    template = resolve_template(template)
    missing = [t for t in template.special_tokens if t not in tokenizer.special_tokens]
    if missing:
        others = [name for name in ("chatml", "alpaca") if name != template.name]
        raise ValueError(
            f"this tokenizer has no {missing[0]}: the model was not fine-tuned with the {template.name} template; "
            f"use --template {others[0]} if it was tuned with that, or fine-tune it first"
        )


def stop_ids(tokenizer: Tokenizer, template: Template | str) -> list[int]:
    """The ids that end a reply: the template's end token, and ``<|endoftext|>`` if the tokenizer has it."""
    template = resolve_template(template)
    check_tokenizer(tokenizer, template)
    names = dict.fromkeys([template.end_token, ENDOFTEXT])
    return [tokenizer.special_tokens[n] for n in names if n in tokenizer.special_tokens]


def _for_template(messages: list[Message], template: Template) -> list[Message]:
    """Alpaca renders one exchange: the system message (if any) and the latest user message."""
    if template.name != "alpaca":
        return messages
    system = [m for m in messages[:1] if m.role == "system"]
    users = [m for m in messages if m.role == "user"]
    return system + users[-1:]


def build_prompt(
    model: GPT, tokenizer: Tokenizer, messages: Sequence[Message], template: Template | str = "chatml",
    max_new_tokens: int | None = None,
) -> Prompt:
    """The prompt ids for the assistant's next reply, with the oldest turns dropped until the reply fits.

    ``max_new_tokens=None`` lets the reply run to the end of the context, and
    drops turns until at least ``context_length // 4`` tokens are left for it.
    The system message and the latest message are never dropped; if they
    alone leave too little room, ``ContextError``.
    """
    template = resolve_template(template)
    messages = _for_template(list(messages), template)
    if not messages or messages[-1].role != "user":
        raise ValueError("a reply answers a user message: the conversation must end with one")
    context = model.cfg.context_length
    if max_new_tokens is not None and not 0 < max_new_tokens < context:
        raise ValueError(f"max_new_tokens must be in 1..{context - 1} (the model's context_length is {context}), "
                         f"got {max_new_tokens}")
    reserve = max_new_tokens if max_new_tokens is not None else max(1, context // MIN_REPLY_FRACTION)
    system = messages[:1] if messages[0].role == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while True:
        ids = encode_prompt(tokenizer, system + turns, template, special_in_content="ordinary")
        if len(ids) + reserve <= context:
            budget = max_new_tokens if max_new_tokens is not None else context - len(ids)
            return Prompt(ids, system + turns, budget, dropped)
        if len(turns) == 1:
            raise ContextError(
                f"the message is too long: the prompt has {len(ids)} tokens and the reply needs {reserve} more, "
                f"but the model's context holds {context}; write a shorter message"
                + (" or system prompt" if system else "") + " or ask for fewer new tokens"
            )
        turns.pop(0)  # the oldest turn goes; a reply without its question goes with it
        dropped += 1
        while turns[0].role == "assistant":
            turns.pop(0)
            dropped += 1


def stream_reply(
    model: GPT, tokenizer: Tokenizer, messages: Sequence[Message], template: Template | str = "chatml",
    max_new_tokens: int | None = None, temperature: float = 0.7, top_k: int | None = None,
    top_p: float | None = None, generator: torch.Generator | None = None,
) -> Iterator[str]:
    """Yield the assistant's reply as text pieces as they are generated, each a run of whole characters.

    The pieces join to ``reply(...)`` with the same arguments (and the same
    seeded ``generator``). Sampling stops at the end token, which is not
    yielded, or after ``max_new_tokens`` (None: the rest of the context).
    """
    template = resolve_template(template)
    stops = stop_ids(tokenizer, template)
    prompt = build_prompt(model, tokenizer, messages, template, max_new_tokens)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tokens = stream(model, prompt.ids, prompt.max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    stop_tokens=stops, generator=generator, vocab_size=tokenizer.vocab_size)
    try:
        for token in tokens:
            if token in stops:
                break
            piece = decoder.decode(tokenizer.token_bytes(token))
            if piece:
                yield piece
    finally:
        tokens.close()  # hands the model back in the mode it came in, even if the caller stops early
    rest = decoder.decode(b"", final=True)  # an unfinished character at the end becomes U+FFFD, as decode() does
    if rest:
        yield rest


def reply(
    model: GPT, tokenizer: Tokenizer, messages: Sequence[Message], template: Template | str = "chatml",
    max_new_tokens: int | None = None, temperature: float = 0.7, top_k: int | None = None,
    top_p: float | None = None, generator: torch.Generator | None = None,
) -> str:
    """The assistant's next reply to ``messages`` (ending with a user message), without its end token.

    ``temperature=0`` is greedy; pass a seeded ``generator`` for reproducible
    sampling. Old turns that do not fit the context are dropped (see
    ``build_prompt``).

    >>> reply(model, tok, [Message("user", "Name a colour.")], temperature=0)  # doctest: +SKIP
    'Red.'
    """
    return "".join(stream_reply(model, tokenizer, messages, template, max_new_tokens, temperature, top_k, top_p,
                                generator))
