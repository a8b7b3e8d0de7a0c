"""Perplexity and bits per byte over a set of documents, each scored whole with a sliding window.

A document's log-likelihood ``log p(text)`` is the sum over its tokens of ``log p(token | tokens before)``,
the first token conditioned on a prefix token (``<|endoftext|>``: "a document starts here"). Two ways to
report it:

- **perplexity** ``exp(nats / tokens)``: the model is as unsure as a uniform choice among that many tokens.
  It depends on the tokenizer: a tokenizer with longer tokens has fewer, harder predictions.
- **bits per byte** ``nats / ln 2 / utf8_bytes``: the code length the model would compress the text to,
  per byte of text. The bytes do not depend on the tokenizer, so it compares models with different
  vocabularies on the same text (lm-eval's ``bits_per_byte`` for ``loglikelihood_rolling`` tasks is the
  same number).

Long documents are scored with ``likelihood.rolling_windows``; ``stride`` sets how much context the first
tokens of each window get, at a compute cost of about ``window / stride`` forwards per window of text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from llmbook.bpe.tokenizer import Tokenizer
from llmbook.evaluation.bootstrap import bootstrap_ratio_ci
from llmbook.evaluation.likelihood import default_prefix_id, loglikelihoods, rolling_windows
from llmbook.model import GPT


@dataclass(frozen=True)
class BPBResult:
    """Per text: ``nats`` (``-log p(text)``, positive), UTF-8 ``bytes`` and ``tokens``; how it was scored."""

    nats: list[float]
    bytes: list[int]
    tokens: list[int]
    window: int
    stride: int
    prefix_id: int

    @property
    def bpb(self) -> float:
        """Bits per byte over all the texts together: total nats / ln 2 / total bytes."""
        return sum(self.nats) / math.log(2) / sum(self.bytes)

    @property
    def nats_per_token(self) -> float:
        return sum(self.nats) / sum(self.tokens)

    @property
    def perplexity(self) -> float:
        """Per-token perplexity, ``exp(total nats / total tokens)``: depends on the tokenizer, unlike bpb."""
        return math.exp(self.nats_per_token)

    def interval(self, draws: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
        """``(low, high)`` of bits per byte: a percentile bootstrap over texts of the ratio of sums."""
        bits = [n / math.log(2) for n in self.nats]
        _, low, high = bootstrap_ratio_ci(bits, self.bytes, draws=draws, seed=seed, level=level)
        return low, high


def bits_per_byte(model: GPT, tokenizer: Tokenizer, texts: Sequence[str], stride: int | None = None,
                  prefix_id: int | None = None, window: int | None = None, batch_size: int = 32) -> BPBResult:
    """Score every text whole (no special tokens read from the text) and return its nats, bytes and tokens.

    ``prefix_id`` conditions each text's first token (default: ``<|endoftext|>``, or a newline for a tokenizer
    without it: ``likelihood.default_prefix_id``);
    ``window`` defaults to the model's context length and ``stride`` to the window. The windows of all
    texts run as one batched ``loglikelihoods`` call.
    """
    if isinstance(texts, str):
        raise ValueError("texts must be a list of documents, not one string; wrap it: [text]")
    if not texts:
        raise ValueError("bits_per_byte needs at least one text")
    prefix_id = default_prefix_id(tokenizer) if prefix_id is None else prefix_id
    window = model.cfg.context_length if window is None else window
    if not 1 <= window <= model.cfg.context_length:
        raise ValueError(f"window must be in 1..context_length={model.cfg.context_length}, got {window}")
    stride = window if stride is None else stride
    n_bytes = [len(text.encode("utf-8")) for text in texts]
    if sum(n_bytes) == 0:
        raise ValueError("bits_per_byte needs at least one non-empty text: all texts have zero bytes")

    owner: list[int] = []  # which text each window belongs to
    requests = []
    n_tokens = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode_ordinary(text)
        n_tokens.append(len(ids))
        windows = rolling_windows(ids, prefix_id, window, stride)
        requests += windows
        owner += [i] * len(windows)
    nats = [0.0] * len(texts)
    for i, (ll, _) in zip(owner, loglikelihoods(model, requests, batch_size), strict=True):
        nats[i] -= ll
    return BPBResult(nats, n_bytes, n_tokens, window, stride, prefix_id)
