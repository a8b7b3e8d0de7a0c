"""New special tokens: new ids in the tokenizer, new rows in the model's embedding and output head.

A chat template's markers (``<|im_start|>``, ``<|im_end|>``) must be single
tokens that no text can spell, so they are added to a trained tokenizer as
special tokens with new ids after the last one, and the model gets a row for
each new id in its input embedding ``tok_emb`` and its output head ``lm_head``
(one matrix when they are tied, as in GPT-2):

    tokenizer   ids 0 .. V-1   +  <|im_start|> = V, <|im_end|> = V+1
    tok_emb     (V, C)         -> (V+2, C), rows 0 .. V-1 copied bit for bit
    lm_head     (V, C)         -> (V+2, C), the same

How to fill the new rows matters more than it looks. A random row (the
N(0, 0.02) of pretraining) gives the new token a logit h·w_new unrelated to
the others; in a trained model where the real logits are spread out that can
be anything, and the first SFT steps spend themselves undoing it. Hewitt
(2021, "Initializing new word embeddings for pretrained language models",
https://nlp.stanford.edu/~johnhew/vocab-expansion.html) proposes the mean of
the existing rows: the new logit is then the mean of the old logits, and since
exp(mean) <= mean(exp) (Jensen), each new token takes at most 1/V of the old
probability mass and every old token's log-probability drops by at most
log(1 + k/V) for k new tokens. The model is unchanged on old text, to within
that. Hugging Face's ``resize_token_embeddings(mean_resizing=True)`` does this by
default since 2024 (read in transformers 5.23's ``modeling_utils.py``: it samples
from N(mean, 1e-9·covariance), the mean in all but name, and cites Hewitt),
and Stanford Alpaca's ``train.py`` (``smart_tokenizer_and_embedding_resize``)
gave its new pad token the mean input and output rows in 2023.
``tests/test_vocab_resize.py`` checks the bound.

A model's vocabulary is often padded: GPT-2's 50257 tokens get 50304 rows (a
multiple of 64, for faster matmuls), and ids 50257.. are never used. New
tokens take over unused rows first, and the row count is padded the same way
after resizing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from llmbook.bpe.tokenizer import Tokenizer
from llmbook.model import GPT


def add_special_tokens(tokenizer: Tokenizer, tokens: Sequence[str]) -> Tokenizer:
    """A copy of ``tokenizer`` with ``tokens`` as special tokens, the new ones at ids ``vocab_size``, ``+1``, ...

    Tokens it already has as special tokens keep their ids, so adding twice is
    harmless. Like any special token they are encoded only when the caller
    allows them (tiktoken's contract): ``tok.encode(text, allowed_special={"<|im_end|>"})``.
    """
    for token in tokens:
        if not isinstance(token, str) or not token:
            raise ValueError(f"special tokens are non-empty strings, got {token!r}")
    specials = dict(tokenizer.special_tokens)
    next_id = tokenizer.vocab_size
    for token in dict.fromkeys(tokens):
        if token not in specials:
            specials[token] = next_id
            next_id += 1
    return Tokenizer(tokenizer.vocab, tokenizer.merges, specials, tokenizer.pattern, tokenizer.name)


def padded_vocab_size(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple: ``padded_vocab_size(50257, 64) == 50304``."""
    return -(-n // multiple) * multiple


def _new_rows(old: torch.Tensor, n_used: int, new_vocab_size: int, n_rows: int, init: str) -> torch.Tensor:
    """``old`` copied bit for bit, then rows ``n_used .. new_vocab_size-1`` and ``len(old) ..`` filled by ``init``."""
    new = torch.empty(n_rows, old.shape[1], dtype=old.dtype, device=old.device)
    new[: len(old)] = old
    fill = torch.cat([torch.arange(n_used, new_vocab_size), torch.arange(max(len(old), new_vocab_size), n_rows)])
    if init == "mean":
        # computed in float32 (bfloat16 sums lose digits), then stored in the table's dtype
        new[fill] = old[:n_used].float().mean(dim=0).to(old.dtype)
    else:  # "normal": as GPT._init_weights draws every embedding at the start of pretraining
        new[fill] = torch.randn(len(fill), old.shape[1], dtype=old.dtype, device=old.device) * 0.02
    return new


@torch.no_grad()
def resize_token_embeddings(
    model: GPT,
    new_vocab_size: int,
    init: Literal["mean", "normal"] = "mean",
    n_used: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> GPT:
    """Give ``model`` rows for ids up to ``new_vocab_size - 1`` (in place; returns the model).

    ``n_used`` is how many rows hold trained tokens (the old tokenizer's
    ``vocab_size``; default: all of the model's rows). Rows
    ``n_used .. new_vocab_size-1`` are the new tokens and get ``init`` ("mean"
    of the used rows, see the module docstring, or "normal"); every other old
    row is kept bit for bit, the padding rows too (pretraining, where they are
    never a target, taught the output head to give them little probability).
    The row count is ``new_vocab_size`` rounded up to ``pad_to_multiple_of``
    and never less than before; by default the multiple is 64 if the model's
    row count already is one (it was padded), else 1. Rows added beyond the old
    ones for padding get ``init`` too, and so some probability: generation
    should only sample ids below the tokenizer's ``vocab_size``. A tied model
    keeps one shared matrix. The config's ``vocab_size`` follows, so checkpoints
    record the new size. Parameters are new tensors: build the optimizer after.
    """
    cfg = model.cfg
    old_rows = cfg.vocab_size
    n_used = old_rows if n_used is None else n_used
    if not 0 < n_used <= old_rows:
        raise ValueError(f"n_used must be in 1..{old_rows} (the model's rows), got {n_used}")
    if new_vocab_size < n_used:
        raise ValueError(
            f"new_vocab_size={new_vocab_size} is smaller than the {n_used} rows in use: "
            f"resizing only adds tokens, it never drops trained ones"
        )
    if init not in ("mean", "normal"):
        raise ValueError(f"init must be 'mean' or 'normal', got {init!r}")
    if pad_to_multiple_of is None:
        pad_to_multiple_of = 64 if old_rows % 64 == 0 else 1
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
    n_rows = max(padded_vocab_size(new_vocab_size, pad_to_multiple_of), old_rows)
    trainable = model.tok_emb.weight.requires_grad, model.lm_head.weight.requires_grad

    emb = _new_rows(model.tok_emb.weight, n_used, new_vocab_size, n_rows, init)
    model.tok_emb = nn.Embedding(n_rows, cfg.d_model, _weight=emb)
    model.tok_emb.weight.requires_grad_(trainable[0])
    if cfg.tied_embeddings:
        head = model.tok_emb.weight  # still one matrix: new rows are both the new input and the new output
    else:
        head = nn.Parameter(_new_rows(model.lm_head.weight, n_used, new_vocab_size, n_rows, init))
        head.requires_grad_(trainable[1])
    model.lm_head.weight = head
    model.lm_head.out_features = n_rows
    model.cfg = dataclasses.replace(cfg, vocab_size=n_rows)
    return model
