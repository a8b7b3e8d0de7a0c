"""MinHash signatures from scratch (Broder 1997), vectorized with numpy, bit for bit equal to datasketch's.

Two documents are near-duplicates when their sets of word 5-grams
("shingles") overlap: Jaccard similarity J = |A ∩ B| / |A ∪ B|. Comparing
every pair of a web crawl is impossible, so each set is summarised by a
*signature*: apply P random permutations to the shingles' hashes and keep
the smallest value under each. For one random permutation,
P(min(A) == min(B)) = J exactly (the smallest element of A ∪ B is equally
likely to be any of its members, and the minima agree iff it lies in
A ∩ B), so the fraction of the P positions where two signatures agree
estimates J with standard error sqrt(J(1 - J) / P).

The permutations are datasketch's, so a signature here equals
``datasketch.MinHash``'s for the same shingles and seed:

- ``scheme="affine32"`` (datasketch >= 2.0's default): the 32-bit shingle
  hash is pre-mixed with MurmurHash3's finalizer, then ``a*h + b mod 2^32``
  with ``a`` odd, a bijection, so the permutation adds no collisions.
- ``scheme="legacy"`` (datasketch < 2.0, and datatrove): the textbook
  universal hash ``(a*h + b) mod (2^61 - 1)`` truncated to 32 bits, computed
  in wrapping uint64 exactly as those libraries do. datasketch 2.0 moved away
  from it because the truncation behaves like a random function and inflates
  estimates on large sets (datasketch issue #212).

What differs is only speed. datasketch hashes each shingle with SHA-1 in a
Python loop and permutes one document at a time; here ``hash="fast"`` hashes
each distinct *word* once (blake2b, cached), combines n consecutive word
hashes into a shingle hash with a few numpy array operations over a whole
batch of documents, and permutes the batch as one ``(P, shingles)`` array
reduced per document with ``np.minimum.reduceat``. ``hash="sha1"`` hashes the
shingle strings as datasketch does, which is how the tests prove the
signatures identical; the fast hash changes which random permutation is
drawn, not the estimator.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from llmbook.pipeline.exact_dedup import word_bytes

Scheme = Literal["affine32", "legacy"]
HashName = Literal["fast", "sha1"]

MERSENNE_61 = np.uint64((1 << 61) - 1)  # the prime of the textbook universal hash (datasketch "legacy", datatrove)
MAX32 = np.uint32(0xFFFFFFFF)  # a signature position of an empty document (datasketch's initial value)

# Odd 64-bit multipliers that make a shingle's hash depend on word order: h = sum_k word_hash[i+k] * C[k].
_POSITION = np.random.RandomState(20260).randint(0, 1 << 62, 16, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_word_hash_cache: dict[bytes, int] = {}


# ---------------------------------------------------------------------------------------------- hashing


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer: a bijection spreading every input bit over the output (datasketch's pre-mix)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (wrapping uint64 arithmetic)."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _word_hash(word: bytes) -> int:
    # blake2b: deterministic across processes and Python versions (Python's hash() is salted per process);
    # | 1 keeps 0 free for the padding between texts.
    return int.from_bytes(hashlib.blake2b(word, digest_size=8).digest(), "little") | 1


def _word_hashes(words: list[bytes]) -> list[int]:
    try:
        return list(map(_word_hash_cache.__getitem__, words))  # a dict lookup per word once the vocabulary is known
    except KeyError:
        for w in set(words).difference(_word_hash_cache):  # each distinct word is hashed once per process
            _word_hash_cache[w] = _word_hash(w)
        return list(map(_word_hash_cache.__getitem__, words))


def shingle_hashes_batch(texts: Sequence[str], n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every word n-gram of every text, and each text's share: ``(hashes, counts)``.

    The shingles are those of ``text.word_shingles(t, n)`` (a text with fewer
    than n words is one shingle; an empty text has none), hashed without
    building their strings. Each text's word hashes are followed by n-1 zeros,
    so one pass of n shifted multiply-adds over the batch hashes every
    shingle, and a shorter text's one shingle is the sum of its words.
    Repeated shingles are kept: the minimum of a multiset is that of its set.
    """
    if n < 1 or n > len(_POSITION):
        raise ValueError(f"shingle size n must be between 1 and {len(_POSITION)}, got n={n}")
    flat: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    pad = [0] * (n - 1)
    for i, t in enumerate(texts):
        hs = _word_hashes(word_bytes(t))
        lengths[i] = len(hs)
        flat.extend(hs)
        flat.extend(pad)
    w = np.array(flat, dtype=np.uint64)
    m = len(w) - (n - 1)
    acc = np.zeros(max(m, 0), dtype=np.uint64)
    for k in range(n):
        acc += w[k : k + m] * _POSITION[k]
    # shingle starts: 0..L-n for a text of L >= n words, only 0 for 0 < L < n, none for an empty text
    counts = np.where(lengths >= n, lengths - n + 1, (lengths > 0).astype(np.int64))
    text_start = np.concatenate(([0], np.cumsum(lengths + n - 1)[:-1])) if len(texts) else lengths
    first = np.repeat(text_start - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    positions = first + np.arange(int(counts.sum()), dtype=np.int64)
    return fmix64(acc[positions]), counts


def sha1_hash32(data: bytes) -> int:
    """datasketch's default hash: the first 4 bytes of SHA-1, little-endian."""
    return struct.unpack("<I", hashlib.sha1(data).digest()[:4])[0]


def _sha1_shingle_hashes(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    from llmbook.pipeline.text import word_shingles

    hashes: list[int] = []
    counts = np.empty(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        # sorted: the set's order must not decide anything (the minimum does not care, but keep runs reproducible)
        shingles = sorted(word_shingles(t, n))
        counts[i] = len(shingles)
        hashes.extend(sha1_hash32(s.encode("utf-8")) for s in shingles)
    return np.array(hashes, dtype=np.uint64), counts


# ---------------------------------------------------------------------------------------------- signatures


@dataclass
class MinHasher:
    """``num_perm`` random permutations (datasketch's for the same ``seed``) and the shingling that feeds them.

    >>> mh = MinHasher(num_perm=128, seed=1)
    >>> sigs = mh.signatures(["the cat sat on the mat today", "the cat sat on the mat yesterday"])
    >>> sigs.shape, sigs.dtype
    ((2, 128), dtype('uint32'))
    """

    num_perm: int = 128  # datasketch's default; FineWeb uses 112 = 14 bands x 8 rows
    seed: int = 1  # datasketch's default seed
    n: int = 5  # words per shingle, as datatrove and FineWeb
    scheme: Scheme = "affine32"
    hash: HashName = "fast"
    chunk: int = 8192  # shingles permuted at once: (num_perm, chunk) uint32 = 4 MiB at 128 permutations
    a: np.ndarray = field(init=False, repr=False)
    b: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_perm < 1:
            raise ValueError(f"num_perm must be at least 1, got {self.num_perm}")
        if self.scheme not in ("affine32", "legacy"):
            raise ValueError(f"scheme must be 'affine32' or 'legacy', got {self.scheme!r}")
        if self.hash not in ("fast", "sha1"):
            raise ValueError(f"hash must be 'fast' or 'sha1', got {self.hash!r}")
        # Draw the permutation parameters exactly as datasketch.MinHash._init_permutations does.
        gen = np.random.RandomState(self.seed)
        if self.scheme == "legacy":
            ab = [(gen.randint(1, MERSENNE_61, dtype=np.uint64), gen.randint(0, MERSENNE_61, dtype=np.uint64))
                  for _ in range(self.num_perm)]
            self.a, self.b = np.array(ab, dtype=np.uint64).T
        else:
            self.a = gen.randint(0, 1 << 31, self.num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)  # odd
            self.b = gen.randint(0, 1 << 32, self.num_perm, dtype=np.uint32)

    @property
    def dtype(self) -> type:
        return np.uint64 if self.scheme == "legacy" else np.uint32

    def shingle_hashes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The 32-bit shingle hashes the permutations see (datasketch's ``hashfunc`` output), and counts per text."""
        if self.hash == "sha1":
            return _sha1_shingle_hashes(texts, self.n)
        h64, counts = shingle_hashes_batch(texts, self.n)
        return h64 >> np.uint64(32), counts

    def permute(self, h: np.ndarray) -> np.ndarray:
        """Every permutation applied to every hash: ``(num_perm, len(h))``, datasketch's arithmetic exactly."""
        a, b = self.a[:, None], self.b[:, None]
        if self.scheme == "legacy":
            # uint64 wraps on a*h (a < 2^61, h < 2^32), as in datasketch and datatrove; then mod p, keep 32 bits
            return ((a * h.astype(np.uint64)[None, :] + b) % MERSENNE_61) & np.uint64(0xFFFFFFFF)
        phv = a * fmix32(h.astype(np.uint32))[None, :]  # wraps mod 2^32: that is the arithmetic
        phv += b
        return phv

    def signatures_from_hashes(self, hashes: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """``(len(counts), num_perm)`` signatures: the column-wise minimum of each text's permuted hashes.

        The batch's hashes are permuted ``chunk`` at a time, whatever the text
        boundaries; ``np.minimum.reduceat`` takes each text's minimum inside a
        chunk, and a text that spans chunks keeps the smaller of its pieces.
        An empty text keeps the initial value 2^32 - 1 everywhere, as in datasketch.
        """
        n_texts = len(counts)
        sigs = np.full((n_texts, self.num_perm), MAX32, dtype=self.dtype)
        nonempty = np.flatnonzero(counts > 0)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))[nonempty]  # (texts with shingles,)
        total = len(hashes)
        for lo in range(0, total, self.chunk):
            hi = min(lo + self.chunk, total)
            # the texts that own a piece of [lo, hi): the one already open at lo, then those starting inside
            first = int(np.searchsorted(starts, lo, side="right")) - 1
            last = int(np.searchsorted(starts, hi, side="left"))
            seg = np.maximum(starts[first:last], lo) - lo  # (pieces,) offsets inside the chunk
            mins = np.minimum.reduceat(self.permute(hashes[lo:hi]), seg, axis=1)  # (num_perm, pieces)
            rows = nonempty[first:last]
            sigs[rows] = np.minimum(sigs[rows], mins.T)
        return sigs

    def signatures(self, texts: Sequence[str], workers: int = 1, batch: int = 1024) -> np.ndarray:
        """``(len(texts), num_perm)`` MinHash signatures; ``workers > 1`` splits the batches over processes."""
        texts = list(texts)
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        batches = [texts[i : i + batch] for i in range(0, len(texts), batch)]
        if not batches:
            return np.zeros((0, self.num_perm), dtype=self.dtype)
        if workers == 1 or len(batches) == 1:
            parts = [self._batch(b) for b in batches]
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(min(workers, len(batches))) as pool:
                parts = pool.map(self._batch, batches, chunksize=1)
        return np.concatenate(parts)

    def _batch(self, texts: list[str]) -> np.ndarray:
        return self.signatures_from_hashes(*self.shingle_hashes(texts))

    def signature(self, text: str) -> np.ndarray:
        """One text's ``(num_perm,)`` signature."""
        return self._batch([text])[0]


def signatures(texts: Sequence[str], num_perm: int = 128, seed: int = 1, n: int = 5, workers: int = 1,
               **kwargs) -> np.ndarray:
    """``(len(texts), num_perm)`` MinHash signatures of the texts' word n-gram sets (see ``MinHasher``)."""
    return MinHasher(num_perm=num_perm, seed=seed, n=n, **kwargs).signatures(texts, workers=workers)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray | float:
    """The fraction of positions where two signatures agree: an unbiased estimate of the sets' Jaccard.

    Broadcasts: ``(P,)`` with ``(P,)`` gives a float, ``(D, P)`` with ``(P,)``
    one estimate per row. Its standard error is sqrt(J(1 - J) / P).
    """
    sig_a, sig_b = np.asarray(sig_a), np.asarray(sig_b)
    if sig_a.shape[-1] != sig_b.shape[-1]:
        raise ValueError(f"signatures of different lengths ({sig_a.shape[-1]} and {sig_b.shape[-1]} permutations)")
    est = (sig_a == sig_b).mean(axis=-1)
    return float(est) if np.ndim(est) == 0 else est


# ---------------------------------------------------------------------------------------------- the S-curve


def s_curve(s: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P(two documents of Jaccard s share at least one of ``bands`` buckets of ``rows`` rows) = 1 - (1 - s^r)^b.

    One band matches with probability s^r (all r rows agree); b independent
    bands miss together with probability (1 - s^r)^b (Leskovec, Rajaraman,
    Ullman, *Mining of Massive Datasets*, ch. 3.4). The curve is a soft step
    at about (1/b)^(1/r): 14 bands of 8 rows (FineWeb) step at 0.72.
    """
    return 1.0 - (1.0 - np.asarray(s, dtype=float) ** rows) ** bands


def choose_bands_rows(threshold: float, num_perm: int, weights: tuple[float, float] = (0.5, 0.5)) -> tuple[int, int]:
    """The (bands, rows) with b*r <= num_perm that minimise the weighted false positive and negative areas.

    False positives are the area under the S-curve left of the threshold
    (pairs below it that still become candidates), false negatives the area
    above it right of the threshold; datasketch's ``MinHashLSH`` chooses the
    same way (``_optimal_param``, with scipy's ``quad``). The integrand is a
    polynomial of degree b*r <= num_perm, so Gauss-Legendre quadrature with
    num_perm/2 + 1 nodes integrates it exactly, for all (b, r) in one array.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be strictly between 0 and 1, got {threshold}")
    if num_perm < 1:
        raise ValueError(f"num_perm must be at least 1, got {num_perm}")
    fp_weight, fn_weight = weights
    x, w = np.polynomial.legendre.leggauss(num_perm // 2 + 1)  # nodes and weights on [-1, 1]
    lo_s, lo_w = (x + 1) * threshold / 2, w * threshold / 2  # mapped to [0, threshold]
    hi_s, hi_w = threshold + (x + 1) * (1 - threshold) / 2, w * (1 - threshold) / 2  # and to [threshold, 1]
    best, best_err = (0, 0), float("inf")
    for b in range(1, num_perm + 1):  # the same order as datasketch, so ties resolve the same way
        r = np.arange(1, num_perm // b + 1)[:, None]
        fp = (s_curve(lo_s[None, :], b, r) * lo_w).sum(axis=1)
        fn = ((1.0 - s_curve(hi_s[None, :], b, r)) * hi_w).sum(axis=1)
        err = fp * fp_weight + fn * fn_weight
        i = int(np.argmin(err))
        if err[i] < best_err:
            best, best_err = (b, i + 1), float(err[i])
    return best


_IN_LSH = ("NearDedup", "UnionFind", "lsh_candidates", "lsh_edges", "recall_by_jaccard", "pair_precision")


def __getattr__(name: str):
    """``minhash.NearDedup`` and the LSH helpers live in ``lsh.py`` (they import this module); reach them here too."""
    if name in _IN_LSH:
        from llmbook.pipeline import lsh

        return getattr(lsh, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
