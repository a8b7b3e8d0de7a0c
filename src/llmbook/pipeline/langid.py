"""Language identification: keep the pages in the language the model is for.

A crawl mixes every language of the web; an English model wants English pages. FineWeb (Penedo et al. 2024)
keeps a page when fastText's language classifier gives English a score of at least 0.65. Two detectors here:

- ``LinguaLangID``: the ``lingua-language-detector`` package (offline: its n-gram models ship inside the
  wheel), restricted to the languages one expects, which makes it faster and more accurate. Built once (the
  models load on first use, seconds), it gives a confidence for every language it knows.
- ``CharNgramLangID``: the idea underneath, from scratch. A language has its own letter statistics ("th",
  "the" in English, "ij" in Dutch, "ß" in German, a script of its own for Greek, Russian, Chinese). Count
  the character 1-, 2- and 3-grams of labelled texts, hashed into a fixed number of buckets (no
  vocabulary to store), and classify by multinomial naive Bayes: the language whose n-gram frequencies
  make the text most likely (Cavnar and Trenkle 1994 used n-gram profiles; naive Bayes over them is the
  textbook version). All counting is numpy over the text's code points, no per-character Python loop.

``LanguageFilter`` drops a page whose English confidence is below a threshold (0.65, FineWeb's choice for
fastText's score; lingua's confidences are a different model's, so the same number is a starting point,
not an equivalence). ``langid_agreement`` trains the n-gram classifier on part of a labelled corpus and
compares both detectors with the truth and with each other on the rest.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from llmbook.pipeline.document import Document
from llmbook.pipeline.stage import Decision, Filter

DEFAULT_LANGUAGES: tuple[str, ...] = ("en", "fr", "de", "es", "it", "nl", "pt", "ru", "el", "zh")
FINEWEB_THRESHOLD = 0.65  # FineWeb keeps a page with fastText English score >= 0.65 (Penedo et al. 2024)
MAX_CHARS = 1000  # the n-gram classifier reads a page's first 1,000 characters: enough to tell a language
LINGUA_MAX_CHARS = 300  # lingua reads 300: 3x the pages/s of 1,000 (measured 1,381 vs 447, 10 languages)


class LinguaLangID:
    """lingua's detector restricted to ``languages`` (ISO 639-1 codes); ``predict_proba`` gives confidences."""

    def __init__(
        self, languages: Sequence[str] = DEFAULT_LANGUAGES, max_chars: int = LINGUA_MAX_CHARS, preload: bool = True
    ):
        from lingua import IsoCode639_1, LanguageDetectorBuilder

        codes = []
        for code in languages:
            try:
                codes.append(IsoCode639_1.from_str(code))
            except ValueError:
                raise ValueError(f"lingua knows no language with ISO 639-1 code {code!r}") from None
        if len(codes) < 2:
            raise ValueError("a language detector needs at least two languages to choose between")
        start = time.perf_counter()
        builder = LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
        self.detector = (builder.with_preloaded_language_models() if preload else builder).build()
        self.build_seconds = time.perf_counter() - start
        self.languages = tuple(languages)
        self.max_chars = max_chars
        self._index = {code.name.lower(): i for i, code in enumerate(codes)}

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Confidence of each language (columns in ``self.languages`` order) for each text; rows sum to 1 or 0."""
        texts = [t[: self.max_chars] for t in texts]
        try:
            confidences = self.detector.compute_language_confidence_values_in_parallel(texts)
        except UnicodeEncodeError:  # a lone surrogate (broken UTF-16 in the source) cannot cross into Rust
            texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
            confidences = self.detector.compute_language_confidence_values_in_parallel(texts)
        out = np.zeros((len(texts), len(self.languages)))
        for row, values in enumerate(confidences):
            for v in values:
                out[row, self._index[v.language.iso_code_639_1.name.lower()]] = v.value
        return out

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most likely language of each text ("unknown" when lingua finds no letters to judge)."""
        proba = self.predict_proba(texts)
        return [self.languages[i] if p[i] > 0 else "unknown" for p, i in zip(proba, proba.argmax(1), strict=True)]


def char_ngram_ids(text: str, buckets: int, orders: Sequence[int] = (1, 2, 3)) -> np.ndarray:
    """Hashed ids of the character n-grams of the lower-cased text padded with a space (" the" is a word start).

    The code points become a numpy array; an n-gram's id is a polynomial of its code points modulo
    ``buckets``, computed for all positions at once. Collisions merge a few n-grams: harmless with enough buckets.
    """
    codes = np.frombuffer(f" {text.lower()} ".encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
    ids = []
    for n in orders:
        if len(codes) < n:
            continue
        h = np.full(len(codes) - n + 1, n, dtype=np.int64)
        for k in range(n):
            h = (h * 1_000_003 + codes[k : len(codes) - n + 1 + k]) % 2_147_483_647
        ids.append(h % buckets)
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


@dataclass
class CharNgramLangID:
    """Multinomial naive Bayes over hashed character 1-3 grams, from scratch (deterministic: no randomness to seed).

    ``fit`` counts n-grams per language; a language's log-probability of an n-gram is its smoothed
    relative frequency (add-``alpha``); a text's score is the sum over its n-grams plus the log prior.
    """

    buckets: int = 1 << 16
    alpha: float = 0.01  # small: a language with few training pages is not drowned in smoothing (measured)
    max_chars: int = MAX_CHARS
    languages: tuple[str, ...] = field(default=(), init=False)
    log_prob: np.ndarray | None = field(default=None, init=False, repr=False)  # (buckets, languages)
    log_prior: np.ndarray | None = field(default=None, init=False, repr=False)

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> CharNgramLangID:
        if len(texts) != len(labels) or not texts:
            raise ValueError(f"fit needs as many labels as texts (and some texts): {len(texts)} texts, {len(labels)}")
        self.languages = tuple(sorted(set(labels)))
        index = {lang: i for i, lang in enumerate(self.languages)}
        counts = np.zeros((len(self.languages), self.buckets))
        docs = np.zeros(len(self.languages))
        for text, label in zip(texts, labels, strict=True):
            counts[index[label]] += np.bincount(
                char_ngram_ids(text[: self.max_chars], self.buckets), minlength=self.buckets
            )
            docs[index[label]] += 1
        smoothed = counts + self.alpha
        self.log_prob = np.ascontiguousarray((np.log(smoothed) - np.log(smoothed.sum(1, keepdims=True))).T)
        self.log_prior = np.log(docs / docs.sum())
        return self

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """Log-likelihood plus log prior of each language for each text (columns in ``self.languages`` order)."""
        if self.log_prob is None:
            raise ValueError("CharNgramLangID is not trained: call fit(texts, labels) first")
        out = np.empty((len(texts), len(self.languages)))
        for row, text in enumerate(texts):
            out[row] = self.log_prob[char_ngram_ids(text[: self.max_chars], self.buckets)].sum(0) + self.log_prior
        return out

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Posterior probabilities (softmax of the scores): naive Bayes is overconfident, rows are near 0/1."""
        s = self.scores(texts)
        s -= s.max(1, keepdims=True)
        p = np.exp(s)
        return p / p.sum(1, keepdims=True)

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.languages[i] for i in self.scores(texts).argmax(1)]


@dataclass
class LanguageFilter(Filter):
    """Keep a page when the detector's confidence in ``language`` is at least ``threshold`` (FineWeb: 0.65).

    ``detector`` is anything with ``languages`` and ``predict_proba(texts)`` (``LinguaLangID`` by default,
    built on first use). ``run`` asks the detector about a batch of pages at once (lingua then uses its
    threads). The drop reason is "langid:<best language>".
    """

    detector: LinguaLangID | CharNgramLangID | None = None
    language: str = "en"
    threshold: float = FINEWEB_THRESHOLD
    batch_size: int = 256
    name: str = "langid"

    def _detector(self) -> LinguaLangID | CharNgramLangID:
        if self.detector is None:
            self.detector = LinguaLangID()
        if self.language not in self.detector.languages:
            raise ValueError(
                f"the detector does not know {self.language!r}; it knows {', '.join(self.detector.languages)}"
            )
        return self.detector

    def reasons(self, texts: Sequence[str]) -> list[str | None]:
        detector = self._detector()
        proba = detector.predict_proba(texts)
        column = detector.languages.index(self.language)
        out: list[str | None] = []
        for p in proba:
            if p[column] >= self.threshold:
                out.append(None)
            else:
                out.append(detector.languages[int(p.argmax())] if p.max() > 0 else "unknown")
        return out

    def reason(self, text: str) -> str | None:
        return self.reasons([text])[0]

    def run(self, docs: Iterable[Document]) -> Iterator[Decision]:
        batch: list[Document] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) == self.batch_size:
                yield from self._decide(batch)
                batch = []
        yield from self._decide(batch)

    def _decide(self, batch: list[Document]) -> Iterator[Decision]:
        if not batch:
            return
        for doc, why in zip(batch, self.reasons([d.text for d in batch]), strict=True):
            yield doc, (None if why is None else f"{self.name}:{why}")


def langid_agreement(
    docs: Sequence[Document], train_fraction: float = 0.5, seed: int = 0, lingua: LinguaLangID | None = None
) -> dict:
    """Train ``CharNgramLangID`` on a seeded split of ``docs`` (labels: ``metadata["lang"]``), test both detectors.

    Returns the held-out accuracy of each against the labels (overall and on the non-English pages), how
    often the two agree, each one's documents/s, lingua's build seconds and the languages' counts.
    """
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction is a share in (0, 1), got {train_fraction}")
    docs = [d for d in docs if d.metadata.get("lang")]
    if len(docs) < 4:
        raise ValueError("langid_agreement needs documents labelled with metadata['lang'] (at least 4)")
    order = np.random.default_rng(seed).permutation(len(docs))
    cut = int(len(docs) * train_fraction)
    train = [docs[i] for i in order[:cut]]
    test = [docs[i] for i in order[cut:]]
    truth = [d.metadata["lang"] for d in test]
    texts = [d.text for d in test]
    lingua = lingua or LinguaLangID(sorted({d.metadata["lang"] for d in docs} | {"en", "fr"}))
    ngram = CharNgramLangID().fit([d.text for d in train], [d.metadata["lang"] for d in train])
    start = time.perf_counter()
    by_lingua = lingua.predict(texts)
    lingua_s = time.perf_counter() - start
    start = time.perf_counter()
    by_ngram = ngram.predict(texts)
    ngram_s = time.perf_counter() - start
    foreign = [i for i, t in enumerate(truth) if t != "en"]

    def accuracy(pred: list[str], rows: Iterable[int]) -> float:
        rows = list(rows)
        return sum(pred[i] == truth[i] for i in rows) / len(rows) if rows else float("nan")

    return {
        "n_train": len(train),
        "n_test": len(test),
        "languages": {lang: truth.count(lang) for lang in sorted(set(truth))},
        "lingua_accuracy": accuracy(by_lingua, range(len(test))),
        "ngram_accuracy": accuracy(by_ngram, range(len(test))),
        "lingua_accuracy_foreign": accuracy(by_lingua, foreign),
        "ngram_accuracy_foreign": accuracy(by_ngram, foreign),
        "agreement": sum(a == b for a, b in zip(by_lingua, by_ngram, strict=True)) / len(test),
        "lingua_docs_per_s": len(test) / lingua_s if lingua_s else float("inf"),
        "ngram_docs_per_s": len(test) / ngram_s if ngram_s else float("inf"),
        "lingua_build_s": lingua.build_seconds,
        "disagreements": [
            {"id": d.id, "truth": t, "lingua": a, "ngram": b, "text": d.text[:200]}
            for d, t, a, b in zip(test, truth, by_lingua, by_ngram, strict=True)
            if a != b
        ][:10],
    }
