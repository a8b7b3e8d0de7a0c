"""Chapter 3's "assemble it yourself" exercise (3.10): the check passes the solution, reports the starter as
not attempted, and names each typical mistake in one line.

``_train`` and ``_encode`` are the solution of solutions/03_tokenization.md, written out again with one
typical mistake switched on by name. The check trains on 50,000 characters of Tiny Shakespeare and encodes
with our tokenizer and GPT-2's: seconds.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import regex
from exercise_helpers import fresh_starter as _fresh_starter
from exercise_helpers import one_line_error as _one_line_error
from exercise_helpers import starter as _starter

from llmbook.bpe import GPT2_PATTERN, train_bpe
from llmbook.exercises import ch03


def _special_regex(special_tokens, mistake=None) -> str:
    escape = (lambda s: s) if mistake == "unescaped" else regex.escape  # "<|endoftext|>" unescaped: 3 alternatives
    return "(" + "|".join(escape(s) for s in sorted(special_tokens, key=len, reverse=True)) + ")"


def _merge(word, pair, new_id, overlap=False):
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 1 if overlap else 2  # the overlap mistake: "aaa" -> [aa, aa, a]
        else:
            out.append(word[i])
            i += 1
    return out


def _train(text, vocab_size, special_tokens=(), mistake=None):
    """The solution's bpe_train, with one typical mistake switched on by name."""
    pieces = [text]
    if special_tokens and mistake != "special_as_text":
        pieces = regex.split(_special_regex(special_tokens, mistake), text)
    words = Counter()
    for piece in pieces:
        if piece in special_tokens and mistake != "special_as_text":
            continue
        for pre in [piece] if mistake == "no_pretokenize" else regex.findall(GPT2_PATTERN, piece):
            words[tuple(pre.encode("utf-8"))] += 1
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    first_counts = None
    for new_id in range(256, vocab_size - len(special_tokens)):
        counts = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                counts[pair] += n
        if mistake == "stale":  # counted once, at the start; a merged pair is only removed
            first_counts = counts if first_counts is None else first_counts
            counts = first_counts
        if not counts:
            break
        if mistake == "ties_first":
            a, b = max(counts, key=counts.__getitem__)  # equal counts: the first seen
        else:
            a, b = max(counts, key=lambda p: (counts[p], vocab[p[0]], vocab[p[1]]))
        if mistake == "stale":
            del first_counts[a, b]
        vocab[new_id] = vocab[a] + vocab[b]
        merges.append((vocab[a], vocab[b]))
        merged = Counter()
        for word, n in words.items():
            merged[tuple(_merge(word, (a, b), new_id, overlap=mistake == "overlap"))] += n
        words = merged
    for token in special_tokens:
        vocab[len(vocab)] = token.encode("utf-8")
    return vocab, merges


def _encode(text, vocab, merges, special_tokens, mistake=None):
    """The solution's bpe_encode, with one typical mistake switched on by name."""
    specials = set(special_tokens.values())
    token_id = {t: i for i, t in vocab.items() if i not in specials}
    ranks, merged = {}, {}
    for rank, (a, b) in enumerate(merges):
        pair = (token_id[a], token_id[b])
        ranks[pair] = rank
        merged[pair] = token_id[a + b]
    pieces = [text]
    if special_tokens and mistake != "special_as_text":
        pieces = regex.split(_special_regex(special_tokens, mistake), text)
    ids = []
    for piece in pieces:
        if piece in special_tokens and mistake != "special_as_text":
            ids.append(special_tokens[piece])
            continue
        for pre in [piece] if mistake == "no_pretokenize" else regex.findall(GPT2_PATTERN, piece):
            word = [b if mistake == "byte_ids" else token_id[bytes([b])] for b in pre.encode("utf-8")]
            while len(word) > 1:
                pairs = list(zip(word, word[1:], strict=False))
                if mistake == "leftmost":
                    pair = next((p for p in pairs if p in ranks), None)
                elif mistake == "by_frequency":
                    counts = Counter(p for p in pairs if p in ranks)
                    pair = max(counts, key=counts.__getitem__) if counts else None
                else:
                    pair = min(pairs, key=lambda p: ranks.get(p, float("inf")))
                if pair not in ranks:
                    break
                word = _merge(word, pair, merged[pair])
            ids.extend(word)
    return ids


def test_the_mistakes_differ_from_the_library_on_the_small_cases():
    """Each training mistake changes the merges of one of the small cases; the solution matches on all."""
    small = ch03.train_cases()[:-1]
    for mistake in (None, "stale", "overlap", "no_pretokenize", "ties_first", "special_as_text", "unescaped"):
        same = [_train(t, v, s, mistake)[1] == train_bpe(t, v, s, workers=1)[1] for _, t, v, s in small]
        assert all(same) if mistake is None else not all(same), mistake


def test_solution_passes_and_starter_is_not_attempted(capsys):
    ch03.check_bpe(_train, _encode)
    ch03.check_bpe(_starter, _starter)
    ch03.check_bpe(_train, _starter)
    out = capsys.readouterr().out
    assert "Exercise 3.10: all checks passed" in out and out.count("Exercise 3.10: not attempted yet") == 2
    with pytest.raises(NotImplementedError):
        ch03.check_bpe.strict(_starter, _starter)


@pytest.mark.parametrize(("mistake", "hint"), [
    ("stale", "stale pair counts"),
    ("overlap", "overlapping pairs merged wrongly"),
    ("no_pretokenize", "pre-tokenized wrongly"),
    ("ties_first", "ties broken differently"),
    ("special_as_text", "special tokens split wrongly"),
    ("unescaped", "special tokens split wrongly"),
])
def test_training_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch03.check_bpe, functools.partial(_train, mistake=mistake), _encode)
    assert hint in message, message


@pytest.mark.parametrize(("mistake", "hint"), [
    ("by_frequency", "merged by frequency (or the leftmost pair) at encode time instead of by rank"),
    ("no_pretokenize", "pre-tokenized wrongly"),
    ("leftmost", "merged by frequency (or the leftmost pair) at encode time instead of by rank"),
    ("special_as_text", "special token encoded as text"),
    ("unescaped", "special token encoded as text"),
    ("byte_ids", "GPT-2's byte b is not id b"),
])
def test_encoding_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch03.check_bpe, _train, functools.partial(_encode, mistake=mistake))
    assert hint in message, message


def test_constant_answers_fail_in_one_line():
    _one_line_error(ch03.check_bpe, lambda *args: 0, _encode)
    _one_line_error(ch03.check_bpe, lambda *args: ({}, []), _encode)
    _one_line_error(ch03.check_bpe, _train, lambda *args: [])


def test_the_starter_is_generated_from_the_solutions():
    """exercises/03 is build_pdf's starter of solutions/03."""
    starter = _fresh_starter("03_tokenization")
    assert "def bpe_train(" in starter and "def bpe_encode(" in starter


def test_make_encoder_hint_still_works():
    """3.9: an encoder that never merges gets 3.9's own hint (3.10's encoder hint has another signature)."""

    def make_encoder(merges):
        return lambda text: list(text.encode("utf-8"))  # bytes only: no merge applied

    assert "keep merging" in _one_line_error(ch03.check_make_encoder, make_encoder)
