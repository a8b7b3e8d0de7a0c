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


_BASE = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)


def _powers(base: int, n: int) -> np.ndarray:
    """base**0 .. base**n modulo 2**64 (numpy's uint64 arithmetic wraps around, which is the modulo)."""
    out = np.empty(n + 1, dtype=np.uint64)
    out[0] = 1
    out[1:] = base
    return np.cumprod(out, dtype=np.uint64)


class NGrams:
    """A page's word n-grams as 64-bit hashes of their exact text: every n-gram of every n in a few numpy passes.

    datatrove compares n-grams as strings: the words joined with a space (top n-gram rules) or with nothing
    (duplicated n-gram rules). Here each joined string gets a polynomial prefix hash over its characters,
    sum of c_k * B**k modulo 2**64, so the hash of any substring (an n-gram: from the start of its first word
    to the end of its last) is one subtraction and one multiplication, for all n-grams at once. Two n-grams
    are taken as equal when their hash and length are: a false match needs a 64-bit collision.
    """

    def __init__(self, words: list[str]):
        self.n_words = len(words)
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self._tables = {}
        for sep in (" ", ""):
            text = sep.join(words)
            codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
            prefix = np.zeros(len(codes) + 1, dtype=np.uint64)
            np.cumsum((codes + np.uint64(1)) * _powers(_BASE, len(codes))[:-1], out=prefix[1:])
            starts = np.concatenate(([0], np.cumsum(lengths + len(sep))))
            self._tables[sep] = (prefix, _powers(_BASE_INV, len(codes)), starts)

    def hashes(self, n: int, sep: str) -> tuple[np.ndarray, np.ndarray]:
        """(hash, length) of every n-gram in order, words joined with ``sep`` ("" or " ")."""
        count = self.n_words - n + 1
        if count <= 0:
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
        prefix, inverse, starts = self._tables[sep]
        first, end = starts[:count], starts[n : n + count] - len(sep)
        h = (prefix[end] - prefix[first]) * inverse[first]
        return h ^ (end - first).astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93), end - first


def top_ngram_chars(grams: NGrams, n: int) -> int:
    """Characters covered by the most frequent n-gram (its length times its count; the first one met wins a tie).

    datatrove takes ``Counter(ngrams).most_common(1)``, which breaks a tie by insertion order: of the n-grams
    with the highest count, the one that occurs first. ``np.unique`` gives each distinct hash's count and
    first position, so that is the smallest first position among the highest counts.
    """
    h, length = grams.hashes(n, " ")
    if len(h) == 0:
        return 0
    _, first, counts = np.unique(h, return_index=True, return_counts=True)
    best = counts.max()
    at = int(first[counts == best].min())
    return int(length[at]) * int(best)


def duplicated_ngram_chars(grams: NGrams, n: int) -> int:
    """Characters of the n-grams that repeat an earlier one, scanning left to right and jumping past each repeat.

    datatrove's scan visits every position; one that repeats a *seen* n-gram counts and makes the scan jump
    n positions (the n-grams jumped over are never seen). Only a position whose n-gram occurred before can
    count, so this visits just those (numpy finds them): such a position repeats a seen n-gram when the
    n-gram's first occurrence was not jumped over, or an earlier visited occurrence was added to the seen set.
    """
    h, length = grams.hashes(n, "")
    ordered = np.sort(h)
    if not (ordered[1:] == ordered[:-1]).any():  # no n-gram occurs twice (most pages): nothing to scan
        return 0
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    first_at = first[inverse]
    candidates = np.flatnonzero(first_at < np.arange(len(h)))
    if len(candidates) == 0:
        return 0
    jumped = bytearray(len(h))
    seen_later: set[int] = set()
    repeated = resume = 0
    for c, key, f, size in zip(
        candidates.tolist(),
        h[candidates].tolist(),
        first_at[candidates].tolist(),
        length[candidates].tolist(),
        strict=True,
    ):
        if c < resume:
            continue  # jumped over
        if not jumped[f] or key in seen_later:
            repeated += size
            jumped[c + 1 : c + n] = b"\x01" * (n - 1)
            resume = c + n
        else:
            seen_later.add(key)
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
