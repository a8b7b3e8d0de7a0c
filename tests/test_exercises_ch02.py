"""Chapter 2's exercise checks: each passes the solution, reports the starter as not attempted, names typical mistakes.

The solutions below are those of solutions/02_data_pipeline.md, written out
again with one typical mistake switched on by name; the check must name each.
They are written independently of the checks' references (``datatrove``,
``datasketch`` and ``ch02.reference_near_dedup``), so a test is never a check
compared with itself. A corpus of 82 short passages: seconds.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections import defaultdict

import numpy as np
import pytest
from exercise_helpers import fresh_starter as _fresh_starter
from exercise_helpers import one_line_error as _one_line_error
from exercise_helpers import starter as _starter
from scipy.integrate import quad

from llmbook.exercises import ch02
from llmbook.pipeline.text import jaccard, word_shingles

# ---------------------------------------------------------------------------------------------- 2.1

PUNCT = ch02.punctuation_set()


def _gopher(text, words, mistake=None):
    """The solution's gopher_rule, with one typical mistake switched on by name."""
    non_symbol = [w for w in words if any(c not in PUNCT for c in w)]
    counted = words if mistake == "count_all" else non_symbol
    if len(counted) < 50:
        return "gopher_short_doc"
    if len(counted) > 100_000:
        return "gopher_long_doc"
    averaged = words if mistake == "mean_all" else non_symbol
    mean = sum(len(w) for w in averaged) / len(averaged)
    if mean < 3 or (mistake == "inclusive" and mean == 3):
        return "gopher_below_avg_threshold"
    if mean > 10:
        return "gopher_above_avg_threshold"
    denominator = len(non_symbol) if mistake == "ratio_non_symbol" else len(words)
    if text.count("#") / denominator > 0.1:
        return "gopher_too_many_hashes"
    ellipses = text.count("...") + (0 if mistake == "ascii_ellipsis" else text.count("…"))
    if ellipses / denominator > 0.1:
        return "gopher_too_many_ellipsis"
    lines = text.splitlines()
    starts = [(line if mistake == "no_strip" else line.lstrip()).startswith(("•", "-")) for line in lines]
    if sum(starts) / len(lines) > 0.9 or (mistake == "inclusive" and sum(starts) / len(lines) == 0.9):
        return "gopher_too_many_bullets"
    ends = ("...",) if mistake == "ascii_ellipsis" else ("...", "…")
    if sum((line if mistake == "no_strip" else line.rstrip()).endswith(ends) for line in lines) / len(lines) > 0.3:
        return "gopher_too_many_end_ellipsis"
    return None


def test_gopher_solution_passes_and_starter_is_not_attempted(capsys):
    ch02.check_gopher_rule(_gopher)
    ch02.check_gopher_rule(_starter)
    out = capsys.readouterr().out
    assert "Exercise 2.1: all checks passed" in out and "Exercise 2.1: not attempted yet" in out
    with pytest.raises(NotImplementedError):
        ch02.check_gopher_rule.strict(_starter)


def test_gopher_cases_cover_every_reason_and_keep():
    """The crafted texts reach every rule of the check, and datatrove keeps some of them."""
    verdicts = {ch02.reference_gopher(text) for _, text in ch02.gopher_cases()}
    assert verdicts | {"gopher_long_doc"} == {None, *ch02.GOPHER_REASONS}  # the check gives 100,001 words itself


@pytest.mark.parametrize(("mistake", "hint"), [
    ("count_all", "counts only words with at least one character that is not punctuation"),
    ("mean_all", "includes the punctuation 'words'"),
    ("ratio_non_symbol", "datatrove divides the count of '#'"),
    ("ascii_ellipsis", "'…' (U+2026) is an ellipsis too"),
    ("no_strip", "test s.lstrip() and s.rstrip()"),
    ("inclusive", "the thresholds are strict"),
])
def test_gopher_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch02.check_gopher_rule, functools.partial(_gopher, mistake=mistake))
    assert hint in message, message


def test_gopher_without_the_long_rule_fails():
    def no_long_rule(text, words):
        reason = _gopher(text, words)
        return None if reason == "gopher_long_doc" else reason

    assert "expected 'gopher_long_doc'" in _one_line_error(ch02.check_gopher_rule, no_long_rule)


def test_gopher_wrong_reason_name_is_explained():
    message = _one_line_error(ch02.check_gopher_rule, lambda text, words: "too_short" if len(words) < 50 else None)
    assert "one of datatrove's reasons" in message


def test_gopher_reference_is_llmbooks_filter():
    """llmbook's GopherQuality (datatrove's words, the same two rules off) gives the check's reasons on every case."""
    gopher = pytest.importorskip("llmbook.pipeline.gopher")
    if not hasattr(gopher, "GopherThresholds"):
        pytest.skip("llmbook.pipeline.gopher is not written yet")
    f = gopher.GopherQuality(gopher.GopherThresholds(min_alpha_words_ratio=None, min_stop_words=None),
                             split=gopher.datatrove_splitter())
    for what, text in ch02.gopher_cases():
        assert f.reason(text) == ch02.reference_gopher(text), what


# ---------------------------------------------------------------------------------------------- 2.2


def _signature(shingles, a, b, mistake=None):
    """The solution's minhash_signature, with one typical mistake switched on by name."""
    if not shingles and mistake != "empty_min":
        return np.full(len(a), 0xFFFFFFFF, dtype=np.uint32)
    if mistake == "python_hash":
        h = np.array([hash(s) & 0xFFFFFFFF for s in shingles], dtype=np.uint32)
    else:
        order = "big" if mistake == "big_endian" else "little"
        h = np.array([int.from_bytes(hashlib.sha1(s.encode()).digest()[:4], order) for s in shingles],
                     dtype=np.uint32)
    if mistake != "no_fmix":
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    if mistake == "int64":
        permuted = h.astype(np.int64)[:, None] * a.astype(np.int64)[None, :] + b.astype(np.int64)[None, :]
    else:
        permuted = h[:, None] * a[None, :] + b[None, :]
    return permuted.max(axis=0) if mistake == "max" else permuted.min(axis=0)


def _estimate(sig_a, sig_b, mistake=None):
    if mistake == "value_sets":
        return jaccard(set(np.asarray(sig_a).tolist()), set(np.asarray(sig_b).tolist()))
    if len(sig_a) != len(sig_b) and mistake != "no_length_check":
        raise ValueError("signatures of different lengths")
    n = min(len(sig_a), len(sig_b))
    return float(np.mean(np.asarray(sig_a)[:n] == np.asarray(sig_b)[:n]))


def test_minhash_solution_passes_and_starter_is_not_attempted(capsys):
    ch02.check_minhash(_signature, _estimate)
    ch02.check_minhash(_starter, _starter)
    ch02.check_minhash(_signature, _starter)
    out = capsys.readouterr().out
    assert "Exercise 2.2: all checks passed" in out and out.count("Exercise 2.2: not attempted yet") == 2


def test_permutations_and_fmix_are_datasketchs():
    from datasketch import MinHash
    from datasketch.minhash import _fmix

    a, b = ch02.permutations(64, 3)
    assert np.array_equal(np.stack([a, b]), MinHash(num_perm=64, seed=3).permutations)
    h = np.arange(0, 2**32, 2**20 + 7, dtype=np.uint32)
    assert np.array_equal(ch02.fmix32(h), _fmix(h.copy(), 32))


@pytest.mark.parametrize(("mistake", "hint"), [
    ("python_hash", "Python's hash(): it is salted per process"),
    ("no_fmix", "pre-mix (fmix32) is missing"),
    ("big_endian", "read big-endian"),
    ("int64", "not reduced mod 2**32"),
    ("max", "minimum of each permutation's values, not the maximum"),
    ("empty_min", "2**32 - 1 in every position"),
])
def test_signature_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch02.check_minhash, functools.partial(_signature, mistake=mistake), _estimate)
    assert hint in message, message


@pytest.mark.parametrize(("mistake", "hint"), [
    ("value_sets", "the Jaccard of the signatures' *sets of values*"),
    ("no_length_check", "raise a ValueError"),
])
def test_estimate_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch02.check_minhash, _signature, functools.partial(_estimate, mistake=mistake))
    assert hint in message, message


def test_jaccard_pairs_span_the_range():
    trues = [t for _, _, t in ch02.jaccard_pairs()]
    assert trues[0] == 1.0 and min(trues) < 0.3 and trues == sorted(trues, reverse=True)


# ---------------------------------------------------------------------------------------------- 2.3


def _s_curve(s, bands, rows, mistake=None):
    s = np.asarray(s, dtype=np.float64)
    if mistake == "swapped":
        bands, rows = rows, bands
    if mistake == "no_band_matches":
        return (1 - s**rows) ** bands
    if mistake == "one_band":
        return s ** (bands * rows)
    return 1 - (1 - s**rows) ** bands


def _choose(threshold, num_perm, fp_weight=0.5, fn_weight=0.5, mistake=None):
    """The solution's choose_bands_rows, integrating on a grid (not datasketch's quad): must still agree."""
    if mistake == "swapped_weights":
        fp_weight, fn_weight = fn_weight, fp_weight
    best, choice = float("inf"), None
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            if mistake == "equal_only" and b * r != num_perm:
                continue
            fb, fr = (r, b) if mistake == "swapped_curve" else (b, r)
            fp = quad(lambda s, fb=fb, fr=fr: _s_curve(s, fb, fr), 0, threshold)[0]
            fn = quad(lambda s, fb=fb, fr=fr: 1 - _s_curve(s, fb, fr), threshold, 1)[0]
            if fp_weight * fp + fn_weight * fn < best:
                best, choice = fp_weight * fp + fn_weight * fn, (b, r)
    return choice


def test_bands_rows_solution_passes_and_starter_is_not_attempted(capsys):
    ch02.check_bands_rows(_s_curve, _choose)
    ch02.check_bands_rows(_starter, _starter)
    out = capsys.readouterr().out
    assert "Exercise 2.3: all checks passed" in out and "Exercise 2.3: not attempted yet" in out


def _llmbook_minhash(*names):
    minhash = pytest.importorskip("llmbook.pipeline.minhash")
    if not all(hasattr(minhash, name) for name in names):
        pytest.skip(f"llmbook.pipeline.minhash has no {', '.join(names)} yet")
    return minhash


def test_s_curve_and_choice_are_llmbooks():
    """The check's S-curve and choice (datasketch's) are llmbook.pipeline.minhash's on the check's cases."""
    minhash = _llmbook_minhash("s_curve", "choose_bands_rows")
    s = np.linspace(0, 1, 101)
    for bands, rows in ((20, 5), (16, 8), (1, 1)):
        assert np.allclose(minhash.s_curve(s, bands, rows), ch02.reference_s_curve(s, bands, rows))
    for threshold, num_perm, fpw, fnw in ch02.CHOOSE_CASES:
        got = minhash.choose_bands_rows(threshold, num_perm, weights=(fpw, fnw))
        assert tuple(got) == tuple(ch02.reference_choose(threshold, num_perm, fpw, fnw)), threshold


def test_band_candidates_are_llmbooks():
    """The check's banding (the bands of datasketch's MinHashLSH) gives llmbook's lsh_candidates on the corpus."""
    minhash = _llmbook_minhash("lsh_candidates")
    texts = ch02.planted_corpus().texts
    for bands, rows in ((16, 8), (32, 4)):
        sigs = np.stack([ch02.reference_signature(word_shingles(t), bands * rows, 1) for t in texts])
        want = ch02.band_candidates(sigs, bands, rows)
        assert {(int(i), int(j)) for i, j in minhash.lsh_candidates(sigs, bands, rows)} == want


@pytest.mark.parametrize(("mistake", "hint"), [
    ("swapped", "b and r are swapped"),
    ("no_band_matches", "the probability that *no* band matches"),
    ("one_band", "one band of all b·r rows"),
])
def test_s_curve_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch02.check_bands_rows, functools.partial(_s_curve, mistake=mistake), _choose)
    assert hint in message, message


@pytest.mark.parametrize(("mistake", "hint"), [
    ("equal_only", "you searched only b·r = num_perm"),
    ("swapped_weights", "the weights are swapped"),
    ("swapped_curve", "b and r are swapped in the S-curve"),
])
def test_choose_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch02.check_bands_rows, _s_curve, functools.partial(_choose, mistake=mistake))
    assert hint in message, message


# ---------------------------------------------------------------------------------------------- 2.4


def _near_dedup(texts, bands, rows, threshold, seed=1, mistake=None):
    """The solution's near_dedup, with one typical mistake switched on by name."""
    if bands < 1 or rows < 1:
        if mistake == "no_value_error":
            return np.zeros((len(texts), 0), dtype=np.uint32), set(), list(range(len(texts))), list(range(len(texts)))
        raise ValueError("bands and rows must be at least 1")
    num_perm = bands * rows
    shingles = [word_shingles(t) for t in texts]
    signatures = np.zeros((len(texts), num_perm), dtype=np.uint32)
    a, b = ch02.permutations(num_perm, seed)
    for i, s in enumerate(shingles):
        if mistake == "seed_per_document":
            a, b = ch02.permutations(num_perm, seed + i)
        signatures[i] = _signature(s, a, b, mistake="python_hash" if mistake == "python_hash" else None)
    candidates = set()
    for k in range(bands):
        start = k if mistake == "overlapping_bands" else k * rows
        buckets = defaultdict(list)
        for i in range(len(texts)):
            buckets[signatures[i, start:start + rows].tobytes()].append(i)
        for members in buckets.values():
            for x, i in enumerate(members):
                for j in members[x + 1:]:
                    candidates.add((j, i) if mistake == "unordered_pairs" else (i, j))
    parent = list(range(len(texts)))

    def find(x):
        while parent[x] != x:
            x = parent[x]  # no path compression: still correct
        return x

    verified = [(i, j) for i, j in sorted(candidates)
                if mistake == "no_verify" or jaccard(shingles[i], shingles[j]) >= threshold]
    if mistake == "verified_candidates":
        candidates = set(verified)
    for i, j in verified:
        if mistake == "link_non_roots":
            parent[j] = i
            continue
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = [find(i) for i in range(len(texts))]
    smallest = {}
    for i, r in enumerate(roots):
        smallest.setdefault(r, i)
    clusters = [smallest[r] for r in roots]
    if mistake == "keep_last":
        keep = sorted({c: i for i, c in enumerate(clusters)}.values())
    elif mistake == "drop_all":
        sizes = defaultdict(int)
        for c in clusters:
            sizes[c] += 1
        keep = [i for i, c in enumerate(clusters) if sizes[c] == 1]
    else:
        keep = [i for i in range(len(texts)) if clusters[i] == i]
    return signatures, candidates, clusters, keep


def test_near_dedup_solution_passes_and_starter_is_not_attempted(capsys):
    ch02.check_near_dedup(_near_dedup)
    ch02.check_near_dedup(_starter)
    out = capsys.readouterr().out
    assert "Exercise 2.4: all checks passed" in out and "Exercise 2.4: not attempted yet" in out
    with pytest.raises(NotImplementedError):
        ch02.check_near_dedup.strict(_starter)


def test_planted_corpus_is_the_truth():
    """The planted clusters are exactly the components of the true Jaccard >= 0.7 graph; the reference finds them."""
    corpus = ch02.planted_corpus()
    again = ch02.planted_corpus()
    assert corpus.texts == again.texts and corpus.clusters == again.clusters
    n = len(corpus.texts)
    shingles = [word_shingles(t) for t in corpus.texts]
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for i in range(n):
        for j in range(i + 1, n):
            if jaccard(shingles[i], shingles[j]) >= 0.7:
                parent[find(j)] = find(i)
    components = {}
    for i in range(n):
        components.setdefault(find(i), []).append(i)
    assert sorted(components.values()) == corpus.groups()
    related = [i for i, kind in enumerate(corpus.kinds) if kind.startswith("related")]
    similar = [jaccard(shingles[i], shingles[j]) for i in related for j in related if i < j]
    assert max(similar) < 0.7 and sum(s > 0.6 for s in similar) == len(related) // 2  # similar, not duplicates
    for bands, rows in ((16, 8), (32, 4)):
        result = ch02.reference_near_dedup(corpus.texts, bands, rows, 0.7)
        assert result.candidates == ch02.datasketch_candidates(corpus.texts, bands, rows)
        for group in corpus.groups():
            assert [i for i in group if i in set(result.keep)] == [group[0]]  # exactly one kept: the first
        assert any(corpus.clusters[i] != corpus.clusters[j] for i, j in result.candidates)  # false positives
        chain = [i for i, k in enumerate(corpus.kinds) if k.startswith("chain")]
        a, c = chain[0], chain[1]  # the ends: chain A and chain C, before the middle (the last document)
        assert chain[2] == n - 1 and jaccard(shingles[a], shingles[c]) < 0.7
        assert result.clusters[a] == result.clusters[c]


@pytest.mark.parametrize(("mistake", "hint"), [
    ("python_hash", "Python's hash(): it is salted per process"),
    ("seed_per_document", "are identical but their signatures differ"),
    ("overlapping_bands", "your bands overlap"),
    ("unordered_pairs", "list each pair once, as (min, max)"),
    ("no_verify", "verify every candidate pair with the exact Jaccard"),
    ("verified_candidates", "these are the verified pairs"),
    ("link_non_roots", "a union-find must link the roots"),
    ("drop_all", "kept no document"),
    ("keep_last", "keep the *first* document"),
    ("no_value_error", "raise a ValueError"),
])
def test_near_dedup_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch02.check_near_dedup, functools.partial(_near_dedup, mistake=mistake))
    assert hint in message, message


# ---------------------------------------------------------------------------------------------- 2.5


def _mask_pii(text, mistake=None):
    email = (r"\S+@\S+" if mistake == "greedy_email" else
             r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
             r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b")
    ipv4 = (r"(?:\d{1,3}\.){3}\d{1,3}" if mistake == "no_boundaries"
            else r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")

    def public(match):
        try:
            address = ipaddress.ip_address(match.group(0))
        except ValueError:
            return match.group(0)
        return "<IP>" if mistake == "private_too" or address.is_global else match.group(0)

    return re.sub(ipv4, public, re.sub(email, "<EMAIL>", text))


def test_pii_solution_passes_and_starter_is_not_attempted(capsys):
    ch02.check_mask_pii(_mask_pii)
    ch02.check_mask_pii(_starter)
    out = capsys.readouterr().out
    assert "Exercise 2.5: all checks passed" in out and "Exercise 2.5: not attempted yet" in out


@pytest.mark.parametrize(("mistake", "hint"), [
    ("greedy_email", "expected"),
    ("private_too", "mask only public addresses"),
    ("no_boundaries", "not part of a longer dotted number"),
])
def test_pii_mistakes_fail(mistake, hint):
    message = _one_line_error(ch02.check_mask_pii, functools.partial(_mask_pii, mistake=mistake))
    assert hint in message, message


def test_datatrove_agrees_with_the_pii_cases_but_two():
    """datatrove's PIIFormatter agrees with the expected outputs except inside longer dotted numbers."""
    differ = [text for text, want in ch02.PII_CASES if ch02.datatrove_pii(text) != want]
    assert len(differ) == 2 and all("1.1" in t or "1.2.3.4.5" in t for t in differ)


# ---------------------------------------------------------------------------------------------- all


@pytest.mark.parametrize("check", [ch02.check_gopher_rule, ch02.check_near_dedup, ch02.check_mask_pii])
def test_a_constant_answer_fails_in_one_line(check):
    _one_line_error(check, lambda *args, **kwargs: 0)


def test_constant_pairs_of_answers_fail_in_one_line():
    _one_line_error(ch02.check_minhash, lambda *args: 0, _estimate)
    _one_line_error(ch02.check_minhash, _signature, lambda *args: 0.5)
    _one_line_error(ch02.check_bands_rows, lambda *args: 0, _choose)
    _one_line_error(ch02.check_bands_rows, _s_curve, lambda *args, **kwargs: (1, 1))


def test_the_starter_is_generated_from_the_solutions():
    """exercises/02 is build_pdf's starter of solutions/02."""
    starter = _fresh_starter("02_data_pipeline")
    assert starter.count('raise NotImplementedError("your solution') == 7
