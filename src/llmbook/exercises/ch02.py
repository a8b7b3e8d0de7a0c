"""Checks for Chapter 2's exercises: a Gopher rule, MinHash, choosing LSH bands, near-deduplication, PII masking.

The references are the libraries that run these stages at web scale:
``datatrove``'s ``GopherQualityFilter`` (the Gopher rules' keep/drop decision
and reason), ``datasketch``'s ``MinHash`` (the same permutations, so the
reader's signatures must be *identical*, not merely close), ``datasketch``'s
LSH parameter choice (``datasketch.lsh._optimal_param``) and ``MinHashLSH``
(the candidate pairs of the same bands), and ``datatrove``'s ``PIIFormatter``
for what it agrees with. The near-deduplication check also knows the truth:
its small corpus is planted (:func:`planted_corpus`), so it can say "this
cluster kept no document" as well as "your candidates differ from
datasketch's".

A wrong answer is compared with what the usual mistakes compute (a missing
pre-mix, Python's salted ``hash()``, overlapping bands, no verification, a
union-find that links non-roots, keeping the last copy, ...) and the check
names the mistake.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from llmbook.exercises import exercise
from llmbook.pipeline.text import jaccard, word_shingles

MASK32 = 0xFFFFFFFF

# ---------------------------------------------------------------------------
# 2.1 a Gopher rule
# ---------------------------------------------------------------------------

GOPHER_REASONS = ("gopher_short_doc", "gopher_long_doc", "gopher_below_avg_threshold",
                  "gopher_above_avg_threshold", "gopher_too_many_hashes", "gopher_too_many_ellipsis",
                  "gopher_too_many_bullets", "gopher_too_many_end_ellipsis")


def gopher_words(text: str) -> list[str]:
    """datatrove's words: spaCy's blank English tokenizer (punctuation tokens are words too)."""
    return list(_gopher_words(text))


@lru_cache(maxsize=64)
def _gopher_words(text: str) -> tuple[str, ...]:
    from datatrove.utils.text import split_into_words

    return tuple(split_into_words(text, "en"))


def punctuation_set() -> frozenset[str]:
    """datatrove's ``PUNCTUATION_SET``: a word made only of these characters is a "symbol word"."""
    from datatrove.utils.text import PUNCTUATION_SET

    return frozenset(PUNCTUATION_SET)


@lru_cache(maxsize=64)
def reference_gopher(text: str) -> str | None:
    """datatrove's ``GopherQualityFilter`` with the alphabetic and stop-word rules off: None (keep) or its reason."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter

    f = GopherQualityFilter(max_non_alpha_words_ratio=None, min_stop_words=None)
    result = f.filter(Document(text=text, id="0"))
    if result is True:
        return None
    return result[1]


def _prose(n_words: int, start: int = 0) -> str:
    """n ordinary English words from Pride and Prejudice's opening (mean length about 4), no '#' or ellipses."""
    base = ("it is a truth universally acknowledged that a single man in possession of a good fortune must be in "
            "want of a wife however little known the feelings or views of such a man may be on his first entering "
            "a neighbourhood this truth is so well fixed in the minds of the surrounding families that he is "
            "considered the rightful property of some one or other of their daughters").split()
    return " ".join(base[(start + i) % len(base)] for i in range(n_words))


def gopher_cases() -> list[tuple[str, str]]:
    """(what, text): texts crafted around each rule's threshold, and past the usual mistakes."""
    prose = _prose(80)
    short_words = " ".join(["a", "an", "to", "be", "of", "it"] * 10 + ["the"] * 2)  # mean 1.9
    long_words = " ".join(["internationalization", "characteristically", "incomprehensibility"] * 20)
    exactly_three = " ".join(["cat", "dog"] * 30)  # mean exactly 3: not below 3
    commas = " , ".join(_prose(60, 3).split()) + " ."  # many punctuation words: mean of the words only
    hashes = prose + " " + " ".join(f"#tag{i}" for i in range(10))  # 10 of about 100 words: over 0.1?
    few_hashes = _prose(95) + " #one #two #three #four #five"
    ellipses = _prose(60) + " wait... " * 4 + " and … so … on … and … on"  # "..." and "…" both count
    end_ellipses = "\n".join([_prose(12, i) + "..." for i in range(4)] + [_prose(12, i) for i in range(6)])
    end_ellipses_30 = "\n".join([_prose(12, i) + " …" for i in range(3)] + [_prose(12, i) for i in range(7)])
    bullets = "\n".join(f"• {_prose(8, i)}" for i in range(10))
    indented_bullets = "\n".join(f"   - {_prose(8, i)}" for i in range(10))
    bullets_90 = "\n".join([f"- {_prose(8, i)}" for i in range(9)] + [_prose(8, 3)])
    return [
        ("ordinary prose, 80 words", prose),
        ("49 words", _prose(49)),
        ("50 words", _prose(50)),
        ("20 words and 40 punctuation marks", " . , ".join(_prose(20).split())),
        ("short words (mean 1.9 characters)", short_words),
        ("long words (mean 19 characters)", long_words),
        ("words of exactly 3 characters on average", exactly_three),
        ("prose with a comma after every word", commas),
        ("10 hashtags in about 100 words", hashes),
        ("5 hashtags in 100 words", few_hashes),
        ("20 hashtags in 80 words", prose + " " + " ".join(f"#tag{i}" for i in range(20))),
        ("ellipses, '...' and '…'", ellipses),
        ("4 of 10 lines end in '...'", end_ellipses),
        ("3 of 10 lines end in ' …'", end_ellipses_30),
        ("10 lines of 10 start with '•'", bullets),
        ("10 indented lines of 10 start with '-'", indented_bullets),
        ("9 lines of 10 start with '-'", bullets_90),
    ]


def _gopher_variant(text: str, words: list[str], mistake: str) -> str | None:
    """The rules with one typical mistake (for the hints): the formula of the solution, changed in one place."""
    punct = punctuation_set()
    non_symbol = [w for w in words if any(c not in punct for c in w)]
    counted = words if mistake == "count_all_words" else non_symbol
    if len(counted) < 50:
        return "gopher_short_doc"
    if len(counted) > 100_000:
        return "gopher_long_doc"
    lengths = [len(w) for w in (words if mistake == "mean_all_words" else non_symbol)]
    mean = sum(lengths) / len(lengths)
    if (mean <= 3) if mistake == "inclusive" else (mean < 3):
        return "gopher_below_avg_threshold"
    if mean > 10:
        return "gopher_above_avg_threshold"
    denominator = len(non_symbol) if mistake == "ratio_non_symbol" else len(words)
    if text.count("#") / denominator > 0.1:
        return "gopher_too_many_hashes"
    dots = text.count("...") + (0 if mistake == "no_unicode_ellipsis" else text.count("…"))
    if dots / denominator > 0.1:
        return "gopher_too_many_ellipsis"
    lines = text.splitlines()
    strip = (lambda s: s) if mistake == "no_strip" else str.lstrip
    bullets = sum(strip(s).startswith(("•", "-")) for s in lines)
    if (bullets / len(lines) >= 0.9) if mistake == "inclusive" else (bullets / len(lines) > 0.9):
        return "gopher_too_many_bullets"
    rstrip = (lambda s: s) if mistake == "no_strip" else str.rstrip
    ends = ("...",) if mistake == "no_unicode_ellipsis" else ("...", "…")
    if sum(rstrip(s).endswith(ends) for s in lines) / len(lines) > 0.3:
        return "gopher_too_many_end_ellipsis"
    return None


GOPHER_MISTAKES = {
    "count_all_words": "you counted every word, punctuation included: Gopher's word count (and datatrove's) counts "
                       "only words with at least one character that is not punctuation",
    "mean_all_words": "the mean word length includes the punctuation 'words' (',' has length 1): average over the "
                      "words with at least one non-punctuation character",
    "ratio_non_symbol": "the symbol-to-word ratio divides by the non-symbol words: datatrove divides the count of "
                        "'#' (and of ellipses) by all words, punctuation included",
    "no_unicode_ellipsis": "the ellipsis character '…' (U+2026) is an ellipsis too: count it next to '...'",
    "no_strip": "a line's bullet may be indented and its ellipsis followed by spaces: test s.lstrip() and "
                "s.rstrip()",
    "inclusive": "the thresholds are strict: a mean word length of exactly 3 passes, and so do 90 % bullet lines "
                 "(drop only when the value is *outside* the range, as datatrove does)",
}


@exercise("2.1", solution="gopher_rule")
def check_gopher_rule(gopher_rule: Callable[[str, list[str]], str | None]):
    for what, text in gopher_cases():
        words = gopher_words(text)
        got = gopher_rule(text, list(words))
        want = reference_gopher(text)
        if got not in (None, *GOPHER_REASONS):
            raise AssertionError(f"gopher_rule({what}) returned {got!r}: return None (keep) or one of datatrove's "
                                 f"reasons {', '.join(GOPHER_REASONS)}")
        if got == want:
            continue
        keep = "keep" if want is None else f"drop ({want})"
        hint = next((f"; {h}" for m, h in GOPHER_MISTAKES.items() if _gopher_variant(text, words, m) == got), "")
        raise AssertionError(f"gopher_rule({what}) returned {got!r}; datatrove's GopherQualityFilter says "
                             f"{keep}{hint}")
    # 100,001 words: datatrove's max_doc_words rule (spaCy would take seconds to split them, so the words are given)
    words = _prose(100_001).split()
    got = gopher_rule(" ".join(words), list(words))
    if got != "gopher_long_doc":
        raise AssertionError(f"gopher_rule(100,001 ordinary words) returned {got!r}, expected 'gopher_long_doc': "
                             "more than 100,000 words is too long")


# ---------------------------------------------------------------------------
# 2.2 MinHash
# ---------------------------------------------------------------------------


def permutations(num_perm: int = 128, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's ``num_perm`` hash functions for ``seed``: uint32 arrays ``a`` (odd) and ``b``.

    Permutation k maps a 32-bit hash h to ``(a[k] * h + b[k]) mod 2**32``
    (datasketch 2.0's default "affine32" scheme).
    """
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed).permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def reference_signature(shingles: Iterable[str], num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """datasketch's MinHash of the shingles (sha1 of each, UTF-8): its ``hashvalues``, uint32."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=seed)
    m.update_batch([s.encode("utf-8") for s in sorted(shingles)])
    return np.asarray(m.hashvalues, dtype=np.uint32)


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (the pre-mix datasketch applies to each input hash)."""
    h = h.astype(np.uint32)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def _signature_variant(shingles: Iterable[str], a: np.ndarray, b: np.ndarray, mistake: str) -> np.ndarray:
    shingles = sorted(shingles)
    if not shingles:
        return np.full(len(a), MASK32, dtype=np.uint32)
    if mistake == "python_hash":
        h = np.array([hash(s) & MASK32 for s in shingles], dtype=np.uint64)
    else:
        order = ">I" if mistake == "big_endian" else "<I"
        h = np.array([struct.unpack(order, hashlib.sha1(s.encode()).digest()[:4])[0] for s in shingles],
                     dtype=np.uint64)
    if mistake != "no_fmix":
        h = fmix32(h).astype(np.uint64)
    values = a.astype(np.uint64)[None, :] * h[:, None] + b.astype(np.uint64)[None, :]
    if mistake != "no_wrap":
        values &= MASK32
    reduce = values.max if mistake == "max" else values.min
    return reduce(axis=0)


SIGNATURE_MISTAKES = {
    "no_fmix": "the MurmurHash3 pre-mix (fmix32) is missing: datasketch mixes each sha1 hash once before the "
               "permutations",
    "python_hash": "you hashed with Python's hash(): it is salted per process (PYTHONHASHSEED), so the same "
                   "shingle gets another value in the next run or on another machine; use sha1's first 4 bytes",
    "big_endian": "the 4 sha1 bytes are read big-endian: datasketch reads them little-endian (struct '<I', or "
                  "int.from_bytes(..., 'little'))",
    "no_wrap": "a * h + b is not reduced mod 2**32: compute in uint32 (numpy wraps) or mask with & 0xFFFFFFFF",
    "max": "the signature is the minimum of each permutation's values, not the maximum",
}


def _as_signature(got, n: int, what: str) -> np.ndarray:
    if got is None:
        raise AssertionError(f"{what} returned None; did you forget `return`?")
    arr = np.asarray(got)
    if arr.shape != (n,):
        raise AssertionError(f"{what} has shape {arr.shape}, expected ({n},): one value per permutation")
    if arr.dtype.kind not in "ui" or (arr.size and (int(arr.min()) < 0 or int(arr.max()) > MASK32)):
        raise AssertionError(f"{what}: values of dtype {arr.dtype} in [{arr.min()}, {arr.max()}]; a signature holds "
                             "32-bit hash values (np.uint32): is a * h + b not reduced mod 2**32? Compute in "
                             "uint32 (numpy wraps) or mask with & 0xFFFFFFFF")
    return arr.astype(np.uint64)


def jaccard_pairs(seed: int = 2) -> list[tuple[str, str, float]]:
    """(text a, text b, true Jaccard of their 5-word shingles): pairs from about 0.25 to 1, one passage edited."""
    rng = np.random.default_rng(seed)
    vocabulary = corpus_words()
    base = vocabulary[1000:1300]
    pairs = []
    for keep in (1.0, 0.9, 0.7, 0.5, 0.3, 0.1):
        other = list(base)
        n_change = int(round((1 - keep) * len(base) / 5))
        for i in rng.choice(len(base), size=n_change, replace=False):
            other[i] = f"x{i}"  # a word not in the passage: changes up to 5 shingles
        a, b = " ".join(base), " ".join(other)
        pairs.append((a, b, jaccard(word_shingles(a), word_shingles(b))))
    return pairs


@exercise("2.2", solution="minhash_signature")
def check_minhash(minhash_signature, estimate_jaccard):
    for num_perm, seed in ((128, 1), (64, 7)):
        a, b = permutations(num_perm, seed)
        texts = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                 "must be in want of a wife.", _prose(40, 5), "Four words, no shingle", "Ünïcödé — “quotes” ok"]
        for text in texts:
            shingles = word_shingles(text)
            what = f"minhash_signature(word_shingles({text[:30]!r}...), a, b) with num_perm={num_perm}, seed={seed}"
            got = _as_signature(minhash_signature(set(shingles), a.copy(), b.copy()), num_perm, what)
            want = reference_signature(shingles, num_perm, seed).astype(np.uint64)
            if np.array_equal(got, want):
                continue
            hint = next((f"; {h}" for m, h in SIGNATURE_MISTAKES.items()
                         if np.array_equal(got, _signature_variant(shingles, a, b, m))), "")
            raise AssertionError(f"{what}: {int((got != want).sum())} of {num_perm} values differ from "
                                 f"datasketch's MinHash{hint}")
        what = f"minhash_signature(set(), a, b) with num_perm={num_perm}"
        try:
            empty = _as_signature(minhash_signature(set(), a, b), num_perm, what)
        except (ValueError, IndexError) as exc:
            raise AssertionError(f"{what} raised {type(exc).__name__}: {exc}; an empty document's signature is "
                                 "datasketch's initial value, 2**32 - 1 in every position (np.full)") from None
        if not (empty == MASK32).all():
            raise AssertionError(f"{what}: expected 2**32 - 1 everywhere (datasketch's empty MinHash): no shingle "
                                 "has been seen, so every minimum is still the largest value")

    from datasketch import MinHash

    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.integers(0, 5, 128).astype(np.uint32)
        y = np.where(rng.random(128) < 0.6, x, rng.integers(0, 5, 128)).astype(np.uint32)
        want = MinHash(hashvalues=x, scheme="affine32").jaccard(MinHash(hashvalues=y, scheme="affine32"))
        got = estimate_jaccard(x.copy(), y.copy())
        if got is None:
            raise AssertionError("estimate_jaccard returned None; did you forget `return`?")
        if abs(float(got) - want) > 1e-12:
            hint = ""
            if abs(float(got) - jaccard(set(x.tolist()), set(y.tolist()))) < 1e-12:
                hint = ("; that is the Jaccard of the signatures' *sets of values*: the estimate is the fraction of "
                        "positions k where sig_a[k] == sig_b[k]")
            raise AssertionError(f"estimate_jaccard on two signatures that agree in {int((x == y).sum())} of 128 "
                                 f"positions returned {got}, datasketch's MinHash.jaccard gives {want}{hint}")
    try:
        estimate_jaccard(np.zeros(128, dtype=np.uint32), np.zeros(64, dtype=np.uint32))
    except ValueError:
        pass
    else:
        raise AssertionError("estimate_jaccard of signatures of 128 and 64 values returned a number: raise a "
                             "ValueError (they were made with different permutations and cannot be compared)")

    a, b = permutations(128, 1)
    for text_a, text_b, true in jaccard_pairs():
        est = float(estimate_jaccard(minhash_signature(word_shingles(text_a), a, b),
                                     minhash_signature(word_shingles(text_b), a, b)))
        sigma = math.sqrt(true * (1 - true) / 128)
        if abs(est - true) > 4 * sigma + 1e-9:
            raise AssertionError(f"a pair of true Jaccard {true:.3f}: your estimate {est:.3f} is more than 4 "
                                 f"standard errors ({sigma:.3f} each) away")


# ---------------------------------------------------------------------------
# 2.3 choosing bands and rows
# ---------------------------------------------------------------------------


def reference_s_curve(s, bands: int, rows: int):
    """P(a pair of Jaccard s shares at least one band) = 1 - (1 - s**r)**b (Leskovec et al., MMDS ch. 3)."""
    s = np.asarray(s, dtype=np.float64)
    return 1.0 - (1.0 - s**rows) ** bands


def reference_choose(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5):
    """datasketch's choice (``MinHashLSH(threshold, num_perm, weights)``): ``_optimal_param``."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, fp_weight, fn_weight)


def weighted_error(threshold: float, bands: int, rows: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> float:
    """fp_weight · ∫_0^t P(s) ds + fn_weight · ∫_t^1 (1 - P(s)) ds, with datasketch's integrals."""
    from datasketch.lsh import _false_negative_probability, _false_positive_probability

    return (fp_weight * _false_positive_probability(threshold, bands, rows)
            + fn_weight * _false_negative_probability(threshold, bands, rows))


def _choose_variant(threshold: float, num_perm: int, fp_weight: float, fn_weight: float, mistake: str):
    best, choice = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            if mistake == "equal_only" and b * r != num_perm:
                continue
            if mistake == "swapped_weights":
                err = weighted_error(threshold, b, r, fn_weight, fp_weight)
            elif mistake == "swapped_curve":
                err = weighted_error(threshold, r, b, fp_weight, fn_weight)
            else:
                err = weighted_error(threshold, b, r, fp_weight, fn_weight)
            if err < best:
                best, choice = err, (b, r)
    return choice


CHOOSE_MISTAKES = {
    "equal_only": "you searched only b·r = num_perm: datasketch tries every b·r ≤ num_perm (a few permutations "
                  "may go unused when that places the S-curve's step better)",
    "swapped_weights": "the weights are swapped: fp_weight multiplies the false-positive area (∫_0^t P(s) ds, "
                       "pairs below the threshold that become candidates), fn_weight the false-negative area",
    "swapped_curve": "b and r are swapped in the S-curve: a band of r rows matches with probability s**r, and a "
                     "pair is a candidate when any of the b bands matches: 1 - (1 - s**r)**b",
}
CHOOSE_CASES = ((0.7, 128, 0.5, 0.5), (0.8, 128, 0.5, 0.5), (0.5, 64, 0.5, 0.5), (0.85, 128, 0.9, 0.1))


@exercise("2.3", solution="choose_bands_rows")
def check_bands_rows(s_curve, choose_bands_rows):
    s = np.linspace(0, 1, 101)
    for bands, rows in ((20, 5), (5, 20), (16, 8), (1, 1)):
        got = s_curve(s, bands, rows)
        want = reference_s_curve(s, bands, rows)
        if got is None:
            raise AssertionError("s_curve returned None; did you forget `return`?")
        got = np.asarray(got, dtype=np.float64)
        if got.shape != s.shape:
            raise AssertionError(f"s_curve(101 similarities, {bands}, {rows}) has shape {got.shape}: work on numpy "
                                 "arrays element by element (no Python loop needed)")
        if not np.allclose(got, want, atol=1e-12):
            hint = ""
            if np.allclose(got, reference_s_curve(s, rows, bands), atol=1e-12):
                hint = "; b and r are swapped: 1 - (1 - s**r)**b (r rows per band, b bands)"
            elif np.allclose(got, (1 - s**rows) ** bands, atol=1e-12):
                hint = "; that is the probability that *no* band matches: the S-curve is one minus it"
            elif np.allclose(got, s ** (bands * rows), atol=1e-12):
                hint = "; that is one band of all b·r rows: any of the b bands may match"
            raise AssertionError(f"s_curve(s, bands={bands}, rows={rows}) differs from 1 - (1 - s**r)**b by up to "
                                 f"{np.abs(got - want).max():.3g}{hint}")
    for threshold, num_perm, fpw, fnw in CHOOSE_CASES:
        what = f"choose_bands_rows({threshold}, {num_perm}, fp_weight={fpw}, fn_weight={fnw})"
        got = choose_bands_rows(threshold, num_perm, fp_weight=fpw, fn_weight=fnw)
        if got is None or len(tuple(got)) != 2:
            raise AssertionError(f"{what} returned {got!r}: return a pair (bands, rows)")
        b, r = (int(v) for v in got)
        want = reference_choose(threshold, num_perm, fpw, fnw)
        if (b, r) == tuple(want):
            continue
        if b < 1 or r < 1 or b * r > num_perm:
            raise AssertionError(f"{what} = ({b}, {r}): bands and rows are at least 1 and b·r ≤ num_perm")
        best = weighted_error(threshold, *want, fpw, fnw)
        mine = weighted_error(threshold, b, r, fpw, fnw)
        if mine <= best * (1 + 1e-6) + 1e-12:  # a tie within datasketch's integration error: as good
            continue
        hint = next((f"; {h}" for m, h in CHOOSE_MISTAKES.items()
                     if _choose_variant(threshold, num_perm, fpw, fnw, m) == (b, r)), "")
        raise AssertionError(f"{what} = ({b}, {r}), weighted error {mine:.5f}; datasketch chooses {tuple(want)}, "
                             f"weighted error {best:.5f}{hint}")


# ---------------------------------------------------------------------------
# 2.4 near-deduplication, assembled
# ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _corpus_words() -> tuple[str, ...]:
    from llmbook import data

    return tuple(data.read_text("pride_and_prejudice").split())


def corpus_words() -> list[str]:
    """Pride and Prejudice's words (the Gutenberg body), in order: the passages of the planted corpus."""
    return list(_corpus_words())


@dataclass(frozen=True)
class PlantedCorpus:
    """Texts with their true near-duplicate clusters.

    ``clusters[i]`` is the planted cluster of ``texts[i]`` (an int label;
    documents of the same label are near copies of each other, directly or
    through a chain). ``kinds[i]`` says how the document was made.
    """

    texts: list[str]
    clusters: list[int]
    kinds: list[str]

    def groups(self) -> list[list[int]]:
        """The planted clusters as sorted lists of indices, in order of their first member."""
        by_label: dict[int, list[int]] = {}
        for i, label in enumerate(self.clusters):
            by_label.setdefault(label, []).append(i)
        return sorted(by_label.values())


def planted_corpus(seed: int = 0) -> PlantedCorpus:
    """About 90 passages of Pride and Prejudice with planted near-duplicate clusters.

    - 40 unrelated passages of 60-120 words;
    - 8 clusters of an original and 1-3 copies, each with one word changed or the last 3 words dropped
      (Jaccard about 0.9 to the original);
    - an exact copy;
    - a chain A ~ B ~ C: B is A shifted by 9 words, C is B shifted by 9 more (Jaccard(A, B) ≈ Jaccard(B, C)
      ≈ 0.83 but Jaccard(A, C) ≈ 0.68, below 0.7: one cluster only through B);
    - 6 "related" pairs shifted by 20 words (Jaccard ≈ 0.65): similar, below the threshold, not duplicates.

    The order is shuffled (seeded), except that the chain's middle document comes last, so that a union-find
    that links non-roots splits the chain.
    """
    words = corpus_words()
    rng = np.random.default_rng(seed)
    docs: list[tuple[str, int, str]] = []
    position = 5000
    label = 0

    def passage(n: int, shift: int = 0) -> list[str]:
        return words[position + shift: position + shift + n]

    for _ in range(40):
        n = int(rng.integers(60, 121))
        docs.append((" ".join(passage(n)), label, "unrelated"))
        position += n + 50
        label += 1
    for _ in range(8):
        n = int(rng.integers(80, 121))
        original = passage(n)
        docs.append((" ".join(original), label, "original"))
        for _ in range(int(rng.integers(1, 4))):
            copy = list(original)
            if rng.random() < 0.5:
                copy[int(rng.integers(10, n - 10))] = "indeed"
                kind = "one word changed"
            else:
                copy = copy[:-3]
                kind = "last 3 words dropped"
            docs.append((" ".join(copy), label, kind))
        position += n + 50
        label += 1
    docs.append((docs[3][0], 3, "exact copy"))
    for _ in range(6):
        n = 100
        docs.append((" ".join(passage(n)), label, "related, shifted by 20 words"))
        docs.append((" ".join(passage(n, 20)), label + 1, "related, shifted by 20 words"))
        position += n + 70
        label += 2
    n = 100
    chain = [(" ".join(passage(n, 9 * k)), label, f"chain {'ABC'[k]}") for k in range(3)]
    middle = chain.pop(1)
    docs.extend(chain)
    order = rng.permutation(len(docs))
    shuffled = [docs[i] for i in order] + [middle]
    return PlantedCorpus([t for t, _, _ in shuffled], [c for _, c, _ in shuffled], [k for _, _, k in shuffled])


@dataclass(frozen=True)
class DedupResult:
    """What :func:`reference_near_dedup` (and the reader's ``near_dedup``) returns."""

    signatures: np.ndarray  # (N, bands * rows) uint32, datasketch's MinHash of each text's 5-word shingles
    candidates: set[tuple[int, int]]  # pairs i < j that share at least one band
    clusters: list[int]  # clusters[i]: the smallest index in i's cluster
    keep: list[int]  # the indices kept, ascending: the smallest of each cluster


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]  # path halving
            x = self.parent[x]
        return x

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)  # the smaller index is the root


def band_candidates(signatures: np.ndarray, bands: int, rows: int, overlapping: bool = False) -> set[tuple[int, int]]:
    """Pairs i < j whose signatures agree on all ``rows`` values of at least one band (band k: rows k·r..(k+1)·r)."""
    pairs: set[tuple[int, int]] = set()
    for k in range(bands):
        start = k if overlapping else k * rows
        buckets: dict[bytes, list[int]] = {}
        for i, sig in enumerate(signatures):
            buckets.setdefault(sig[start:start + rows].tobytes(), []).append(i)
        for members in buckets.values():
            pairs.update((members[x], members[y]) for x in range(len(members)) for y in range(x + 1, len(members)))
    return pairs


def datasketch_candidates(texts: list[str], bands: int, rows: int, seed: int = 1) -> set[tuple[int, int]]:
    """The candidate pairs of datasketch's ``MinHashLSH`` with ``params=(bands, rows)``: every i < j it returns."""
    from datasketch import MinHash, MinHashLSH

    num_perm = bands * rows
    lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
    hashes = []
    for i, text in enumerate(texts):
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch([s.encode("utf-8") for s in sorted(word_shingles(text))])
        lsh.insert(i, m)
        hashes.append(m)
    return {(min(i, j), max(i, j)) for i, m in enumerate(hashes) for j in lsh.query(m) if j != i}


def reference_near_dedup(texts: list[str], bands: int, rows: int, threshold: float, seed: int = 1,
                         mistake: str | None = None) -> DedupResult:
    """Near-deduplication as Exercise 2.4 asks, with one typical mistake switchable by name (hints and tests)."""
    num_perm = bands * rows
    shingles = [word_shingles(t) for t in texts]
    signatures = np.stack([reference_signature(s, num_perm, seed) for s in shingles])
    candidates = band_candidates(signatures, bands, rows)
    verified = sorted(p for p in candidates if mistake == "no_verify"
                      or jaccard(shingles[p[0]], shingles[p[1]]) >= threshold)
    uf = _UnionFind(len(texts))
    if mistake == "link_non_roots":
        for i, j in verified:
            uf.parent[j] = i
    else:
        for i, j in verified:
            uf.union(i, j)
    clusters = [uf.find(i) for i in range(len(texts))]
    if mistake == "link_non_roots":  # canonical labels: the smallest member of each (split) group
        smallest: dict[int, int] = {}
        for i, root in enumerate(clusters):
            smallest.setdefault(root, i)
        clusters = [smallest[root] for root in clusters]
    if mistake == "keep_last":
        largest = {c: i for i, c in enumerate(clusters)}
        keep = sorted(largest.values())
    elif mistake == "drop_all":
        sizes: dict[int, int] = {}
        for c in clusters:
            sizes[c] = sizes.get(c, 0) + 1
        keep = [i for i, c in enumerate(clusters) if sizes[c] == 1]
    else:
        keep = [i for i, c in enumerate(clusters) if c == i]
    return DedupResult(signatures, candidates, clusters, keep)


def _groups(clusters: list[int]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for i, c in enumerate(clusters):
        out.setdefault(c, set()).add(i)
    return out


def _as_result(result, n: int, num_perm: int, what: str) -> DedupResult:
    if result is None:
        raise AssertionError(f"{what} returned None; return (signatures, candidates, clusters, keep)")
    if isinstance(result, DedupResult):
        return result
    if not isinstance(result, (tuple, list)) or len(result) != 4:
        raise AssertionError(f"{what} should return four things, (signatures, candidates, clusters, keep), got "
                             f"{type(result).__name__}")
    signatures, candidates, clusters, keep = result
    signatures = np.asarray(signatures)
    if signatures.shape != (n, num_perm):
        raise AssertionError(f"{what}: signatures have shape {signatures.shape}, expected ({n}, {num_perm}): one "
                             "row of bands · rows values per text")
    try:
        candidates = {(int(i), int(j)) for i, j in candidates}
    except (TypeError, ValueError):
        raise AssertionError(f"{what}: candidates should be a set of pairs (i, j) of indices") from None
    clusters = [int(c) for c in clusters]
    if len(clusters) != n:
        raise AssertionError(f"{what}: {len(clusters)} cluster ids for {n} texts: one per text")
    return DedupResult(signatures.astype(np.uint64), candidates, clusters, [int(i) for i in keep])


@exercise("2.4", solution="near_dedup")
def check_near_dedup(near_dedup):
    corpus = planted_corpus()
    texts, n = corpus.texts, len(corpus.texts)
    for bands, rows, threshold in ((16, 8, 0.7), (32, 4, 0.7)):
        num_perm = bands * rows
        what = f"near_dedup(planted corpus of {n} texts, bands={bands}, rows={rows}, threshold={threshold})"
        got = _as_result(near_dedup(list(texts), bands=bands, rows=rows, threshold=threshold, seed=1), n,
                         num_perm, what)
        want = reference_near_dedup(texts, bands, rows, threshold)
        _check_signatures(got.signatures, want.signatures, texts, num_perm, what)
        _check_candidates(got.candidates, want.candidates, texts, bands, rows, threshold, what)
        _check_clusters(got, want, corpus, what)
        if got.keep != want.keep:
            if sorted(set(got.keep)) == want.keep:
                raise AssertionError(f"{what}: keep lists the right documents, but not once each in ascending order")
            raise AssertionError(f"{what}: keep = {got.keep}, expected {want.keep} (the smallest index of each "
                                 "cluster)")
    what = "near_dedup(['a text', 'a text'], bands=0, rows=8, threshold=0.7)"
    try:
        near_dedup(["one two three four five", "one two three four five"], bands=0, rows=8, threshold=0.7)
    except ValueError:
        pass
    else:
        raise AssertionError(f"{what} ran: raise a ValueError that says bands and rows must be at least 1")


def _check_signatures(got: np.ndarray, want: np.ndarray, texts: list[str], num_perm: int, what: str) -> None:
    if np.array_equal(got, want.astype(np.uint64)):
        return
    seen: dict[str, int] = {}
    for i, text in enumerate(texts):
        j = seen.setdefault(text, i)
        if j != i and not np.array_equal(got[i], got[j]):
            raise AssertionError(f"{what}: texts {j} and {i} are identical but their signatures differ: hash every "
                                 "document with the same permutations (one seed, drawn once, outside the loop), "
                                 "or signatures of different documents cannot be compared")
    first = next(i for i in range(len(texts)) if not np.array_equal(got[i], want[i]))
    a, b = permutations(num_perm, 1)
    shingles = word_shingles(texts[first])
    hint = next((f"; {h}" for m, h in SIGNATURE_MISTAKES.items()
                 if np.array_equal(got[first], _signature_variant(shingles, a, b, m))), "")
    if not hint and np.array_equal(got[first], reference_signature(shingles, num_perm, 0).astype(np.uint64)):
        hint = "; that is seed 0: use the seed argument (datasketch's default is 1)"
    raise AssertionError(f"{what}: text {first}'s signature differs from datasketch's MinHash (the permutations "
                         f"of ch02.permutations({num_perm}, seed)) in {int((got[first] != want[first]).sum())} "
                         f"of {num_perm} values{hint}")


def _check_candidates(got: set, want: set, texts: list[str], bands: int, rows: int, threshold: float,
                      what: str) -> None:
    if got == want:
        return
    if any(i == j for i, j in got):
        raise AssertionError(f"{what}: candidates contain pairs (i, i): a document is not its own near duplicate")
    if any(i > j for i, j in got):
        raise AssertionError(f"{what}: candidates contain pairs with i > j: list each pair once, as (min, max)")
    missing, extra = want - got, got - want
    hint = ""
    sigs = np.stack([reference_signature(word_shingles(t), bands * rows, 1) for t in texts])
    if got == band_candidates(sigs, bands, rows, overlapping=True):
        hint = (f"; your bands overlap: band k is rows k·r .. k·r + r - 1 = sig[k * {rows}:(k + 1) * {rows}], "
                f"not sig[k:k + {rows}]")
    elif got == {(i, j) for i, j in want if jaccard(word_shingles(texts[i]), word_shingles(texts[j])) >= threshold}:
        hint = ("; these are the verified pairs: return LSH's candidates as they come out of the bands, before "
                "the Jaccard check (the check compares them with MinHashLSH's)")
    elif got <= want and len(got) < len(want) / 2:
        hint = ("; most candidates are missing: is each band's key all r of its values (sig[k*r:(k+1)*r], as a "
                "tuple or bytes), and are all documents' signatures made with the same permutations?")
    raise AssertionError(f"{what}: {len(missing)} of datasketch's MinHashLSH candidate pairs are missing (e.g. "
                         f"{sorted(missing)[:3]}) and {len(extra)} are extra (e.g. {sorted(extra)[:3]}){hint}")


def _check_clusters(got: DedupResult, want: DedupResult, corpus: PlantedCorpus, what: str) -> None:
    if got.clusters != want.clusters:
        _diagnose_clusters(got, want, corpus, what)
    kept = set(got.keep)
    for group in corpus.groups():
        mine = [i for i in group if i in kept]
        if not mine and len(group) > 1:
            raise AssertionError(f"{what}: the planted cluster {group} kept no document: keep one of each cluster "
                                 "(its smallest index), drop only the others")
        if not mine:
            raise AssertionError(f"{what}: document {group[0]} has no near duplicate and was dropped")
        if mine[0] != group[0]:
            raise AssertionError(f"{what}: in the cluster {group} you kept {mine}: keep the *first* document "
                                 f"(the smallest index, {group[0]}) and drop the later copies")


def _diagnose_clusters(got: DedupResult, want: DedupResult, corpus: PlantedCorpus, what: str) -> None:
    got_groups, want_groups = _groups(got.clusters), _groups(want.clusters)
    if any(min(members) != c for c, members in got_groups.items()):
        raise AssertionError(f"{what}: clusters[i] should be the smallest index in i's cluster (a document alone "
                             "has clusters[i] == i)")
    got_sets = {frozenset(g) for g in got_groups.values()}
    want_sets = {frozenset(g) for g in want_groups.values()}
    merged = sorted(sorted(g) for g in got_sets if g not in want_sets and any(w < g for w in want_sets))
    if merged:
        texts, group = corpus.texts, merged[0]
        low = [(i, j) for x, i in enumerate(group) for j in group[x + 1:]
               if (i, j) in got.candidates and jaccard(word_shingles(texts[i]), word_shingles(texts[j])) < 0.7]
        hint = ""
        if low:
            i, j = low[0]
            hint = (f"; documents {i} and {j} are candidates but their Jaccard is "
                    f"{jaccard(word_shingles(texts[i]), word_shingles(texts[j])):.2f}: verify every candidate pair "
                    "with the exact Jaccard of its shingles and union only those at or above the threshold "
                    "(LSH's candidates include false positives)")
        raise AssertionError(f"{what}: your cluster {group} joins documents that are not near duplicates{hint}")
    split = sorted(sorted(w) for w in want_sets if w not in got_sets and any(g < w for g in got_sets))
    if split:
        raise AssertionError(f"{what}: the cluster {split[0]} is split in your clusters: a union-find must link "
                             "the roots, parent[find(i)] = find(j), not parent[j] = i (which cuts j from its old "
                             "cluster); a chain A ~ B ~ C is one cluster even when A and C are not similar")
    raise AssertionError(f"{what}: your clusters differ from the reference's")


# ---------------------------------------------------------------------------
# 2.5 PII masking
# ---------------------------------------------------------------------------

PII_CASES = [  # (text, masked): e-mails -> <EMAIL>, public IPv4 -> <IP>
    ("Write to jane.doe+news@mail.example.co.uk today.", "Write to <EMAIL> today."),
    ("Mail bob@example.org.", "Mail <EMAIL>."),
    ("<alice_b@uni-bonn.de>, carol@ex.com", "<<EMAIL>>, <EMAIL>"),
    ("The server 8.8.8.8 answered.", "The server <IP> answered."),
    ("Connect to 93.184.216.34:8080 now", "Connect to <IP>:8080 now"),
    ("Private 192.168.0.1 and loopback 127.0.0.1 stay", "Private 192.168.0.1 and loopback 127.0.0.1 stay"),
    ("Not an address: 999.12.1.1 or 10.0.0.256", "Not an address: 999.12.1.1 or 10.0.0.256"),
    ("Version 1.2.3.4.5 of the tool", "Version 1.2.3.4.5 of the tool"),
    ("Mr. Darcy @ Pemberton, 5 p.m.", "Mr. Darcy @ Pemberton, 5 p.m."),
    ("twitter @handle and user@localhost", "twitter @handle and user@localhost"),
    ("Both: x@y.io from 1.1.1.1", "Both: <EMAIL> from <IP>"),
]


def datatrove_pii(text: str) -> str:
    """datatrove's ``PIIFormatter`` with the placeholders of Exercise 2.5 (it masks public IPs only, too)."""
    from datatrove.pipeline.formatters import PIIFormatter

    return PIIFormatter(email_replacement="<EMAIL>", ip_replacement="<IP>").format(text)


def _is_public_ipv4(s: str) -> bool:
    try:
        return ipaddress.ip_address(s).is_global
    except ValueError:
        return False


_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d]|\.\d)")


@exercise("2.5", solution="mask_pii")
def check_mask_pii(mask_pii):
    for text, want in PII_CASES:
        got = mask_pii(text)
        if not isinstance(got, str):
            raise AssertionError(f"mask_pii returned {type(got).__name__}, not the masked text (a str); did you "
                                 "forget `return`?")
        if got == want:
            continue
        hint = ""
        if "<IP>" in got and "<IP>" not in want and any(_is_public_ipv4(m) is False for m in _IPV4.findall(text)):
            hint = "; mask only public addresses (ipaddress.ip_address(s).is_global), as datatrove does"
        elif "<IP>" in got and "<IP>" not in want:
            hint = "; an address is four numbers 0-255, not part of a longer dotted number (look around the match)"
        elif got.rstrip(".") + "." == want and got.endswith(">") is False:
            hint = "; a sentence's final '.' is not part of the address"
        elif "<EMAIL>" in got and "<EMAIL>" not in want:
            hint = "; an e-mail address needs a local part, '@' and a domain with a dot"
        raise AssertionError(f"mask_pii({text!r}) = {got!r}, expected {want!r}{hint}")


__all__ = ["PII_CASES", "DedupResult", "PlantedCorpus", "check_bands_rows", "check_gopher_rule", "check_mask_pii",
           "check_minhash", "check_near_dedup", "corpus_words", "datasketch_candidates", "datatrove_pii", "fmix32",
           "gopher_cases", "gopher_words", "jaccard_pairs", "permutations", "planted_corpus", "punctuation_set",
           "reference_choose", "reference_gopher", "reference_near_dedup", "reference_s_curve",
           "reference_signature", "weighted_error"]
