"""Gopher's repetition rules (Rae et al. 2021, appendix A.1.1, table A1): drop a page that says the same thing over.

Repeated text is a sign of machine-made pages (the same line on every row of a table, a paragraph pasted
twice, "buy cheap shoes" forty times), and language models trained on it learn to loop. Gopher measures
repetition at four grains and drops a page when any is above its threshold:

- duplicate lines and paragraphs: the fraction of them that already occurred (> 0.30), and the fraction
  of the characters those duplicates hold (> 0.20);
- the most frequent 2-, 3-, 4-gram of words: the characters it covers, as a fraction of the page
  (> 0.20, 0.18, 0.16);
- duplicated 5- to 10-grams: the characters in n-grams seen before (> 0.15 for 5, down to 0.10 for 10).

Thresholds are the paper's table A1 as datatrove 0.10.1 (``GopherRepetitionFilter``) sets them, and the
decisions are datatrove's exactly given the same words, details included: a line or paragraph split
keeps datatrove's separators; the top n-gram's share is its length (words joined by spaces) times its
count over the page's characters, the first n-gram met winning a tie; a duplicated n-gram is looked up
as its words joined without spaces and the scan jumps past it (so overlapping repeats count once).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from llmbook.pipeline.gopher import WordSplitter, split_words
from llmbook.pipeline.stage import Filter

_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


def duplicates(parts: list[str]) -> tuple[int, int]:
    """How many ``parts`` repeat an earlier one, and how many characters those repeats hold."""
    seen: set[str] = set()
    n_dup = n_chars = 0
    for part in parts:
        if part in seen:
            n_dup += 1
            n_chars += len(part)
        else:
            seen.add(part)
    return n_dup, n_chars


class NGrams:
    """A page's word n-grams as slices of the joined words: no n-gram is built by a Python-level join.

    The words are joined once with a space (datatrove's n-grams for the top n-gram rules) and once with
    nothing (its keys for the duplicated n-gram rules); numpy's cumulative sum of the word lengths gives
    where each word starts, and an n-gram is one slice from the start of its first word to the end of its last.
    """

    def __init__(self, words: list[str]):
        self.n_words = len(words)
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self._joined = {" ": " ".join(words), "": "".join(words)}
        self._starts = {
            " ": np.concatenate(([0], np.cumsum(lengths + 1))),
            "": np.concatenate(([0], np.cumsum(lengths))),
        }

    def grams(self, n: int, sep: str) -> list[str]:
        """The n-grams in order, words joined with ``sep`` ("" or " ")."""
        count = self.n_words - n + 1
        if count <= 0:
            return []
        starts = self._starts[sep]
        first, end = starts[:count].tolist(), (starts[n : n + count] - len(sep)).tolist()
        return list(map(self._joined[sep].__getitem__, map(slice, first, end)))


def top_ngram_chars(grams: NGrams, n: int) -> int:
    """Characters covered by the most frequent n-gram (its length times its count; the first one met wins a tie)."""
    ngrams = grams.grams(n, " ")
    if not ngrams:
        return 0
    gram, count = Counter(ngrams).most_common(1)[0]
    return len(gram) * count


def duplicated_ngram_chars(grams: NGrams, n: int) -> int:
    """Characters of the n-grams that repeat an earlier one, scanning left to right and jumping past each repeat.

    The scan is sequential (a jump decides what is seen next), but most pages have no repeated n-gram at
    all: a set of all n-grams the size of the list says so in one pass, and the loop runs only otherwise.
    """
    ngrams = grams.grams(n, "")
    if len(set(ngrams)) == len(ngrams):
        return 0
    seen: set[str] = set()
    repeated = i = 0
    while i < len(ngrams):
        gram = ngrams[i]
        if gram in seen:
            repeated += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated


@dataclass(frozen=True)
class RepetitionThresholds:
    """Gopher's table A1 (datatrove's defaults); ``None`` switches a rule off, an empty tuple the n-gram rules."""

    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))


@dataclass
class GopherRepetition(Filter):
    """Drop a page with repeated lines, paragraphs or n-grams (Gopher's repetition rules, decisions as datatrove's).

    ``reason`` returns datatrove's names: "empty", "dup_para_frac", "dup_para_char_frac", "dup_line_frac",
    "dup_line_char_frac", "top_{n}_gram", "duplicated_{n}_n_grams".
    """

    thresholds: RepetitionThresholds = field(default_factory=RepetitionThresholds)
    split: WordSplitter = split_words
    name: str = "gopher_repetition"

    def reason(self, text: str) -> str | None:
        t = self.thresholds
        if not text:
            return "empty"
        n_chars = len(text)
        paragraphs = _PARAGRAPHS.split(text.strip())
        n_dup, dup_chars = duplicates(paragraphs)
        if t.dup_para_frac and n_dup / len(paragraphs) > t.dup_para_frac:
            return "dup_para_frac"
        if t.dup_para_char_frac and dup_chars / n_chars > t.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINES.split(text)
        n_dup, dup_chars = duplicates(lines)
        if t.dup_line_frac and n_dup / len(lines) > t.dup_line_frac:
            return "dup_line_frac"
        if t.dup_line_char_frac and dup_chars / n_chars > t.dup_line_char_frac:
            return "dup_line_char_frac"
        grams = NGrams(self.split(text))
        for n, frac in t.top_n_grams:
            if top_ngram_chars(grams, n) / n_chars > frac:
                return f"top_{n}_gram"
        for n, frac in t.dup_n_grams:
            if duplicated_ngram_chars(grams, n) / n_chars > frac:
                return f"duplicated_{n}_n_grams"
        return None
