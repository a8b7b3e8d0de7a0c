"""Chat templates: a conversation as one string, and that string back as a conversation.

A base model only continues text, so an instruction-tuned model is taught a
*format*: where the instruction stops and the answer starts, and a token that
ends the answer so generation knows when to stop. The format is a template
applied to a list of messages; the same template must be applied at inference,
or the model sees a prompt unlike anything it was fine-tuned on.

Two templates, one old and one current:

    ALPACA   Stanford Alpaca (Taori et al. 2023), used in Raschka's *Build a Large
             Language Model (From Scratch)*, ch. 7: plain-text headers, one exchange.

             Below is an instruction that describes a task. Write a response that
             appropriately completes the request.

             ### Instruction:
             Name a primary colour.

             ### Response:
             Red.<|endoftext|>

    CHATML   OpenAI's Chat Markup Language (used by Qwen, OpenHermes, ...): every
             message between two special tokens, any number of turns.

             <|im_start|>user
             Name a primary colour.<|im_end|>
             <|im_start|>assistant
             Red.<|im_end|>

The special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``) are
single ids that no ordinary text encodes to, so a user who types the characters
"<|im_end|>" cannot end a message: following tiktoken's contract (which
``llmbook.bpe.Tokenizer`` implements), special-token text inside a message is an
error unless the caller says to encode it as ordinary text.

A template renders ``Segment``s, not just a string: each piece says whether it
is template markup (may hold special tokens) or a message's content (ordinary
text), and whether it belongs to a response the model learns to write. That is
what ``llmbook.posttrain.masking`` needs to put -100 on the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

ENDOFTEXT = "<|endoftext|>"  # GPT-2's end-of-document token; Alpaca ends a response with the tokenizer's EOS
CHATML_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
ROLES = ("system", "user", "assistant")
ALL_SPECIAL_TOKENS = (ENDOFTEXT, *CHATML_SPECIAL_TOKENS)  # none may appear as text inside a message

# Stanford Alpaca's two prompts, verbatim from PROMPT_DICT in
# https://github.com/tatsu-lab/stanford_alpaca/blob/main/train.py (Taori et al. 2023):
#   "prompt_input":    "Below is an instruction that describes a task, paired with an input that provides further
#                       context. Write a response that appropriately completes the request.\n\n"
#                      "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
#   "prompt_no_input": "Below is an instruction that describes a task. Write a response that appropriately
#                       completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
# Stanford's train.py glues the output right after "### Response:" and ends it with the tokenizer's EOS; we put a
# newline there, as Raschka's book (ch07: format_input + f"\n\n### Response:\n{output}") and alpaca-lora's template
# do, so the answer starts a line. Raschka keeps the short preamble for records with an input too; we follow
# Stanford (a system message overrides the preamble for anyone who wants Raschka's text exactly).
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: ``Message("user", "Name a primary colour.")``."""

    role: str  # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation.

    ``markup`` pieces are the template's own text and are encoded with its
    special tokens allowed; ``content`` pieces are what someone wrote and are
    encoded as ordinary text. ``train`` marks the pieces of a response, the
    only ones that carry loss in SFT: the assistant's words and the token
    that ends them (the model must learn to stop).
    """

    text: str
    kind: Literal["markup", "content"]
    train: bool = False


def _markup(text: str, train: bool = False) -> Segment:
    return Segment(text, "markup", train)


def _content(text: str, train: bool = False) -> Segment:
    return Segment(text, "content", train)


def check_messages(messages: Sequence[Message], check_special: bool = True) -> list[Message]:
    """Messages as a list, each with a known role and, if ``check_special``, no special-token text."""
    messages = list(messages)
    for i, m in enumerate(messages):
        if not isinstance(m, Message):
            raise ValueError(
                f"message {i} is a {type(m).__name__}, not a Message(role, content): "
                f"convert a dict d with Message(**d)"
            )
        if m.role not in ROLES:
            raise ValueError(f"message {i} has the unknown role {m.role!r}; the roles are {', '.join(ROLES)}")
        found = [(m.content.find(t), t) for t in ALL_SPECIAL_TOKENS if t in m.content] if check_special else []
        if found:
            token = min(found)[1]  # the first one in the text
            raise ValueError(
                f"message {i} ({m.role}) contains the special token {token!r} as text; encoded as the "
                f"special token it would end or open a message (a prompt injection). Remove it, or "
                f"tokenize with tokenize_example(..., special_in_content='ordinary') to encode it as "
                f"ordinary text (tiktoken's encode_ordinary)"
            )
    return messages


class Template:
    """A way of writing conversations as text; subclasses say how in ``segments`` and ``parse``."""

    name: str = "template"
    special_tokens: tuple[str, ...] = ()  # the special tokens its markup uses; the tokenizer must have them
    end_token: str = ENDOFTEXT  # ends every response: generation stops when the model writes it

    def segments(
        self, messages: Sequence[Message], add_generation_prompt: bool = False, check_special: bool = True
    ) -> list[Segment]:
        raise NotImplementedError

    def apply_template(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as one string; ``add_generation_prompt`` ends it where the assistant's reply begins.

        With ``add_generation_prompt`` the conversation must not already end
        with the assistant: the string is a prompt for ``generate`` to continue.
        """
        return "".join(s.text for s in self.segments(messages, add_generation_prompt))

    def parse(self, text: str) -> list[Message]:
        """The messages of a string this template wrote: ``parse(apply_template(m)) == m``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    @staticmethod
    def _check_generation_prompt(messages: list[Message], add_generation_prompt: bool) -> None:
        if add_generation_prompt and messages and messages[-1].role == "assistant":
            raise ValueError(
                "add_generation_prompt=True asks for the assistant's next reply, but the conversation already "
                "ends with one; drop the last message or render without the generation prompt"
            )


class ChatML(Template):
    """``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, as Hugging Face's ChatML chat_template writes it.

    >>> CHATML.apply_template([Message("user", "Hi")], add_generation_prompt=True)
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """

    name = "chatml"
    special_tokens = CHATML_SPECIAL_TOKENS
    end_token = "<|im_end|>"
    _message = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n", re.DOTALL)
    _generation_prompt = "<|im_start|>assistant\n"

    def segments(
        self, messages: Sequence[Message], add_generation_prompt: bool = False, check_special: bool = True
    ) -> list[Segment]:
        messages = check_messages(messages, check_special)
        self._check_generation_prompt(messages, add_generation_prompt)
        out = []
        for m in messages:
            reply = m.role == "assistant"
            out += [
                _markup(f"<|im_start|>{m.role}\n"),
                _content(m.content, train=reply),
                _markup("<|im_end|>", train=reply),  # the reply's end token carries loss: the model learns to stop
                _markup("\n"),  # the newline after it is the next prompt's business, never generated
            ]
        if add_generation_prompt:
            out.append(_markup(self._generation_prompt))
        return [s for s in out if s.text]

    def parse(self, text: str) -> list[Message]:
        messages, at = [], 0
        while at < len(text):
            match = self._message.match(text, at)
            if match is None:
                if text[at:] == self._generation_prompt:  # a prompt made with add_generation_prompt
                    break
                raise ValueError(f"not a ChatML conversation at character {at}: {text[at:at + 40]!r}")
            role, content = match.groups()
            if role not in ROLES:
                raise ValueError(f"message {len(messages)} has the unknown role {role!r}; the roles are {ROLES}")
            messages.append(Message(role, content))
            at = match.end()
        return messages


class Alpaca(Template):
    """Stanford Alpaca's template: a preamble, ``### Instruction:``, an optional ``### Input:``, ``### Response:``.

    One exchange: an optional system message (replacing the preamble), a user
    message (the instruction), optionally a second user message (the input),
    then the assistant's reply ended by ``<|endoftext|>``. Without a system
    message the preamble is Stanford's, the "paired with an input" one when
    there is an input; ``parse`` leaves out a preamble that is the default.
    """

    name = "alpaca"
    special_tokens = (ENDOFTEXT,)
    end_token = ENDOFTEXT

    def _fields(self, messages: list[Message]) -> tuple[str | None, str, str | None, str | None]:
        """(system, instruction, input, response) of an Alpaca exchange, or a one-line error."""
        roles = [m.role for m in messages]
        rest = messages[1:] if roles[:1] == ["system"] else messages
        shape = [m.role for m in rest]
        if shape not in (["user"], ["user", "user"], ["user", "assistant"], ["user", "user", "assistant"]):
            raise ValueError(
                f"the Alpaca template holds one exchange: [system], user (instruction), [user (input)], "
                f"[assistant]; got roles {roles}. Use CHATML for longer conversations"
            )
        system = messages[0].content if roles[:1] == ["system"] else None
        response = rest[-1].content if shape[-1] == "assistant" else None
        inp = rest[1].content if shape[1:2] == ["user"] else None
        return system, rest[0].content, inp, response

    def segments(
        self, messages: Sequence[Message], add_generation_prompt: bool = False, check_special: bool = True
    ) -> list[Segment]:
        messages = check_messages(messages, check_special)
        self._check_generation_prompt(messages, add_generation_prompt)
        system, instruction, inp, response = self._fields(messages)
        if response is None and not add_generation_prompt:
            raise ValueError(
                "an Alpaca exchange without a response: add an assistant message, or pass "
                "add_generation_prompt=True to render the prompt for generation"
            )
        if system is None:
            out = [_markup(ALPACA_PREAMBLE if inp is None else ALPACA_PREAMBLE_WITH_INPUT)]
        else:
            out = [_content(system)]
        out += [_markup("\n\n### Instruction:\n"), _content(instruction)]
        if inp is not None:
            out += [_markup("\n\n### Input:\n"), _content(inp)]
        out.append(_markup("\n\n### Response:\n"))
        if response is not None:
            out += [_content(response, train=True), _markup(ENDOFTEXT, train=True)]
        return [s for s in out if s.text]

    _exchange = re.compile(
        r"(?P<system>.*?)\n\n### Instruction:\n(?P<instruction>.*?)(?:\n\n### Input:\n(?P<input>.*?))?"
        r"\n\n### Response:\n(?:(?P<response>.*)<\|endoftext\|>)?",
        re.DOTALL,
    )

    def parse(self, text: str) -> list[Message]:
        match = self._exchange.fullmatch(text)
        if match is None:
            raise ValueError(
                f"not an Alpaca exchange (a preamble, '### Instruction:', optional '### Input:', '### Response:', "
                f"and the response ended by {ENDOFTEXT!r}): {text[:60]!r}..."
            )
        system, instruction, inp, response = match.group("system", "instruction", "input", "response")
        default = ALPACA_PREAMBLE if inp is None else ALPACA_PREAMBLE_WITH_INPUT
        messages = [] if system == default else [Message("system", system)]
        messages.append(Message("user", instruction))
        if inp is not None:
            messages.append(Message("user", inp))
        if response is not None:
            messages.append(Message("assistant", response))
        return messages


ALPACA = Alpaca()
CHATML = ChatML()
TEMPLATES = {t.name: t for t in (ALPACA, CHATML)}


def get_template(name: str) -> Template:
    """``"alpaca"`` or ``"chatml"``, with a one-line error for anything else."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def apply_template(
    messages: Sequence[Message], template: Template = CHATML, add_generation_prompt: bool = False
) -> str:
    """``template.apply_template(messages, add_generation_prompt)``, as a function."""
    return template.apply_template(messages, add_generation_prompt)


def from_alpaca(record: Mapping[str, str]) -> list[Message]:
    """An ``instruction-data.json`` record as messages: the instruction, the input (if not empty), the output.

    The input stays a message of its own, so the record can be rebuilt and
    the Alpaca template can print its ``### Input:`` header (ChatML shows it as a
    second user turn):

    >>> from_alpaca({"instruction": "Add 2 and 3.", "input": "", "output": "5"})
    [Message(role='user', content='Add 2 and 3.'), Message(role='assistant', content='5')]
    """
    missing = [key for key in ("instruction", "output") if not isinstance(record.get(key), str)]
    if missing or not isinstance(record.get("input", ""), str):
        raise ValueError(
            f"an Alpaca record has the strings 'instruction', 'output' and optionally 'input'; "
            f"got keys {sorted(record)} (missing or not text: {missing or ['input']})"
        )
    messages = [Message("user", record["instruction"])]
    if record.get("input"):
        messages.append(Message("user", record["input"]))
    messages.append(Message("assistant", record["output"]))
    return messages


def to_alpaca(messages: Sequence[Message]) -> dict[str, str]:
    """The record ``from_alpaca`` made these messages from (a system message is not part of a record)."""
    _, instruction, inp, response = ALPACA._fields(check_messages(messages, check_special=False))
    return {"instruction": instruction, "input": inp or "", "output": response or ""}


# Hugging Face's ChatML chat_template (the jinja string in, e.g., the transformers docs' chat templating
# guide); tests/test_templates.py renders conversations with it through transformers' apply_chat_template
# and checks that CHATML writes the same text.
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
