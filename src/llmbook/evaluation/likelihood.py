"""Log-likelihoods of token continuations: the one model call that perplexity and multiple choice are made of.

Every likelihood-based metric asks the same question: how many nats does the model give a continuation
after a context, ``log p(continuation | context) = sum_t log p(c_t | context, c_<t)``? A causal model
answers it for every position in one forward pass over ``context + continuation[:-1]``: the logits at the
last ``len(continuation)`` positions predict the continuation's tokens.

This module mirrors lm-evaluation-harness's ``HFLM._loglikelihood_tokens`` (lm_eval/models/huggingface.py),
so that a wrapper around it gives lm-eval the numbers its own Hugging Face model class would:

- input = ``(context + continuation)[-(context_length + 1):][:-1]``: a request too long for the model loses
  tokens from the *left* of its context, and the continuation is always scored whole;
- requests are sorted longest first, cut into batches, right-padded (a causal model's position t never sees
  positions after t, so padding on the right changes nothing before it and needs no mask);
- ``log_softmax`` in float32, the continuation's log-probs gathered and summed (we sum in float64);
- ``is_greedy``: every continuation token is the argmax of its position's logits.

The batches are a deterministic function of the *set* of requests (sorted by length, then by token ids), so
the same requests give bit-identical numbers in any order: a from-scratch scorer and lm-eval calling this
module with the same requests agree exactly, not just to rounding. (A request's number can move in the last
float32 bits when its batch-mates change, since the matmuls then round differently: about 1e-6 nats.)

``rolling_loglikelihood`` scores a whole document of any length (perplexity) by sliding a window over it,
as lm-eval's ``loglikelihood_rolling`` does with ``lm_eval.utils.get_rolling_token_windows``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from llmbook.bpe.tokenizer import Tokenizer
from llmbook.model import GPT

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)
ENDOFTEXT = "<|endoftext|>"


def default_prefix_id(tokenizer: Tokenizer) -> int:
    """The token that stands before a document: ``<|endoftext|>`` if the tokenizer has it, else the newline's id.

    lm-eval conditions a document's first token (and a continuation with an empty context) on the tokenizer's
    end-of-text token. The reference model's tokenizer has no special tokens; in its text a newline is what
    separates speeches, the closest thing to "a new document starts here" (llmbook.evaluation.harness's
    ``prefix_id`` is this function, so both scorers condition on the same token).
    """
    if ENDOFTEXT in tokenizer.special_tokens:
        return tokenizer.special_tokens[ENDOFTEXT]
    return tokenizer.encode_ordinary("\n")[0]


def _check_request(i: int, context: Sequence[int], continuation: Sequence[int], max_length: int) -> None:
    if not continuation:
        raise ValueError(f"request {i} has an empty continuation: there is nothing to score; drop it or give "
                         f"it at least one token")
    if not context:
        raise ValueError(f"request {i} has an empty context: condition the first token on a prefix token "
                         f"(e.g. the id of <|endoftext|>) passed as the context")
    if len(continuation) > max_length:
        raise ValueError(f"request {i}: a continuation of {len(continuation)} tokens does not fit the model's "
                         f"context_length={max_length}, so it cannot be truncated from the left; score it with "
                         f"rolling_loglikelihood instead")


def loglikelihoods(model: GPT, requests: Sequence[Request], batch_size: int = 32) -> list[tuple[float, bool]]:
    """Per request ``(context_ids, continuation_ids)``: ``(log p(continuation | context) in nats, is_greedy)``.

    The sum is float64 over float32 log-softmax values; ``is_greedy`` is True when greedy decoding from the
    context would write exactly the continuation. A request longer than ``context_length + 1`` tokens keeps
    its last ``context_length + 1`` (lm-eval's left truncation; the last token is only a target). Results
    come back in request order. Raises ``ValueError`` for an empty context or continuation, or a
    continuation longer than the context length.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    max_length = model.cfg.context_length
    inputs: list[list[int]] = []  # what the model reads, at most max_length tokens
    for i, (context, continuation) in enumerate(requests):
        _check_request(i, context, continuation, max_length)
        whole = [*context, *continuation]
        inputs.append(whole[-(max_length + 1):][:-1])

    # longest first (lm-eval's order: the first batch shows the worst memory use), ties by the tokens themselves
    # so that the batches, and with them every rounding, depend only on the set of requests
    order = sorted(range(len(requests)),
                   key=lambda i: (-len(inputs[i]), tuple(inputs[i]), tuple(requests[i][1])))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                width = len(inputs[chunk[0]])  # the longest in the chunk: the order is by length
                batch = torch.zeros(len(chunk), width, dtype=torch.long)  # right padding with id 0 (never scored)
                for row, i in enumerate(chunk):
                    batch[row, :len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
                logits, _ = model(batch.to(device))  # (B, width, vocab)
                for row, i in enumerate(chunk):
                    n_in, cont = len(inputs[i]), requests[i][1]
                    picked = logits[row, n_in - len(cont):n_in].float()  # (len(cont), vocab): the predictions
                    logprobs = F.log_softmax(picked, dim=-1)  # float32, as lm-eval's default softmax_dtype
                    target = torch.tensor(list(cont), dtype=torch.long, device=device)
                    scored = logprobs.gather(1, target[:, None]).squeeze(1)  # (len(cont),)
                    greedy = bool((picked.argmax(dim=-1) == target).all())
                    results[i] = (float(scored.double().sum()), greedy)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def rolling_windows(ids: Sequence[int], prefix_id: int, window: int, stride: int | None = None
                    ) -> list[tuple[list[int], list[int]]]:
    """The ``(context, continuation)`` requests that score every token of ``ids`` exactly once.

    The first window reads ``[prefix_id] + ids[:window-1]`` and scores ``ids[:window]`` (the first token
    conditioned on ``prefix_id`` only). Each later window scores the next ``stride`` tokens (fewer at the
    end), reading the ``window`` tokens that end just before its last one. So a token scored in a later
    window sees at least ``window - stride + 1`` tokens (itself excluded: the ones before it in the window),
    and the last window has full context even when it scores only a few tokens.

    The stride trades compute for context. ``stride = window`` (the default) costs one forward per
    ``window`` tokens, but the first token of each window sees only one token before it; ``stride = 1``
    gives every token a full window of context at ``window`` times the compute. Compute grows as
    ``n_tokens * window / stride``; the loss falls as context grows, fast at first and then slowly.

    These are lm-eval's windows: ``[make_disjoint_window(w) for w in get_rolling_token_windows(ids,
    prefix_id, max_seq_len=window, context_len=window - stride + 1)]`` (tests/test_eval_likelihood.py).
    """
    stride = window if stride is None else stride
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 1 and 1 <= stride <= window, got window={window}, stride={stride}")
    ids = list(ids)
    if not ids:
        return []
    first = min(window, len(ids))
    out = [([prefix_id], ids[:first])]
    done = first
    while done < len(ids):
        end = min(done + stride, len(ids))
        # input ids[end-window-1 : end-1] (window tokens), which predicts ids[end-window : end]; keep the targets
        # we have not scored yet, ids[done:end], and the input before them as the context
        out.append((ids[end - window - 1:done], ids[done:end]))
        done = end
    return out


def rolling_loglikelihood(model: GPT, ids: Sequence[int], prefix_id: int, window: int | None = None,
                          stride: int | None = None, batch_size: int = 32) -> float:
    """``log p(ids)`` in nats, the first token conditioned on ``prefix_id`` (e.g. ``<|endoftext|>``).

    Sliding windows of ``window`` tokens (default: the model's context length) advancing by ``stride``
    (default: ``window``, no overlap); see ``rolling_windows`` for the exact windows and for how the stride
    trades compute for context. Every token is scored once; the windows run as one batched
    ``loglikelihoods`` call. An empty ``ids`` has log-probability 0.
    """
    window = model.cfg.context_length if window is None else window
    if not 1 <= window <= model.cfg.context_length:
        raise ValueError(f"window must be in 1..context_length={model.cfg.context_length}, got {window}")
    windows = rolling_windows(ids, prefix_id, window, stride)
    return float(sum(ll for ll, _ in loglikelihoods(model, windows, batch_size)))
