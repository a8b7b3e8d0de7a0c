"""Static batching: requests go through in fixed batches, each batch runs until its longest request is done.

The simplest way to serve many requests with one model is Chapter 4's batched
``generate``: take ``batch_size`` prompts, pad them on the left so that their
last tokens line up, and decode the batch step by step. It wastes work twice:

    padding       a 5-token prompt batched with a 40-token one is fed 35 pad tokens at prefill
    finished rows a request that wanted 8 tokens keeps its row while its neighbour generates 100;
                  every step still computes (and throws away) a token for it

and it makes requests wait: one that arrives while a batch runs waits for the
whole batch, and every request of a batch is done only when its longest one is.
``static_generate`` measures all three: the padded and idle token slots, and
each request's time to first token and finish time. Continuous batching
(``scheduler.py``) removes the waste by scheduling per step instead of per batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from llmbook.generate import _steps
from llmbook.model import GPT


@dataclass
class StaticResult:
    """What ``static_generate`` produced and what it wasted; times in seconds since the call began."""

    tokens: list[list[int]]  # new tokens per request, in request order (through a stop token, if any)
    first_token_times: list[float]  # when each request's first new token was ready
    finish_times: list[float]  # when each request's last token was ready (its own end, not its batch's)
    padding_slots: int  # pad tokens fed at prefill: sum over batches of (longest prompt - prompt) per row
    idle_slots: int  # decode slots of rows that had already finished while their batch ran on
    useful_slots: int  # prompt tokens + generated tokens: the work that was asked for
    steps: int  # decoding steps, summed over batches
    elapsed: float

    @property
    def wasted_slots(self) -> int:
        """Token slots computed for nothing: padding plus finished rows."""
        return self.padding_slots + self.idle_slots

    @property
    def waste_fraction(self) -> float:
        return self.wasted_slots / max(1, self.wasted_slots + self.useful_slots)


def static_generate(
    model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], batch_size: int,
    stop_tokens: Sequence[int] = (), vocab_size: int | None = None,
) -> StaticResult:
    """Greedy generation of ``prompts`` in consecutive batches of ``batch_size`` (left-padded, ``llmbook.generate``).

    ``max_new_tokens`` is one number or one per request; a batch runs until
    every request in it has its tokens or its stop token, i.e. as long as its
    longest request. Each request's tokens equal ``generate(model, [prompt], n,
    temperature=0, stop_tokens=...)`` alone: the padding is masked.
    """
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts: give at least one")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    wanted = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(wanted) != len(prompts):
        raise ValueError(f"max_new_tokens has {len(wanted)} numbers for {len(prompts)} prompts; give one per prompt")
    stop = set(int(t) for t in stop_tokens)
    n = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(n)]
    first, finish = [0.0] * n, [0.0] * n
    padding = idle = steps = 0
    start = time.perf_counter()
    for b0 in range(0, n, batch_size):
        rows = list(range(b0, min(n, b0 + batch_size)))
        batch = [prompts[i] for i in rows]
        longest = max((len(p) for p in batch), default=0)
        padding += sum(longest - len(p) for p in batch)
        done = [wanted[i] == 0 for i in rows]
        for i in rows:
            if wanted[i] == 0:
                first[i] = finish[i] = time.perf_counter() - start
        if all(done):
            continue
        # the stop tokens are handled here (per-request lengths differ), so _steps is told none
        for token, _ in _steps(model, batch, max(wanted[i] for i in rows), temperature=0.0, vocab_size=vocab_size):
            now = time.perf_counter() - start
            steps += 1
            for j, (i, tok) in enumerate(zip(rows, token.tolist(), strict=True)):
                if done[j]:
                    idle += 1
                    continue
                if not tokens[i]:
                    first[i] = now
                tokens[i].append(tok)
                if tok in stop or len(tokens[i]) >= wanted[i]:
                    done[j], finish[i] = True, now
            if all(done):
                break  # closes the generator, which puts the model back in its mode
    useful = sum(len(p) for p in prompts) + sum(len(t) for t in tokens)
    return StaticResult(tokens, first, finish, padding, idle, useful, steps, time.perf_counter() - start)
