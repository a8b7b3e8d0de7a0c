"""A draft for speculative decoding that costs almost nothing: n-gram counts from the training data and the text so far.

Speculative decoding pays off when a draft step is much cheaper than a target
step (``speculative.expected_speedup``: tokens per round / (k·c + 1)). On a
CPU the book's one-layer neural draft still costs about a third of the
four-layer target (c ≈ 0.37), since a step's time is mostly per-layer
overhead, not arithmetic. A draft with no layers at all makes c ≈ 0.

This one is the oldest language model there is, in two parts:

1. **the text so far** ("prompt lookup", Saxena 2023): if the last n tokens
   already occurred earlier in this sequence, propose what followed them
   then. Small models repeat themselves under greedy decoding, and prose
   repeats names and phrases, so this catches much of what a target will say;
2. **the training data**: otherwise, the token that most often followed the
   last n tokens (n = 3, 2, 1: the longest context seen in training wins).

Both are dictionary lookups, microseconds each. The draft is deterministic:
its distribution q is one-hot at its proposal, which the acceptance rule
handles like any other q (accept with probability p(x); after a rejection,
draw from p with x removed), so at temperature > 0 the output still follows
the target's distribution, and at temperature 0 it equals the target's greedy
tokens. Related published drafts: REST (He et al. 2023, retrieval from a
datastore) and lookahead decoding's n-gram pool (Fu et al. 2024).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def most_frequent_next(tokens: np.ndarray, n: int) -> dict[tuple[int, ...], int]:
    """For every n tokens in a row in ``tokens``, the token that most often follows them (ties: the smallest id).

    Vectorized, as a Python loop over 0.6 M tokens would take seconds: every
    window of n + 1 tokens becomes one int64 (its ids as digits in base V),
    ``np.unique`` counts the distinct ones, and per context the most counted wins.

    >>> most_frequent_next(np.array([1, 2, 1, 2, 1, 3]), 1)  # after 1: 2 twice, 3 once
    {(1,): 2, (2,): 1}
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if n < 1:
        raise ValueError(f"the context length n must be at least 1, got {n}")
    if len(tokens) <= n:
        return {}
    base = int(tokens.max()) + 1
    if base ** (n + 1) >= 2**62:
        raise ValueError(f"{n + 1} ids below {base} do not fit in one int64; use a smaller n")
    windows = np.lib.stride_tricks.sliding_window_view(tokens, n + 1)  # (N - n, n + 1): context, then next
    keys = windows @ (base ** np.arange(n, -1, -1, dtype=np.int64))  # the context's ids are the high digits
    pairs, counts = np.unique(keys, return_counts=True)  # sorted: by context, then by next id
    contexts = pairs // base
    # per context the highest count; lexsort is stable, so on a tie the smallest next id (first in order) wins
    order = np.lexsort((-counts, contexts))
    sorted_contexts = contexts[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_contexts[1:] != sorted_contexts[:-1]
    chosen = pairs[order][first]
    rows = ((chosen[:, None] // (base ** np.arange(n, -1, -1, dtype=np.int64))) % base).tolist()  # back to ids
    return {tuple(row[:n]): row[n] for row in rows}


@dataclass
class NgramDraft:
    """An n-gram draft model: ``tables[n - 1]`` maps n context tokens to the most frequent next token in training.

    Build one with ``NgramDraft.fit(train_tokens)``; ``speculative_generate``
    accepts it wherever it accepts a neural draft. ``lookup`` (the text-so-far
    part) can be switched off to measure the two parts apart.
    """

    tables: list[dict[tuple[int, ...], int]]
    vocab_size: int
    lookup_orders: tuple[int, ...] = (3, 2)  # context lengths matched against the text so far, longest first
    lookup: bool = True

    @property
    def width(self) -> int:
        """The longest context any lookup reads."""
        return max(max(self.lookup_orders), len(self.tables))

    @classmethod
    def fit(cls, tokens: Sequence[int] | np.ndarray, order: int = 3, lookup: bool = True) -> NgramDraft:
        """Count the training tokens' n-grams for n = 1..order (a 0.6 M-token corpus takes about a second)."""
        tokens = np.asarray(tokens)
        if order < 1:
            raise ValueError(f"order must be at least 1, got {order}")
        if len(tokens) <= order:
            raise ValueError(f"an n-gram draft needs more than {order} training tokens, got {len(tokens)}")
        return cls([most_frequent_next(tokens, n) for n in range(1, order + 1)], int(tokens.max()) + 1,
                   lookup=lookup)

    def start(self, prompt: Sequence[int]) -> DraftState:
        """A fresh state for one sequence, indexed over its prompt."""
        state = DraftState(self)
        state.extend(prompt)
        return state


@dataclass
class DraftState:
    """One sequence's view of the draft: the committed tokens and, for lookup, where each n-gram last occurred."""

    draft: NgramDraft
    tokens: list[int] = field(default_factory=list)
    # seen[context] = the token that followed its latest occurrence in this sequence (contexts of every lookup order:
    # tuples of different lengths never collide)
    seen: dict[tuple[int, ...], int] = field(default_factory=dict)

    def extend(self, new: Sequence[int]) -> None:
        """Append tokens the target has accepted; index the n-grams they complete (rejected proposals never arrive)."""
        start = len(self.tokens)
        self.tokens.extend(int(t) for t in new)
        if not self.draft.lookup:
            return
        for n in self.draft.lookup_orders:
            for i in range(max(start, n), len(self.tokens)):
                self.seen[tuple(self.tokens[i - n : i])] = self.tokens[i]

    def next_token(self, context: list[int]) -> int:
        """The guess after ``context``: from the text so far, else the training counts, else the last token again."""
        if self.draft.lookup:
            for n in self.draft.lookup_orders:
                guess = self.seen.get(tuple(context[-n:])) if len(context) >= n else None
                if guess is not None:
                    return guess
        for n in range(len(self.draft.tables), 0, -1):
            guess = self.draft.tables[n - 1].get(tuple(context[-n:]))
            if guess is not None:
                return guess
        return context[-1]

    def propose(self, k: int) -> list[int]:
        """k tokens, each conditioned on the committed tokens and the proposals before it."""
        width = self.draft.width
        context = self.tokens[-width:]
        out = []
        for _ in range(k):
            token = self.next_token(context)
            out.append(token)
            context.append(token)
            if len(context) > width:
                del context[0]
        return out
