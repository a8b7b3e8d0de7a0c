"""Text generation: run the model, pick a next token, append it, repeat.

The model gives a score (logit) for every token of the vocabulary; turning the
scores into one choice is the *decoding strategy*:

    greedy        argmax: always the most likely token (temperature=0); repetitive
    temperature   divide the logits by T before the softmax: T < 1 sharpens, T > 1 flattens
    top-k         sample only among the k most likely tokens
    top-p         sample only among the fewest tokens whose probabilities add up to p (nucleus sampling)

A generation step needs the keys and values of all earlier tokens. With the
KV cache of Chapter 4 each step feeds the model one new token; without it the
whole sequence is recomputed every step (``use_cache=False``), giving the same
tokens more slowly. Prompts of different lengths go through in one batch,
padded on the left so that every row's next token is in the last column.

A model's output layer can be wider than its tokenizer's vocabulary (Chapter 7
pads it to a multiple of 64 for speed). The extra ids stand for no text, so
``vocab_size`` masks them: pass the tokenizer's ``vocab_size`` and only ids it
can decode are ever chosen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from llmbook.model import GPT

_TIE_TOLERANCE = 1e-6  # probability mass this close to p counts as reaching it (float rounding)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature``: with temperature 2, logits [2, 0] (probs 0.88, 0.12) become [1, 0] (0.73, 0.27).

    Temperature 0 is greedy decoding, handled by the caller with an argmax.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive (use 0 in generate() for greedy), got {temperature}")
    return logits / temperature


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of the last dim, set the others to -inf; ``(..., V) -> (..., V)``.

    Exactly k survive; among equal logits the lower token id wins:
    [1, 3, 3, 2] with k=1 keeps [-inf, 3, -inf, -inf].
    """
    if k <= 0:
        raise ValueError(f"top_k must be at least 1, got {k}")
    if k >= logits.shape[-1]:
        return logits
    order = logits.sort(dim=-1, descending=True, stable=True).indices  # (..., V), best first, ties by id
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order[..., :k], True)
    return logits.masked_fill(~keep, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the fewest most likely tokens whose probabilities sum to at least p; the rest get -inf.

    Probabilities [0.5, 0.3, 0.1, 0.1]: p=0.75 keeps the first two (0.8 ≥ 0.75),
    p=0.5 the first only. The top token always survives, so p → 0 is greedy.
    A token is kept when the tokens ranked above it hold less than p, so the
    one that crosses p is kept; equal probabilities are ranked by token id.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # (..., V) best first
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (..., V): probability of the tokens ranked above
    keep_sorted = mass_before < p - _TIE_TOLERANCE
    keep_sorted[..., 0] = True  # the most likely token, whatever p
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)  # back to vocabulary order
    return logits.masked_fill(~keep, float("-inf"))


def mask_padding(logits: Tensor, vocab_size: int | None) -> Tensor:
    """Logits ``(..., V)`` with the ids ``>= vocab_size`` set to -inf: ids the model has but the tokenizer lacks.

    >>> mask_padding(torch.tensor([1.0, 2.0, 3.0]), 2)
    tensor([1., 2., -inf])
    """
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return logits.index_fill(-1, torch.arange(vocab_size, logits.shape[-1], device=logits.device), float("-inf"))


def _next_token(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None,
    vocab_size: int | None = None,
) -> Tensor:
    """One token per row from the last position's logits ``(B, V) -> (B,)``, never an id ``>= vocab_size``."""
    logits = mask_padding(logits, vocab_size)
    if temperature == 0:
        return logits.argmax(dim=-1)  # greedy: no randomness, no filters needed
    logits = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V), zero where filtered out
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def _left_pad(prompts: list[list[int]] | Tensor, pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Token ids ``(B, T)`` padded on the left with pad_id, and the mask ``(B, T)`` of real tokens.

    [[5, 6, 7], [8]] -> ids [[5, 6, 7], [0, 0, 8]], mask [[T, T, T], [F, F, T]].
    """
    if isinstance(prompts, Tensor):
        prompts = [prompts.tolist()] if prompts.dim() == 1 else prompts.tolist()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the <|endoftext|> id)")
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=device)
    return ids, mask


def _steps(
    model: GPT, prompts: list[list[int]] | Tensor, max_new_tokens: int, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, stop_tokens: Sequence[int] = (), use_cache: bool = True,
    generator: torch.Generator | None = None, pad_id: int = 0, vocab_size: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(tokens (B,), active (B,))`` for each step: the new token of every row and which rows still run."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if vocab_size is not None and not 0 < vocab_size <= model.cfg.vocab_size:
        raise ValueError(f"vocab_size must be in 1..{model.cfg.vocab_size} (the model's output size), got {vocab_size}")
    device = next(model.parameters()).device
    ids, real = _left_pad(prompts, pad_id, device)  # (B, T0) each
    B, T0 = ids.shape
    total = T0 + max_new_tokens
    if total > model.cfg.context_length:
        raise ValueError(
            f"the longest prompt ({T0} tokens) plus max_new_tokens={max_new_tokens} is {total}, more than "
            f"the model's context_length={model.cfg.context_length}; shorten the prompt or generate fewer tokens"
        )
    # the whole sequence to be, filled as we go; generated tokens are always real
    seq = torch.full((B, total), pad_id, dtype=torch.long, device=device)
    seq[:, :T0] = ids
    real = torch.cat([real, torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)], dim=1)  # (B, total)
    padded = not bool(real.all())
    positions = (real.cumsum(dim=-1) - 1).clamp(min=0)  # (B, total): [pad, pad, a, b, c] -> [0, 0, 0, 1, 2]
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)

    was_training = model.training
    model.eval()  # no dropout while generating
    try:
        caches = model.new_caches(B, total) if use_cache else None
        done = 0  # tokens of seq the cache already holds
        for t in range(T0, total):
            # feed what the model has not seen: everything without a cache, the new tokens with one
            start = done if use_cache else 0
            with torch.no_grad():
                logits, _ = model(
                    seq[:, start:t], caches=caches, positions=positions[:, start:t],
                    mask=real[:, :t] if padded else None,
                )  # (B, t - start, V)
            done = t
            token = _next_token(logits[:, -1], temperature, top_k, top_p, generator, vocab_size)  # (B,)
            seq[:, t] = token
            yield token, active.clone()
            active &= ~torch.isin(token, stop)  # a row ends with (and including) its first stop token
            if not active.any():
                return
    finally:
        model.train(was_training)


def generate(
    model: GPT, prompts: list[list[int]] | Tensor, max_new_tokens: int, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, stop_tokens: Sequence[int] = (), use_cache: bool = True,
    generator: torch.Generator | None = None, pad_id: int = 0, vocab_size: int | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt, up to max_new_tokens or through the first stop token.

    ``prompts`` is a list of token-id lists (any lengths: they are left-padded
    with ``pad_id`` and the padding masked) or a LongTensor ``(B, T)`` / ``(T,)``.
    ``temperature=0`` is greedy. Prompt + max_new_tokens must fit in the
    context length, else ValueError (no silent truncation). Pass a seeded
    ``generator`` to make sampling reproducible. ``vocab_size`` (the
    tokenizer's) keeps the output layer's padding ids from being chosen. The
    model is put in eval mode and handed back in the mode it came in.
    """
    steps = _steps(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, use_cache, generator, pad_id,
                   vocab_size)
    out: list[list[int]] | None = None
    for token, active in steps:
        if out is None:
            out = [[] for _ in range(len(token))]
        for row, (tok, alive) in enumerate(zip(token.tolist(), active.tolist(), strict=True)):
            if alive:
                out[row].append(tok)
    if out is None:  # max_new_tokens == 0
        n = 1 if isinstance(prompts, Tensor) and prompts.dim() == 1 else len(prompts)
        out = [[] for _ in range(n)]
    return out


def stream(
    model: GPT, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
    top_p: float | None = None, stop_tokens: Sequence[int] = (), use_cache: bool = True,
    generator: torch.Generator | None = None, pad_id: int = 0, vocab_size: int | None = None,
) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are produced: ``for t in stream(...): print(decode([t]))``.

    The same tokens as ``generate(model, [prompt], ...)[0]`` with the same options.
    The model stays in eval mode until the iteration ends (or the iterator is closed).
    """
    steps = _steps(model, [list(prompt)], max_new_tokens, temperature, top_k, top_p, stop_tokens, use_cache,
                   generator, pad_id, vocab_size)
    for token, _ in steps:
        yield int(token[0])
