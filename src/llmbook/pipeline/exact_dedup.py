"""Exact deduplication: whole documents by a hash of their normalized text, and boilerplate lines across documents.

The web repeats itself: mirrors, syndicated articles, the same page under
two URLs. A copy teaches a model nothing new and, trained on often enough,
is memorised (Lee et al. 2022, "Deduplicating Training Data Makes Language
Models Better"). The cheapest test is equality: hash each document's
normalized text (lower case, NFKC, no punctuation, single spaces, as
``text.normalize``) and keep the first document of each hash. Eight bytes of
blake2b make a collision between two different texts about as likely as
2^-64 per pair: nothing in a corpus of billions.

Copies also hide *inside* pages: every page of a site carries its navigation
bar, cookie banner and footer. CCNet (Wenzek et al. 2020) removes paragraphs
that repeat across the pages of a crawl shard, Dolma (Soldaini et al. 2024)
removes repeated paragraphs with a Bloom filter, and RefinedWeb (Penedo et
al. 2023) corrects pages line by line and removes repeated spans with a
suffix array (Lee et al.'s ExactSubstr). ``LineDedup`` is the idea at its
simplest: a line found in at least ``min_docs`` documents is the site's
template, not anybody's text.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import deque
from collections.abc import Iterable

import numpy as np

from llmbook.pipeline.document import Document
from llmbook.pipeline.stage import Decision, Stage

_WORD = re.compile(r"\w+", re.UNICODE)
_BLANK_RUNS = re.compile(r"\n\s*\n(\s*\n)+")
# bytes.translate tables for ASCII text: every byte that is not [A-Za-z0-9_] (a \w character) becomes a space
_NON_WORD = bytes(b if chr(b).isalnum() or b == ord("_") else 32 for b in range(128)) + bytes(range(128, 256))
_NON_WORD_KEEP_LINES = bytes(10 if b == 10 else x for b, x in enumerate(_NON_WORD))  # ... but "\n" stays


def normalized_words(text: str) -> list[str]:
    """``text.words(text)`` (the ``\\w+`` runs of ``text.normalize(text)``), twice as fast.

    ``text.normalize`` lower-cases the NFKC form and replaces punctuation by
    spaces before splitting, which cannot move the start or end of a
    ``\\w+`` run, so NFKC (skipped for ASCII), lower case and ``\\w+`` give
    the same words (a test checks it on ASCII and Unicode text).
    """
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return _WORD.findall(text.lower())


def word_bytes(text: str) -> list[bytes]:
    """``normalized_words(text)`` as UTF-8 bytes; ASCII text (most of a crawl) takes a bytes-only path.

    For ASCII, one ``bytes.translate`` turns every non-word byte into a space
    and ``split()`` cuts there: no regex, no per-character Python, 2x faster.
    """
    if text.isascii():
        return text.encode("ascii").translate(_NON_WORD).lower().split()
    return [w.encode("utf-8") for w in normalized_words(text)]


def normalized_bytes(text: str) -> bytes:
    """``text.normalize(text).encode()``: what exact deduplication hashes."""
    return b" ".join(word_bytes(text))


def line_keys(text: str) -> list[bytes]:
    """Each line's normalized bytes, for the lines of ``text.split("\\n")``; ``b""`` for a blank line."""
    if text.isascii():
        return [b" ".join(line.split()) for line in text.encode("ascii").translate(_NON_WORD_KEEP_LINES).lower()
                .split(b"\n")]
    return [" ".join(normalized_words(line)).encode("utf-8") for line in text.split("\n")]


def _hash8(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def text_hash(text: str) -> bytes:
    """8 bytes of blake2b of the normalized text: equal for copies that differ in case, punctuation or spacing."""
    return _hash8(normalized_bytes(text))


class _InCorpusOrder:
    """Maps a document handed to ``apply`` back to its position in the corpus ``fit`` read (ids may repeat)."""

    def _remember(self, docs: list[Document]) -> None:
        self._positions: dict[str, deque[int]] = {}
        for i, doc in enumerate(docs):
            self._positions.setdefault(doc.id, deque()).append(i)

    def _position(self, doc: Document) -> int:
        positions = getattr(self, "_positions", None)
        if positions is None:
            raise ValueError(f"{type(self).__name__} decides from the whole corpus: call fit(docs) or run(docs) first")
        queue = positions.get(doc.id)
        if not queue:
            raise ValueError(f"document {doc.id!r} was not in the corpus given to {type(self).__name__}.fit "
                             "(or was applied twice): fit again on the documents you apply to")
        return queue.popleft()


class ExactDedup(_InCorpusOrder, Stage):
    """Drop every document whose normalized text equals an earlier one's ("exact_dedup:duplicate").

    The first copy in corpus order is kept; a dropped copy's metadata names
    it (``exact_dup_of``). ``fit`` hashes each text once; ``apply`` then
    answers from that pass, in the same order.
    """

    name = "exact_dedup"
    needs_fit = True

    def fit(self, docs: Iterable[Document]) -> None:
        docs = list(docs)
        first: dict[bytes, int] = {}
        self._first_of = np.empty(len(docs), dtype=np.int64)  # position of the first document with the same hash
        for i, doc in enumerate(docs):
            self._first_of[i] = first.setdefault(text_hash(doc.text), i)
        self._ids = [d.id for d in docs]
        self._remember(docs)
        self.duplicates = int((self._first_of != np.arange(len(docs))).sum())

    def apply(self, doc: Document) -> Decision:
        i = self._position(doc)
        first = int(self._first_of[i])
        if first == i:
            return doc, None
        return Document(doc.id, doc.text, {**doc.metadata, "exact_dup_of": self._ids[first]}), f"{self.name}:duplicate"


class LineDedup(_InCorpusOrder, Stage):
    """Remove lines that appear in at least ``min_docs`` documents: navigation, cookie banners, license footers.

    The rule, line by line (a line is the text between two newlines):

    - lines are compared normalized (``text.normalize``), so "Back to top"
      and "BACK TO TOP!" are one line;
    - a blank or punctuation-only line ("", "* * *") never counts and is
      always kept: it is layout, and paragraph breaks keep their meaning;
    - a line counts once per document however often it repeats there, so a
      poem's refrain or a list of identical bullets inside one page is kept;
    - there is no minimum length: Project Gutenberg's license, wrapped at 70
      columns, leaves lines like "works" or "that" in every copy, and a length
      rule would leave that debris behind. ``min_docs`` is the guard against
      chance: an ordinary short line ("Yes.") is rarely in that many pages.

    Every occurrence is removed, the first included: the template belongs to
    no page. Removal leaves at most one blank line between paragraphs. A page
    left without any word is dropped ("line_dedup:empty"); a kept page that
    lost lines records how many in ``metadata["lines_removed"]``. Run it after
    exact and near deduplication: two copies of a page share all their lines.
    """

    name = "line_dedup"
    needs_fit = True

    def __init__(self, min_docs: int = 5) -> None:
        if min_docs < 2:
            raise ValueError(f"min_docs is how many documents must share a line (at least 2), got {min_docs}")
        self.min_docs = min_docs
        self.repeated: set[bytes] = set()  # hashes of the lines to remove, once fit

    @staticmethod
    def _doc_keys(text: str) -> np.ndarray:
        keys = {_hash8(k) for k in line_keys(text) if k}
        return np.frombuffer(b"".join(sorted(keys)), dtype=np.uint64)

    def fit(self, docs: Iterable[Document]) -> None:
        docs = list(docs)
        # Every document's distinct line hashes in one array, counted with np.unique: a dict of every line of a
        # large corpus would cost ~100 bytes a line, the array 8.
        per_doc = [self._doc_keys(d.text) for d in docs]
        sizes = np.array([len(k) for k in per_doc], dtype=np.int64)
        all_keys = np.concatenate(per_doc) if per_doc else np.zeros(0, dtype=np.uint64)
        values, counts = np.unique(all_keys, return_counts=True)
        repeated = values[counts >= self.min_docs]
        self.repeated = {v.tobytes() for v in repeated}
        # which documents hold a repeated line: apply leaves the others alone without reading them again
        hit = np.isin(all_keys, repeated)
        owner = np.repeat(np.arange(len(docs)), sizes)
        self._touched = np.zeros(len(docs), dtype=bool)
        self._touched[owner[hit]] = True
        self._remember(docs)

    def apply(self, doc: Document) -> Decision:
        i = self._position(doc)  # first: it says "call fit" when fit was not called
        if not self._touched[i]:
            return doc, None
        lines = doc.text.split("\n")
        keys = line_keys(doc.text)
        kept = [line for line, k in zip(lines, keys, strict=True) if not k or _hash8(k) not in self.repeated]
        if len(kept) == len(lines):
            return doc, None
        text = _BLANK_RUNS.sub("\n\n", "\n".join(kept)).strip("\n")
        out = Document(doc.id, text, {**doc.metadata, "lines_removed": len(lines) - len(kept)})
        return out, (None if word_bytes(text) else f"{self.name}:empty")
