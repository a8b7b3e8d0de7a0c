"""Chapter 9's exercise checks: each passes the solution, reports the starter as not attempted, names typical mistakes.

The solutions below are those of solutions/09_sft.md, with one typical mistake
switched on by name; the check must name each. All on a 300-token tokenizer and
models of ~100k parameters: seconds.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from exercise_helpers import starter as _starter
from torch import nn

from llmbook.exercises import ch09
from llmbook.posttrain.masking import IGNORE_INDEX
from llmbook.posttrain.templates import ALPACA, CHATML, Message

# ---------------------------------------------------------------------------------------------- 9.1


def _mask(tokenizer, messages, template, pad_to=None, mistake=None):
    """The solution's mask_labels, with one typical mistake switched on by name."""
    segments = template.segments(messages)
    last_reply = max(i for i, s in enumerate(segments) if s.kind == "content" and s.train)
    input_ids, labels = [], []
    for i, segment in enumerate(segments):
        if segment.kind == "markup" and mistake == "encode_default":  # tiktoken's default refuses special text
            ids = tokenizer.encode(segment.text)
        elif segment.kind == "markup" and mistake != "special_as_text":
            ids = tokenizer.encode(segment.text, allowed_special=set(template.special_tokens))
        else:
            ids = tokenizer.encode_ordinary(segment.text)
        train = segment.train
        if mistake == "prompt":
            train = True
        elif mistake == "end_token":  # only the reply's words, not the token that ends it
            train = segment.train and segment.kind == "content"
        elif mistake == "last_reply_only":
            train = segment.train and i >= last_reply
        elif mistake == "newline":  # the "\n" after <|im_end|> labelled as part of the reply
            train = segment.train or (i > 0 and segments[i - 1].train and segments[i - 1].kind == "markup")
        input_ids += ids
        labels += ids if train else [IGNORE_INDEX] * len(ids)
    pad_id = tokenizer.special_tokens["<|endoftext|>"]
    if pad_to is not None and mistake != "no_pad":
        n_pad = pad_to - len(input_ids)
        input_ids += [pad_id] * n_pad
        labels += ([pad_id] if mistake == "pad_loss" else [IGNORE_INDEX]) * n_pad
    if mistake == "pad_by_id":  # masks the pads by id, and with them Alpaca's real end token
        labels = [IGNORE_INDEX if i == pad_id else label for i, label in zip(input_ids, labels, strict=True)]
    if mistake == "shift":
        labels = labels[1:] + [IGNORE_INDEX]
    return input_ids, labels


def test_mask_solution_passes_and_starter_is_not_attempted(capsys):
    ch09.check_mask_labels(_mask)
    ch09.check_mask_labels(_starter)
    out = capsys.readouterr().out
    assert "Exercise 9.1: all checks passed" in out and "Exercise 9.1: not attempted yet" in out
    with pytest.raises(NotImplementedError):
        ch09.check_mask_labels.strict(_starter)


def test_mask_reference_is_tokenize_example_padded():
    tokenizer = ch09.chat_tokenizer()
    messages = [Message("user", "Name a primary colour."), Message("assistant", "Red.")]
    ids, labels = ch09.reference_mask(tokenizer, messages, ALPACA, pad_to=200)
    end = tokenizer.special_tokens["<|endoftext|>"]
    n = len(ch09.reference_mask(tokenizer, messages, ALPACA)[0])
    assert len(ids) == len(labels) == 200 and ids[n:] == [end] * (200 - n) and labels[n:] == [-100] * (200 - n)
    assert labels[n - 1] == end  # the real end token carries loss, the pads with the same id do not
    chatml_ids, _ = ch09.reference_mask(tokenizer, messages, CHATML)
    assert chatml_ids.count(tokenizer.special_tokens["<|im_start|>"]) == 2  # one id per special token


@pytest.mark.parametrize(("mistake", "hint"), [
    ("prompt", "labels on the prompt"),
    ("end_token", "must carry loss, or the model never learns to stop"),
    ("shift", "shifted by one position"),
    ("special_as_text", "special tokens are missing"),
    ("encode_default", "allowed_special=set(template.special_tokens)"),
    ("pad_by_id", "mask the pads by position"),
    ("pad_loss", "the padding carries loss"),
    ("last_reply_only", "not only the last one"),
    ("newline", "the newline after '<|im_end|>'"),
    ("no_pad", "pad the example to pad_to="),
])
def test_mask_mistakes_are_named(mistake, hint):
    with pytest.raises(AssertionError) as info:
        ch09.check_mask_labels.strict(functools.partial(_mask, mistake=mistake))
    assert hint in str(info.value), str(info.value)
    assert "\n" not in str(info.value)  # one line


def test_mask_wrong_return_types_are_one_line():
    with pytest.raises(AssertionError, match="forget `return input_ids, labels`"):
        ch09.check_mask_labels.strict(lambda *args: None)
    with pytest.raises(AssertionError, match="two lists of ints"):
        ch09.check_mask_labels.strict(lambda t, m, template, pad_to: (["a"], [1]))
    tensors = lambda *args: tuple(torch.tensor(x) for x in _mask(*args))  # noqa: E731
    ch09.check_mask_labels.strict(tensors)  # tensors are accepted too


@pytest.mark.parametrize("check", [ch09.check_mask_labels, ch09.check_my_apply_lora])
def test_a_constant_answer_fails_in_one_line(check):
    with pytest.raises(AssertionError) as info:
        check.strict(lambda *args, **kwargs: 0)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- 9.2


def _lora_class(mistake=None):
    """The solution's MyLoRALinear, with one typical mistake switched on by name."""

    class MyLoRALinear(nn.Module):
        def __init__(self, base, r, alpha, dropout=0.0):
            super().__init__()
            self.base = base
            self.r, self.alpha = r, alpha
            self.scale = {"r_over_alpha": r / alpha, "no_scale": 1.0}.get(mistake, alpha / r)
            if mistake != "base_trainable":
                for p in base.parameters():
                    p.requires_grad_(False)
            n_in, n_out = base.in_features, base.out_features
            if mistake == "transposed":
                self.lora_A = nn.Parameter(torch.empty(n_in, r))
                self.lora_B = nn.Parameter(torch.zeros(r, n_out))
            else:
                self.lora_A = nn.Parameter(torch.empty(r, n_in))
                self.lora_B = nn.Parameter(torch.zeros(n_out, r))
            if mistake == "a_zero":
                nn.init.zeros_(self.lora_A)
            elif mistake == "a_normal":
                nn.init.normal_(self.lora_A)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if mistake == "b_random":
                nn.init.normal_(self.lora_B, std=0.02)
            self.dropout = nn.Dropout(dropout)
            self.merged = False

        def forward(self, x):
            if mistake == "dropout_output":  # dropout on the whole output instead of the low-rank path's input
                y = self.base(x)
                return y if self.merged else self.dropout(y + (x @ self.lora_A.T @ self.lora_B.T) * self.scale)
            y = x @ self.base.weight.T if mistake == "no_bias" else self.base(x)
            if self.merged and mistake != "merged_forward_adds":
                return y
            return y + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale

        def _delta(self, scaled=True):
            return (self.lora_B @ self.lora_A) * (self.scale if scaled else 1.0)

        def merge(self):
            if mistake == "merge_grad":  # no torch.no_grad(): autograd refuses
                self.base.weight += self._delta()
                return self
            with torch.no_grad():
                if not self.merged or mistake == "merge_twice":
                    self.base.weight += self._delta(scaled=mistake != "merge_no_scale")
                    self.merged = True
            return self

        def unmerge(self):
            with torch.no_grad():
                if self.merged and mistake != "unmerge_noop":
                    self.base.weight -= self._delta(scaled=mistake != "unmerge_no_scale")
                    self.merged = False
            return self

    return MyLoRALinear


def _apply(model, targets, r, alpha, dropout=0.0, mistake=None):
    """The solution's my_apply_lora (with the class's mistake, or one of its own)."""
    cls = _lora_class(mistake)
    if mistake != "rest_trainable":
        for p in model.parameters():
            p.requires_grad_(False)
    if mistake == "exact_names":  # "qkv" compared with the full name "blocks.0.attn.qkv": nothing matches
        chosen = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n in targets]
    else:
        chosen = [n for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cls(getattr(parent, child), r, alpha, dropout))
    return None if mistake == "no_return" else model


def test_lora_solution_passes_and_starter_is_not_attempted(capsys, seed_and_one_thread):
    ch09.check_my_apply_lora(_apply)
    ch09.check_my_apply_lora(_starter)
    out = capsys.readouterr().out
    assert "Exercise 9.2: all checks passed" in out and "Exercise 9.2: not attempted yet" in out
    with pytest.raises(NotImplementedError):
        ch09.check_my_apply_lora.strict(_starter)


def test_lora_starter_with_only_the_class_missing_is_not_attempted(capsys):
    class Stub(nn.Module):
        def __init__(self, *args, **kwargs):
            raise NotImplementedError("your solution goes here")

    def apply(model, targets, r, alpha, dropout=0.0):
        for name in [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(targets)]:
            Stub(model.get_submodule(name), r, alpha, dropout)
        return model

    ch09.check_my_apply_lora(apply)
    assert "Exercise 9.2: not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize(("mistake", "hint"), [
    ("r_over_alpha", "scaled by r / alpha"),
    ("no_scale", "is not scaled: multiply it by alpha / r"),
    ("b_random", "lora_B is not zero"),
    ("a_zero", "lora_A is zero too"),
    ("a_normal", "kaiming_uniform_"),
    ("transposed", "A and B are transposed"),
    ("base_trainable", "base.weight still requires a gradient"),
    ("rest_trainable", "outside the adapters still train"),
    ("no_bias", "bias is missing"),
    ("dropout_output", "dropout applies to the low-rank path's input only"),
    ("merge_no_scale", "merge() added B A without the scale"),
    ("merge_twice", "a second merge() changed base.weight"),
    ("merge_grad", "under torch.no_grad()"),
    ("merged_forward_adds", "must not add the low-rank path again"),
    ("unmerge_noop", "unmerge() left the merged weight"),
    ("unmerge_no_scale", "subtracted B A without the scale"),
    ("exact_names", "plain nn.Linear"),
    ("no_return", "return the model"),
])
def test_lora_mistakes_are_named(mistake, hint):
    with pytest.raises(AssertionError) as info:
        ch09.check_my_apply_lora.strict(functools.partial(_apply, mistake=mistake))
    assert hint in str(info.value), str(info.value)
