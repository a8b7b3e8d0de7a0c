"""Pre-tokenization and BPE training: hand-checked cases, tiktoken's patterns, and a naive reference trainer."""

from __future__ import annotations

import doctest
import random
from collections import Counter
from pathlib import Path

import pytest
import regex

from llmbook import data
from llmbook.bpe import pretokenize as pre
from llmbook.bpe import train as train_module
from llmbook.bpe.pretokenize import (
    CL100K_PATTERN,
    GPT2_PATTERN,
    PATTERNS,
    chunk_boundaries,
    count_pretokens,
    pretokenize,
    split_on_special,
)
from llmbook.bpe.train import merge, train_bpe


def naive_train(text: str, vocab_size: int, special_tokens=(), pat_str: str = GPT2_PATTERN):
    """The textbook algorithm, written to be obviously right: recount every pair before every merge.

    Pre-tokenizes with plain ``regex`` calls (not our module), and picks the
    pair with the greatest (count, bytes_a, bytes_b); pairs with equal bytes,
    which only arise when two merges made the same bytes, go to the smaller ids.
    """
    pieces = regex.split("(" + "|".join(map(regex.escape, special_tokens)) + ")", text) if special_tokens else [text]
    words = Counter()
    for piece in pieces:
        if piece not in special_tokens:
            words.update(tuple(w.encode("utf-8")) for w in regex.findall(pat_str, piece))
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    for new_id in range(256, vocab_size - len(special_tokens)):
        stats = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                stats[pair] += n
        if not stats:
            break
        a, b = max(stats, key=lambda p: (stats[p], vocab[p[0]], vocab[p[1]], -p[0], -p[1]))
        vocab[new_id] = vocab[a] + vocab[b]
        merges.append((vocab[a], vocab[b]))
        merged = Counter()
        for word, n in words.items():
            merged[tuple(merge(word, (a, b), new_id))] += n
        words = merged
    for token in special_tokens:
        vocab[len(vocab)] = token.encode("utf-8")
    return vocab, merges


def random_unicode_text(n_words: int, seed: int = 0) -> str:
    """Words from a mix of scripts, emoji and digits, with spaces, newlines and punctuation between."""
    rng = random.Random(seed)
    alphabets = ["abcde", "αβγδ", "中文字", "한국어", "😀🎉👍", "0123456789", "éèêë", "!?.,'"]
    seps = [" ", " ", " ", "\n", "  ", "\t", ", ", "\n\n"]
    words = []
    for _ in range(n_words):
        alphabet = rng.choice(alphabets)
        words.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) + rng.choice(seps))
    return "".join(words)


# ---------------------------------------------------------------------------
# Pre-tokenization
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "ours"), [("gpt2", GPT2_PATTERN), ("cl100k_base", CL100K_PATTERN)])
def test_patterns_are_tiktokens(name, ours):
    assert data.tiktoken_encoding(name)._pat_str == ours
    assert PATTERNS[name.removesuffix("_base")] == ours


def test_pretokenize_keeps_every_character():
    text = data.read_text("corpus.en")[:20_000]
    for pattern in PATTERNS:
        assert "".join(pretokenize(text, pattern)) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a   b", ["a", "  ", " b"]),  # the last space of a run goes with the next word
        ("I'll've don't", ["I", "'ll", "'ve", " don", "'t"]),
        ("x  \ny", ["x", "  ", "\n", "y"]),
        ("2024 12345", ["2024", " 12345"]),
    ],
)
def test_pretokenize_gpt2_examples(text, expected):
    assert pretokenize(text) == expected


def test_cl100k_splits_numbers_in_threes():
    assert pretokenize("1234567", CL100K_PATTERN) == ["123", "456", "7"]


def test_split_on_special_longest_first():
    specials = ["<|a|>", "<|a|><|a|>"]
    assert split_on_special("x<|a|><|a|><|a|>y", specials) == ["x", "<|a|><|a|>", "<|a|>", "y"]
    assert split_on_special("x<|a|>y", specials) == ["x", "<|a|>", "y"]
    assert split_on_special("", specials) == []
    assert split_on_special("plain", []) == ["plain"]


def test_count_pretokens_skips_special_tokens():
    counts = count_pretokens("aSEPb" * 500, special_tokens=["SEP"])
    assert counts == Counter({b"a": 1, b"ba": 499, b"b": 1})


def test_chunk_boundaries_are_safe(tmp_path):
    # whitespace runs, blank lines, CRLF and multi-byte text around every newline
    text = random_unicode_text(3000, seed=1) + "end  \n\n  x\r\ny\n"
    path = tmp_path / "tricky.txt"
    path.write_bytes(text.encode("utf-8"))
    for pattern in ("gpt2", "cl100k"):
        whole = count_pretokens(path, pattern, workers=1)
        bounds = chunk_boundaries(path, 40, window=64)
        assert len(bounds) > 10 and bounds == sorted(set(bounds))
        parts = Counter()
        for a, b in zip(bounds, bounds[1:], strict=False):
            parts.update(pre._count_chunk(str(path), a, b, PATTERNS[pattern], ()))
        assert parts == whole


def test_chunk_boundaries_never_cut_through_a_special_token(tmp_path):
    # "<|x|>" is also the tail of "Z<|x|>": cutting before "<|x|>" would leave "Z" as text
    specials = ["Z<|x|>", "<|x|>"]
    path = tmp_path / "s.txt"
    path.write_text("".join(f"word{i} Z<|x|>more\n" for i in range(500)), encoding="utf-8")
    raw = path.read_bytes()
    bounds = chunk_boundaries(path, 30, specials, window=64)
    assert len(bounds) > 10
    assert all(raw[i:].startswith(b"Z<|x|>") for i in bounds[1:-1])
    parts = Counter()
    for a, b in zip(bounds, bounds[1:], strict=False):
        parts.update(pre._count_chunk(str(path), a, b, GPT2_PATTERN, tuple(specials)))
    assert parts == count_pretokens(path, special_tokens=specials, workers=1)
    assert b"Z" not in parts
    # a window that starts between "Z" and "<|x|>" must not cut there, but after the newline
    assert pre._find_safe_cut(b"aZ<|x|>b\nc", 2, [s.encode() for s in specials]) == 9


def test_chunk_boundaries_at_special_tokens():
    path = data.path("tinystories_sample")
    raw = path.read_bytes()
    bounds = chunk_boundaries(path, 4, ["<|endoftext|>"])
    assert len(bounds) > 2
    assert all(raw[i:].startswith(b"<|endoftext|>") for i in bounds[1:-1])


# ---------------------------------------------------------------------------
# Training: hand-checked cases
# ---------------------------------------------------------------------------


def test_minbpe_example():
    # "aaabdaaabac" is one pre-token. (a, a) occurs 4 times and is merged first:
    # aa a b d aa a b a c. Now (aa, a) and (a, b) occur twice each: a tie, and
    # (b"aa", b"a") > (b"a", b"b") because b"aa" > b"a". That leaves
    # aaa b d aaa b a c, where (aaa, b) is the only pair occurring twice.
    # (Wikipedia's and minbpe's "ZabdZabac" picks (a, b) by first occurrence.)
    vocab, merges = train_bpe("aaabdaaabac", 256 + 3)
    assert merges == [(b"a", b"a"), (b"aa", b"a"), (b"aaa", b"b")]
    assert [vocab[i] for i in (256, 257, 258)] == [b"aa", b"aaa", b"aaab"]
    assert len(vocab) == 259


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # pre-tokens "ab" and " cd": three pairs, each once. (c, d) is the greatest,
        # then (a, b) > (" ", cd) because b"a" > b" ".
        ("ab cd", [(b"c", b"d"), (b"a", b"b"), (b" ", b"cd")]),
        # same first element: the second decides, b"z" > b"y"
        ("xy xz", [(b"x", b"z"), (b"x", b"y"), (b" ", b"xz")]),
        # a count beats any tie-break: (b, b) occurs twice; then b"z" > b"bb"
        ("bb bb z", [(b"b", b"b"), (b" ", b"z"), (b" ", b"bb")]),
    ],
)
def test_tie_breaking_by_hand(text, expected):
    assert train_bpe(text, 256 + len(expected))[1] == expected


def test_training_stops_when_nothing_is_left_to_merge():
    vocab, merges = train_bpe("ab ab", 1000, special_tokens=["<|endoftext|>"])
    assert merges == [(b"a", b"b"), (b" ", b"ab")]
    assert len(vocab) == 256 + 2 + 1 and vocab[258] == b"<|endoftext|>"


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match=r"vocab_size=256 is too small.*>= 257"):
        train_bpe("hello", 256, special_tokens=["<|endoftext|>"])
    with pytest.raises(ValueError, match="distinct"):
        train_bpe("hello", 300, special_tokens=["<|x|>", "<|x|>"])


def test_special_tokens_are_never_merged_across_and_come_last():
    # without the special token, "aSEPb" would be one word and S, E, P would merge
    vocab, merges = train_bpe("aSEPb" * 500, 256 + 2, special_tokens=["SEP"])
    assert merges == [(b"b", b"a")]
    assert vocab[257] == b"SEP"


def test_special_tokens_in_a_real_corpus():
    specials = ["<|endoftext|>", "<|pad|>"]
    vocab, merges = train_bpe(data.path("tinystories_sample"), 400, special_tokens=specials)
    assert len(vocab) == 400
    assert [vocab[398], vocab[399]] == [b"<|endoftext|>", b"<|pad|>"]
    assert all(b"<|" not in a + b and b"|>" not in a + b for a, b in merges)
    assert sorted(vocab) == list(range(400))
    assert all(vocab[256 + k] == a + b for k, (a, b) in enumerate(merges))


def test_module_doctests():
    for module in (pre, train_module):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_progress_prints_a_summary(capsys):
    train_bpe("the cat and the hat", 260, progress=True)
    out = capsys.readouterr().out
    assert "trained 4 merges" in out and "vocab size 260" in out


# ---------------------------------------------------------------------------
# Training: against the naive trainer, and independent of workers
# ---------------------------------------------------------------------------


def test_incremental_equals_naive_on_corpus_en():
    text = data.read_text("corpus.en")
    assert train_bpe(text, 300) == naive_train(text, 300)


def test_incremental_equals_naive_on_random_unicode():
    text = random_unicode_text(2000)
    for pattern in ("gpt2", "cl100k"):
        ours = train_bpe(text, 256 + 80, special_tokens=["<|endoftext|>"], pattern=pattern)
        assert ours == naive_train(text, 256 + 80, ["<|endoftext|>"], PATTERNS[pattern])


def test_deterministic_and_independent_of_workers(monkeypatch):
    path = data.path("corpus.en")
    serial = train_bpe(path, 500, workers=1)
    assert train_bpe(path, 500, workers=1) == serial
    assert train_bpe(path.read_text(encoding="utf-8"), 500) == serial  # the same as text

    monkeypatch.setattr(pre, "PARALLEL_MIN_BYTES", 0)  # let a small file take the parallel path
    assert len(chunk_boundaries(path, 8)) > 3
    assert train_bpe(path, 500, workers=2) == serial
    assert train_bpe(path, 500, workers=3) == serial

    stories = data.path("tinystories_sample")
    specials = ["<|endoftext|>"]
    assert train_bpe(stories, 300, specials, workers=2) == train_bpe(stories, 300, specials, workers=1)


def test_a_str_is_text_and_a_path_is_a_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello hello", encoding="utf-8")
    # (e, l), (l, l) and (l, o) occur twice each; (b"l", b"o") is the greatest
    assert train_bpe(Path(path), 257)[1] == [(b"l", b"o")]
    assert train_bpe(str(path), 257)[1] != [(b"l", b"o")]  # the path's own characters
