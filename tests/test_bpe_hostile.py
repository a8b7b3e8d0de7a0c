"""The tokenizer on hostile input: pre-tokens of a megabyte, special tokens in text, ids that are not ids.

The long-run cases compare with tiktoken's GPT-2 encoding, which encodes a
million copies of one letter in a fraction of a second; the old merge loop
took 40 s for 64 K of them. The cost of ``bpe_fast`` is checked by counting
its steps, not by timing it, so the test means the same on a busy machine.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmbook import data
from llmbook.bpe import Tokenizer, train_bpe
from llmbook.bpe import tokenizer as tokenizer_module
from llmbook.bpe.tokenizer import bpe, bpe_fast


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.from_tiktoken("gpt2")


@pytest.fixture(scope="module")
def gpt2_tiktoken():
    return data.tiktoken_encoding("gpt2")


@pytest.fixture(scope="module")
def trained():
    vocab, merges = train_bpe(data.path("corpus.en"), 500, special_tokens=["<|endoftext|>"])
    return Tokenizer(vocab, merges, special_tokens=["<|endoftext|>"], name="corpus-500")


def byte_ids(tok: Tokenizer, text: str) -> list[int]:
    return [tok._byte_ids[b] for b in text.encode("utf-8")]


# ---------------------------------------------------------------------------
# Long pre-tokens: identical to tiktoken, and sub-quadratic work
# ---------------------------------------------------------------------------

LONG_RUNS = {
    "a*10000": "a" * 10_000,
    "space*5000": " " * 5_000,
    "ab*3000": "ab" * 3_000,
    "space*5000 then a word": " " * 5_000 + "word",
    "newlines*4000": "\n" * 4_000,
    "digits*6000": "1" * 6_000,
    "abc*2000 + a*3001": "abc" * 2_000 + "a" * 3_001,
    "mixed runs": "".join(c * n for c, n in zip("abcab", [997, 1, 2500, 3, 1234], strict=True)),
    "é*3000 (two bytes each)": "é" * 3_000,
    "emoji*1500 (four bytes each)": "\N{GRINNING FACE}" * 1_500,
    "aaab*1500": "aaab" * 1_500,
}


@pytest.mark.parametrize("text", LONG_RUNS.values(), ids=LONG_RUNS.keys())
def test_long_runs_same_ids_as_tiktoken(gpt2, gpt2_tiktoken, text):
    assert gpt2.encode_ordinary(text) == gpt2_tiktoken.encode_ordinary(text)
    assert gpt2.decode(gpt2.encode_ordinary(text)) == text


def test_a_200k_letter_pre_token_same_ids_as_tiktoken(gpt2, gpt2_tiktoken):
    # one pre-token of 200,000 bytes: the old loop would need hours, tiktoken milliseconds
    text = "a" * 200_000
    assert len(gpt2_tiktoken.encode_ordinary(text)) < len(text)
    assert gpt2.encode_ordinary(text) == gpt2_tiktoken.encode_ordinary(text)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", " ", "e", "\n", "1", "é", "ab", "the"]),
                          st.integers(1, 400)), min_size=1, max_size=8))
def test_runs_of_anything_same_ids_as_tiktoken(gpt2, gpt2_tiktoken, runs):
    text = "".join(piece * n for piece, n in runs)
    assert gpt2.encode_ordinary(text) == gpt2_tiktoken.encode_ordinary(text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="aabbe hl\n", min_size=0, max_size=300))
def test_fast_loop_equals_teaching_loop(gpt2, trained, text):
    # the library's loop and the chapter's loop give the same ids, whatever the pre-token
    for tok in (gpt2, trained):
        ids = byte_ids(tok, text)
        assert bpe_fast(ids, tok._ranks, tok._merged) == bpe(list(ids), tok._ranks, tok._merged)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fast_loop_equals_teaching_loop_for_any_merge_table(draw):
    # Random merge tables, where a merge may create a pair of *lower* rank (BPE
    # training never makes one): bpe_fast must still merge in bpe's order.
    alphabet = draw.draw(st.integers(2, 4))
    pairs = draw.draw(st.lists(st.tuples(st.integers(0, alphabet + 5), st.integers(0, alphabet + 5)),
                               min_size=1, max_size=12, unique=True))
    ranks = {pair: rank for rank, pair in enumerate(draw.draw(st.permutations(pairs)))}
    merged = {pair: alphabet + 1 + k for k, pair in enumerate(pairs)}  # fresh ids, never an input id
    ids = draw.draw(st.lists(st.integers(0, alphabet - 1), max_size=40))
    assert bpe_fast(ids, ranks, merged) == bpe(list(ids), ranks, merged)


@pytest.mark.parametrize("unit", ["a", "ab", "0", "aab"])
def test_fast_loop_work_grows_linearly(gpt2, unit):
    # Each position enters a bucket once and each merge adds at most two entries,
    # so the loop looks at no more than 3n entries for n bytes; the teaching loop
    # looks at every pair after every merge, about n^2 / 2.
    for n in [1_000, 10_000, 100_000]:
        ids = byte_ids(gpt2, (unit * n)[:n])
        stats: dict[str, int] = {}
        out = bpe_fast(ids, gpt2._ranks, gpt2._merged, stats)
        merges = n - len(out)
        assert merges >= n // 2  # real work happened
        assert stats["steps"] <= n - 1 + 2 * merges <= 3 * n


def test_long_pre_tokens_are_not_cached(gpt2):
    gpt2._cache.clear()
    gpt2.encode_ordinary("b" * 100_000 + " short words")
    assert max(map(len, gpt2._cache)) <= tokenizer_module.CACHE_MAX_CHARS
    assert " short" in gpt2._cache


def test_streaming_a_long_pre_token_scans_each_character_a_few_times(gpt2, gpt2_tiktoken, monkeypatch):
    # encode_iterable carries an unfinished pre-token over; it must not rescan it
    # from the start for every new line (that was quadratic in its length)
    scanned = 0
    settle = Tokenizer._encode_settled

    def counting(self, text, allowed, hold):
        nonlocal scanned
        scanned += len(text)
        return settle(self, text, allowed, hold)

    monkeypatch.setattr(Tokenizer, "_encode_settled", counting)
    monkeypatch.setattr(tokenizer_module, "STREAM_CHARS", 1_000)
    lines = ["a" * 100] * 2_000  # one pre-token of 200,000 letters, in 2,000 lines
    ids = list(gpt2.encode_iterable(lines))
    assert ids == gpt2_tiktoken.encode_ordinary("".join(lines))
    assert scanned <= 3 * 200_000


# ---------------------------------------------------------------------------
# Special tokens in text: tiktoken's contract
# ---------------------------------------------------------------------------

TEXTS_WITH_SPECIALS = ["hello<|endoftext|>world", "<|endoftext|>", "a <|endoftext|>b<|endoftext|>"]


@pytest.mark.parametrize("text", TEXTS_WITH_SPECIALS)
def test_special_token_in_text_raises_by_default_like_tiktoken(gpt2, gpt2_tiktoken, text):
    with pytest.raises(ValueError, match="disallowed"):
        gpt2_tiktoken.encode(text)
    with pytest.raises(ValueError, match=r"disallowed.*encode_ordinary"):
        gpt2.encode(text)
    with pytest.raises(ValueError, match="disallowed"):
        list(gpt2.encode_iterable([text]))


@pytest.mark.parametrize("text", TEXTS_WITH_SPECIALS)
def test_special_token_allowed_or_ordinary_like_tiktoken(gpt2, gpt2_tiktoken, text):
    eot = {"<|endoftext|>"}
    assert gpt2.encode(text, allowed_special=eot) == gpt2_tiktoken.encode(text, allowed_special=eot)
    assert gpt2.encode(text, allowed_special="all") == gpt2_tiktoken.encode(text, allowed_special="all")
    assert 50256 in gpt2.encode(text, allowed_special=eot)
    assert gpt2.encode_ordinary(text) == gpt2_tiktoken.encode_ordinary(text)
    assert 50256 not in gpt2.encode_ordinary(text)
    assert gpt2.encode(text, disallowed_special=()) == gpt2_tiktoken.encode(text, disallowed_special=())
    assert list(gpt2.encode_iterable([text], allowed_special=eot)) == gpt2.encode(text, allowed_special=eot)


def test_text_without_special_tokens_encodes_by_default(gpt2, gpt2_tiktoken):
    text = "A < b and c |> d, <|endof text|>"
    assert gpt2.encode(text) == gpt2_tiktoken.encode(text) == gpt2.encode_ordinary(text)


def test_encode_arguments_are_keyword_only_like_tiktoken(gpt2):
    with pytest.raises(TypeError):
        gpt2.encode("x", "all")


# ---------------------------------------------------------------------------
# decode: ids must be ids
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1.5, 1.0, True, False, "1", None, np.float32(2.0), np.True_, b"a"])
def test_decode_rejects_what_is_not_an_integer(gpt2, bad):
    with pytest.raises(TypeError, match="token ids must be integers"):
        gpt2.decode([31373, bad])
    with pytest.raises(TypeError, match="token ids must be integers"):
        gpt2.token_bytes(bad)


@pytest.mark.parametrize("bad", [-1, -50257, 50257, 10**12, np.int64(60000)])
def test_decode_rejects_ids_outside_the_vocabulary(gpt2, bad):
    with pytest.raises(ValueError, match=r"unknown token id -?\d+; valid ids are 0\.\.50256"):
        gpt2.decode([bad])


def test_decode_accepts_integers_of_any_kind(gpt2):
    torch = pytest.importorskip("torch")
    ids = gpt2.encode("hello world")
    assert gpt2.decode(np.array(ids)) == "hello world"
    assert gpt2.decode([np.int32(i) for i in ids]) == "hello world"
    assert gpt2.decode(torch.tensor(ids)) == "hello world"
    assert gpt2.decode(iter(ids)) == "hello world"


def test_decode_of_a_trained_vocabulary_with_specials(trained):
    rng = random.Random(0)
    ids = [rng.randrange(trained.vocab_size) for _ in range(1_000)]
    assert trained.decode_bytes(ids) == b"".join(trained.vocab[i] for i in ids)
    with pytest.raises(ValueError, match="unknown token id 500; valid ids are 0..499"):
        trained.decode([*ids, 500])


def test_streamed_and_whole_agree_on_long_runs(gpt2, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "STREAM_CHARS", 50)
    text = "".join(itertools.chain.from_iterable([c * 300, " "] for c in "ab a"))
    lines = [text[i : i + 37] for i in range(0, len(text), 37)]
    assert list(gpt2.encode_iterable(lines)) == gpt2.encode(text)
