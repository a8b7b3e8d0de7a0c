"""The text helpers every stage shares, so that "a word" and "a shingle" mean one thing throughout the chapter."""

from __future__ import annotations

import re
import unicodedata

_WORD = re.compile(r"\w+", re.UNICODE)
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+", re.UNICODE)


def normalize(text: str) -> str:
    """Lower-case, NFKC, punctuation removed, whitespace collapsed: two copies that differ only in those are equal.

    This is the normalisation exact and near deduplication hash (datatrove's
    ``simplify_text`` does the same steps), so "the same text" survives a
    changed quote mark or a re-wrapped line.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCT.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def words(text: str) -> list[str]:
    """The normalized text's words (``\\w+`` runs)."""
    return _WORD.findall(normalize(text))


def word_shingles(text: str, n: int = 5) -> set[str]:
    """The set of n consecutive normalized words (n=5 as datatrove's MinHash); a text shorter than n is one shingle."""
    if n < 1:
        raise ValueError(f"a shingle has at least one word, got n={n}")
    w = words(text)
    if len(w) < n:
        return {" ".join(w)} if w else set()
    return {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """|A ∩ B| / |A ∪ B|: the similarity MinHash estimates; 1.0 for two empty sets (nothing tells them apart)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)
