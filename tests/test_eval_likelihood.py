"""Log-likelihoods (batched = one request at a time, lm-eval's truncation and windows), bits per byte, bootstrap."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llmbook.bpe.tokenizer import Tokenizer
from llmbook.evaluation.bootstrap import bootstrap_ci, bootstrap_ratio_ci
from llmbook.evaluation.likelihood import default_prefix_id, loglikelihoods, rolling_loglikelihood, rolling_windows
from llmbook.evaluation.perplexity import bits_per_byte
from llmbook.model import GPT
from llmbook.posttrain.measure import bootstrap_interval

pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py

CTX = 64  # gpt-tiny's context length
PREFIX = 255
ENDOFTEXT = "<|endoftext|>"


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(1)
    m = GPT.from_preset("gpt-tiny").eval()
    with torch.no_grad():
        m.norm_f.weight.mul_(20)  # sharper, not nearly uniform, predictions: argmax is meaningful
    return m


def naive(model: GPT, context, continuation) -> tuple[float, bool]:
    """One request alone: truncate to the last CTX + 1 tokens, full forward, log_softmax, gather."""
    whole = (list(context) + list(continuation))[-(CTX + 1):]
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole[:-1]]))
    logprobs = F.log_softmax(logits[0].double(), dim=-1)[-len(continuation):]  # (len(cont), vocab)
    target = torch.tensor(continuation)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def random_requests(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        n_ctx, n_cont = int(torch.randint(1, 50, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
        ids = torch.randint(0, 256, (n_ctx + n_cont,), generator=g).tolist()
        out.append((ids[:n_ctx], ids[n_ctx:]))
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_batched_equals_one_at_a_time(model, batch_size):
    requests = random_requests(37)
    requests.append(requests[5])  # a duplicate
    got = loglikelihoods(model, requests, batch_size=batch_size)
    assert len(got) == len(requests)
    for (ll, greedy), (context, cont) in zip(got, requests, strict=True):
        want_ll, want_greedy = naive(model, context, cont)
        assert ll == pytest.approx(want_ll, abs=1e-5)
        assert greedy == want_greedy
    # not bit-identical to got[5]: the two copies may sit in batches of different widths and row counts
    assert got[-1] == pytest.approx(got[5], abs=1e-5)


def test_same_numbers_in_any_order(model):
    """The batches depend only on the set of requests, so a permutation gives bit-identical results."""
    requests = random_requests(20, seed=3)
    perm = torch.randperm(len(requests), generator=torch.Generator().manual_seed(0)).tolist()
    got = loglikelihoods(model, requests, batch_size=4)
    shuffled = loglikelihoods(model, [requests[i] for i in perm], batch_size=4)
    assert [got[i] for i in perm] == shuffled


def test_is_greedy(model):
    context = [10, 20, 30, 40]
    greedy = []
    with torch.no_grad():
        for _ in range(5):  # write the model's greedy continuation
            logits, _ = model(torch.tensor([context + greedy]))
            greedy.append(int(logits[0, -1].argmax()))
    (ll, is_greedy), = loglikelihoods(model, [(context, greedy)])
    assert is_greedy
    other = greedy[:-1] + [(greedy[-1] + 1) % 256]  # the last token is not the argmax
    (ll_other, is_greedy_other), = loglikelihoods(model, [(context, other)])
    assert not is_greedy_other and ll_other < ll
    (_, first_only), = loglikelihoods(model, [(context, greedy[:1])])
    assert first_only


def test_too_long_is_truncated_from_the_left(model):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (150,), generator=g).tolist()
    cases = [(ids[:140], ids[140:]), (ids[:80], ids[80:80 + CTX]), (ids[:1], ids[1:1 + CTX])]
    got = loglikelihoods(model, cases, batch_size=2)
    for (ll, greedy), (context, cont) in zip(got, cases, strict=True):
        kept = (context + cont)[-(CTX + 1):]
        short = (kept[:len(kept) - len(cont)], cont)  # the same request cut by hand
        assert (ll, greedy) == pytest.approx(naive(model, *short), abs=1e-5)
    # the cut changes the score: the first 75 context tokens were really dropped
    assert got[0][0] == pytest.approx(loglikelihoods(model, [(ids[75:140], ids[140:])])[0][0], abs=1e-5)


def test_equals_lm_evals_hflm(model):
    """lm-eval's own HFLM._loglikelihood_tokens, run on our model: the same numbers, truncation and is_greedy."""
    from functools import partial
    from types import SimpleNamespace

    from lm_eval.api.model import CacheHook
    from lm_eval.models.huggingface import HFLM  # imports transformers: a few seconds

    hflm = SimpleNamespace(backend="causal", logits_cache=True, batch_size=4, max_length=CTX, device="cpu",
                           _model_call=lambda inps, **kw: model(inps)[0], softmax_dtype=None, rank=0,
                           cache_hook=CacheHook(None), batch_sizes={})
    hflm._select_cont_toks = partial(HFLM._select_cont_toks, hflm)
    requests = random_requests(20, seed=7) + [(list(range(1, 100)), [7, 8]), ([5, 6, 7], [8]), ([5, 6, 7], [9])]
    with torch.no_grad():  # greedy continuations, for is_greedy = True
        for context in ([3, 4], list(range(90))):
            cont = []
            for _ in range(3):
                cont.append(int(model(torch.tensor([(context + cont)[-CTX:]]))[0][0, -1].argmax()))
            requests.append((context, cont))
        theirs = HFLM._loglikelihood_tokens(hflm, [(None, a, b) for a, b in requests], disable_tqdm=True)
    ours = loglikelihoods(model, requests, batch_size=4)
    assert [g for _, g in ours] == [g for _, g in theirs] and sum(g for _, g in ours) >= 2
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], abs=1e-4)  # lm-eval sums in float32


def test_bad_requests(model):
    with pytest.raises(ValueError, match="empty continuation"):
        loglikelihoods(model, [([1, 2], [3]), ([1, 2], [])])
    with pytest.raises(ValueError, match="empty context.*prefix token"):
        loglikelihoods(model, [([], [3])])
    with pytest.raises(ValueError, match="does not fit the model's context_length=64.*rolling_loglikelihood"):
        loglikelihoods(model, [([1], list(range(CTX + 1)))])
    with pytest.raises(ValueError, match="batch_size"):
        loglikelihoods(model, [([1], [2])], batch_size=0)
    assert loglikelihoods(model, []) == []


@pytest.mark.parametrize("n", [1, 7, 40, 41, 100])
@pytest.mark.parametrize(("window", "stride"), [(8, 8), (8, 3), (8, 1), (64, 16), (5, 4)])
def test_windows_are_lm_evals(n, window, stride):
    ids = list(range(100, 100 + n))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, PREFIX, window, window - stride + 1)]
    ours = rolling_windows(ids, PREFIX, window, stride)
    assert ours == [(list(a), list(b)) for a, b in theirs]
    assert [t for _, cont in ours for t in cont] == ids  # every token scored exactly once, in order
    assert all(len(ctx) + len(cont) <= window + 1 for ctx, cont in ours)


def token_logprob(model: GPT, inputs: list[int], target: int) -> float:
    with torch.no_grad():
        logits, _ = model(torch.tensor([inputs]))
    return float(F.log_softmax(logits[0, -1].double(), -1)[target])


def test_rolling_stride_equals_window_is_independent_windows(model):
    ids = torch.randint(0, 256, (3 * 16,), generator=torch.Generator().manual_seed(2)).tolist()
    want = 0.0
    for k in range(3):  # window k reads the token before it (the prefix for the first) and its own 15
        inputs = ([PREFIX] + ids)[16 * k:16 * k + 16]
        with torch.no_grad():
            logits, _ = model(torch.tensor([inputs]))
        targets = torch.tensor(ids[16 * k:16 * k + 16])[:, None]
        want += float(F.log_softmax(logits[0].double(), -1).gather(1, targets).sum())
    assert rolling_loglikelihood(model, ids, PREFIX, window=16) == pytest.approx(want, abs=1e-5)
    assert rolling_loglikelihood(model, ids, PREFIX, window=16, stride=16) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize(("window", "stride"), [(16, 5), (16, 16), (10, 1)])
def test_rolling_equals_per_token_with_stated_context(model, window, stride):
    """Token j sees everything before it in the first window; later, the `window` tokens before its window's end."""
    n = 45
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(4)).tolist()
    want, end = 0.0, min(window, n)
    for j in range(n):
        if j >= end:
            end = min(end + stride, n)
        inputs = [PREFIX] + ids[:j] if j < window else ids[end - window - 1:j]
        if j >= window:
            assert len(inputs) >= window - stride + 1  # the promised least context
        want += token_logprob(model, inputs, ids[j])
    got = rolling_loglikelihood(model, ids, PREFIX, window=window, stride=stride, batch_size=3)
    assert got == pytest.approx(want, abs=1e-4)


def test_rolling_short_document_is_one_forward(model):
    ids = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(6)).tolist()
    with torch.no_grad():
        logits, _ = model(torch.tensor([[PREFIX] + ids[:-1]]))
    want = float(F.log_softmax(logits[0].double(), -1).gather(1, torch.tensor(ids)[:, None]).sum())
    assert rolling_loglikelihood(model, ids, PREFIX) == pytest.approx(want, abs=1e-5)  # window = 64 >= 30
    assert rolling_loglikelihood(model, ids, PREFIX, window=30, stride=7) == pytest.approx(want, abs=1e-5)
    assert rolling_loglikelihood(model, [], PREFIX) == 0.0


def test_rolling_bad_window(model):
    with pytest.raises(ValueError, match="window must be in 1..context_length=64"):
        rolling_loglikelihood(model, [1, 2], PREFIX, window=65)
    with pytest.raises(ValueError, match="1 <= stride <= window"):
        rolling_loglikelihood(model, [1, 2], PREFIX, window=8, stride=9)


# ---------------------------------------------------------------------- bits per byte and the bootstrap


def byte_tokenizer() -> Tokenizer:
    vocab = {**{i: bytes([i]) for i in range(256)}, 256: b"th"}
    return Tokenizer(vocab, [(b"t", b"h")], [ENDOFTEXT])  # "th": 256, eot: 257


def test_bits_per_byte_of_a_uniform_model():
    model = GPT.from_preset("gpt-tiny", vocab_size=300)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: uniform over the 300 ids
    tok = byte_tokenizer()
    texts = ["the thin thread", "é" * 50, "x" * 130]  # 2-byte characters; a text longer than the window
    result = bits_per_byte(model, tok, texts, stride=20)
    tokens = [len(tok.encode_ordinary(t)) for t in texts]
    assert result.tokens == tokens == [12, 100, 130] and result.bytes == [15, 100, 130]
    assert result.nats == pytest.approx([n * math.log(300) for n in tokens])
    assert result.bpb == pytest.approx(math.log2(300) * sum(tokens) / sum(result.bytes))
    assert result.perplexity == pytest.approx(300)
    assert (result.window, result.stride) == (CTX, 20)


def test_bits_per_byte_is_the_rolling_score():
    torch.manual_seed(3)
    model = GPT.from_preset("gpt-tiny", vocab_size=258)
    tok = byte_tokenizer()
    texts = ["First Citizen: before we proceed any further, hear me speak. " * 3, "All: speak, speak.", "é"]
    result = bits_per_byte(model, tok, texts, stride=16, batch_size=5)
    eot = tok.special_tokens[ENDOFTEXT]
    for text, nats in zip(texts, result.nats, strict=True):
        want = -rolling_loglikelihood(model, tok.encode_ordinary(text), eot, stride=16)
        assert nats == pytest.approx(want, abs=1e-4)
    assert result.bpb == pytest.approx(sum(result.nats) / math.log(2) / sum(len(t.encode()) for t in texts))
    low, high = result.interval(draws=500)
    assert low <= result.bpb <= high
    assert bits_per_byte(model, tok, texts[:1], prefix_id=7).nats != result.nats[:1]  # the prefix is used


def test_bits_per_byte_bad_input(model):
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="bits_per_byte needs at least one text"):
        bits_per_byte(model, tok, [])
    with pytest.raises(ValueError, match="not one string"):
        bits_per_byte(model, tok, "a text")
    with pytest.raises(ValueError, match="zero bytes"):
        bits_per_byte(model, tok, ["", ""])
    plain = Tokenizer({i: bytes([i]) for i in range(256)}, [])  # no <|endoftext|>: a newline starts a document
    assert bits_per_byte(model, plain, ["abc"]).prefix_id == 10 == default_prefix_id(plain)
    assert default_prefix_id(tok) == 257


def test_bootstrap():
    values = [float(i % 4 == 0) for i in range(40)]
    mean, low, high = bootstrap_ci(values, draws=800, seed=3)
    assert mean == 0.25 and (low, high) == bootstrap_interval(values, draws=800, seed=3)
    assert low < 0.25 < high
    # a ratio of sums with equal denominators is a mean: the same resamples give the same interval
    ratio = bootstrap_ratio_ci([v * 7 for v in values], [7] * 40, draws=800, seed=3)
    assert ratio == pytest.approx((mean, low, high))
    # long texts weigh more: (10 + 0) / (10 + 90), not the mean of 1.0 and 0.0
    assert bootstrap_ratio_ci([10.0, 0.0], [10, 90])[0] == pytest.approx(0.1)
    assert bootstrap_ci([2.0], draws=10) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="bootstrap_ci needs at least one value"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0], level=1.5)
    with pytest.raises(ValueError, match="pair up"):
        bootstrap_ratio_ci([1.0], [1, 2])
