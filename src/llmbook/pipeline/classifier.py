"""A fastText-style text classifier from scratch, and the "quality" filter it makes.

fastText (Joulin et al. 2017, "Bag of Tricks for Efficient Text
Classification") is the classifier web-scale pipelines can afford on billions
of pages (DCLM's quality filter is one), because it is a linear model over a
bag of n-grams:

1. **Features.** A document is its words, word bigrams and (optionally) the
   character n-grams of each word (``"<the>"`` gives ``<th``, ``the``, ``he>``
   ...), which lets an unseen or misspelt word share evidence with known ones.
2. **The hashing trick.** No vocabulary is stored: each feature is hashed into
   one of ``B`` buckets, a row of an embedding table ``E`` (B x d). Collisions
   cost a little accuracy and save a dictionary of millions of n-grams.
3. **Average, then linear.** The document vector is the mean of its features'
   rows, ``h = mean_f E[f]`` (d numbers), and ``softmax(h W + b)`` gives the
   class probabilities. Training is cross-entropy with plain SGD and a
   learning rate falling linearly to zero, as fastText does.

Because everything after the lookup is linear, a trained model collapses to a
table of per-bucket class scores ``S = E W`` (B x K): a document's logits are
the mean of its features' rows of ``S`` plus ``b``. ``predict_proba`` uses that
and sums per distinct word: 100K pages of 350 words in about 20 s on one core
(measured on the book's shared two-core machine).

The hash must be stable: Python's ``hash(str)`` is salted per process, so a
model saved by one process would read different buckets in the next. Here a
polynomial hash over code points, finished by the splitmix64 mixer, runs
vectorized in numpy and gives the same buckets on every machine.

The quality classifier at the end contrasts "good" text with "bad" text, as
GPT-3 did (Brown et al. 2020, appendix A: logistic regression on hashed
token features, WebText, Wikipedia and books against raw Common Crawl) and
LLaMA (Touvron et al. 2023: a linear model, pages cited by Wikipedia against
random pages). FineWeb-Edu (Penedo et al. 2024) trains its classifier on an
LLM's annotations of educational value instead. Here the labels are the
dirty corpus's planted ground truth: clean book text against spam,
gibberish, lorem ipsum and repeated characters. Whatever the reference set
is, the classifier learns "unlike the reference" as "low quality": on the
corpus it flags every foreign-language page, which it was never shown.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import chain, pairwise
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from llmbook.pipeline.document import Document
from llmbook.pipeline.stage import Decision, Filter

_U64 = np.uint64
_PRIME = _U64(0x100000001B3)  # the FNV-64 prime: the polynomial hash's base
_SEED_WORD, _SEED_CHAR, _SEED_NGRAM = _U64(0x9E3779B97F4A7C15), _U64(0xC2B2AE3D27D4EB4F), _U64(0x165667B19E3779F9)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit flips about half the output bits, so ``% B`` spreads evenly."""
    z = z ^ (z >> _U64(30))
    z = z * _U64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> _U64(27))
    z = z * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _ragged(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices ``starts[i] .. starts[i] + lengths[i] - 1`` for every i, concatenated, without a Python loop.

    ``_ragged([10, 3], [2, 3]) -> [10, 11, 3, 4, 5]``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


@dataclass(frozen=True)
class HashedNgrams:
    """Which features a document has, and the bucket each one hashes to.

    ``"The cat"`` with ``word_ngrams=2`` and ``char_ngrams=(3, 3)`` has the
    features ``the``, ``cat``, ``the cat``, ``<th``, ``the``, ``he>``, ``<ca``,
    ``cat``, ``at>`` (9 features; a word and its 3-gram are different
    features, hashed with different seeds).
    """

    buckets: int = 2**18  # 262,144 rows; fastText's default is 2,000,000, but this corpus has ~10^5 distinct n-grams
    word_ngrams: int = 2  # unigrams and bigrams, fastText's -wordNgrams 2 (word order, cheaply)
    # character trigrams: fastText's subwords are 3..6 (-minn/-maxn); 3..5 gave the same held-out precision and
    # recall on the dirty corpus at twice the training time. None: words only
    char_ngrams: tuple[int, int] | None = (3, 3)

    def __post_init__(self):
        if self.buckets < 1 or self.word_ngrams < 1:
            raise ValueError(f"buckets and word_ngrams must be >= 1, got {self.buckets} and {self.word_ngrams}")
        if self.char_ngrams is not None:
            lo, hi = self.char_ngrams
            if not 1 <= lo <= hi:
                raise ValueError(f"char_ngrams=(min, max) with 1 <= min <= max, got {self.char_ngrams}")

    def word_features(self, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For distinct ``words``: a 64-bit hash each, and each word's own buckets (unigram, then char n-grams).

        Returns ``(hashes, flat_buckets, offsets)``: word i's buckets are
        ``flat_buckets[offsets[i]:offsets[i + 1]]``.
        """
        n = len(words)
        if n == 0:
            return np.zeros(0, _U64), np.zeros(0, np.int64), np.zeros(1, np.int64)
        # every word as "<word>" in one array of code points; the boundary marks make "<th" a prefix feature
        codes = np.frombuffer(("<" + "><".join(words) + ">").encode("utf-32-le"), dtype=np.uint32).astype(_U64)
        sizes = np.fromiter(map(len, words), dtype=np.int64, count=n) + 2
        ends = np.cumsum(sizes)
        starts = ends - sizes
        word_of = np.repeat(np.arange(n), sizes)
        # the word's hash: sum of c_i * P^(k-1-i) (mod 2^64), the polynomial over its code points
        powers = np.ones(int(sizes.max()), dtype=_U64)  # P^0, P^1, ... (wrapping mod 2^64)
        powers[1:] = np.cumprod(np.full(len(powers) - 1, _PRIME, dtype=_U64))
        exponent = np.repeat(ends - 1, sizes) - np.arange(len(codes))
        hashes = _mix(np.add.reduceat(codes * powers[exponent], starts))
        own = [(_mix(hashes ^ _SEED_WORD) % _U64(self.buckets)).astype(np.int64)]
        owner = [np.arange(n)]
        if self.char_ngrams is not None:
            lo, hi = self.char_ngrams
            room = np.repeat(ends, sizes) - np.arange(len(codes))  # characters left in the word from position i
            rolling = np.zeros(len(codes), dtype=_U64)
            for k in range(1, hi + 1):
                # rolling[i] becomes the hash of the k characters starting at i
                rolling[: len(codes) - k + 1] = rolling[: len(codes) - k + 1] * _PRIME + codes[k - 1 :]
                if k >= lo:
                    at = np.flatnonzero(room >= k)
                    own.append((_mix(rolling[at] ^ (_SEED_CHAR + _U64(k))) % _U64(self.buckets)).astype(np.int64))
                    owner.append(word_of[at])
        owner_all = np.concatenate(owner)
        order = np.argsort(owner_all, kind="stable")  # group each word's buckets together, unigram first
        counts = np.bincount(owner_all, minlength=n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return hashes, np.concatenate(own)[order], offsets

    def ngram_buckets(self, hashes: np.ndarray, ids: np.ndarray, doc_lengths: np.ndarray):
        """The word n-grams (n = 2 .. word_ngrams) of every document: ``(buckets, document index of each)``.

        ``ids`` are the tokens of all documents in a row (indices into ``hashes``);
        an n-gram never spans two documents.
        """
        doc_of = np.repeat(np.arange(len(doc_lengths)), doc_lengths)
        out, owner = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        rolling = hashes[ids]
        for n in range(2, self.word_ngrams + 1):
            if len(ids) < n:
                break
            rolling = rolling[:-1] * _PRIME + hashes[ids[n - 1 :]]
            same_doc = np.flatnonzero(doc_of[: len(ids) - n + 1] == doc_of[n - 1 :])
            out.append((_mix(rolling[same_doc] ^ (_SEED_NGRAM + _U64(n))) % _U64(self.buckets)).astype(np.int64))
            owner.append(doc_of[same_doc])
        return np.concatenate(out), np.concatenate(owner)


def tokenize(texts: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """All texts' tokens as ``(distinct words, token ids, tokens per text)``: lower-cased, split at whitespace.

    ``tokenize(["a b a", "b !"]) -> (["a", "b", "!"], [0, 1, 0, 1, 2], [3, 2])``. fastText too reads
    whitespace-separated tokens ("night." and "night" differ as words but share character n-grams);
    ``str.split`` is three times faster than a ``\\w+|[^\\w\\s]+`` regex here. Each distinct word is
    hashed once however often it occurs (Zipf: most tokens are a few hundred words).
    """
    tokens = [t.lower().split() for t in texts]
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    flat = list(chain.from_iterable(tokens))
    distinct = list(dict.fromkeys(flat))  # first-seen order: deterministic, no set iteration
    vocab = dict(zip(distinct, range(len(distinct)), strict=True))
    ids = np.fromiter(map(vocab.__getitem__, flat), dtype=np.int64, count=len(flat))
    return distinct, ids, lengths


@dataclass
class Bags:
    """Documents as bags of buckets: document i is ``buckets[k]`` with weight ``weights[k]``, k in its slice.

    The slice of document i is ``offsets[i]:offsets[i + 1]``; its buckets are
    distinct and a weight is the bucket's share of the document's features
    (repeats counted), so a document's weights sum to 1 and its mean feature
    vector is ``weights @ E[buckets]``.
    """

    buckets: np.ndarray  # (U,) int64
    weights: np.ndarray  # (U,) float32
    offsets: np.ndarray  # (N + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.buckets[lo:hi], self.weights[lo:hi]


def featurize(texts: Sequence[str], features: HashedNgrams, chunk: int = 512) -> Bags:
    """Every text as the buckets of its words, word n-grams and char n-grams (what training reads).

    ``chunk`` texts at a time, so the temporary arrays (every feature
    occurrence of the chunk) stay a few tens of MB whatever the corpus size.
    """
    texts = list(texts)
    parts = [_featurize(texts[lo : lo + chunk], features) for lo in range(0, len(texts), chunk)]
    if not parts:
        return Bags(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(1, np.int64))
    starts = np.cumsum([0] + [len(p.buckets) for p in parts[:-1]])
    offsets = np.concatenate([[0]] + [p.offsets[1:] + start for p, start in zip(parts, starts, strict=True)])
    return Bags(np.concatenate([p.buckets for p in parts]), np.concatenate([p.weights for p in parts]), offsets)


def _featurize(texts: list[str], features: HashedNgrams) -> Bags:
    words, ids, lengths = tokenize(texts)
    hashes, flat, offsets = features.word_features(words)
    per_word = np.diff(offsets)
    token_buckets = flat[_ragged(offsets[ids], per_word[ids])]
    token_owner = np.repeat(np.repeat(np.arange(len(texts)), lengths), per_word[ids])
    gram_buckets, gram_owner = features.ngram_buckets(hashes, ids, lengths)
    # one sort groups the features by document and counts each bucket's repeats within it
    keys = np.concatenate([token_owner, gram_owner]) * features.buckets + np.concatenate([token_buckets, gram_buckets])
    keys, counts = np.unique(keys, return_counts=True)
    owner = keys // features.buckets
    doc_offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=len(texts)), out=doc_offsets[1:])
    sizes = np.bincount(owner, weights=counts, minlength=len(texts))
    weights = (counts / sizes[owner]).astype(np.float32)
    return Bags(keys % features.buckets, weights, doc_offsets)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def gradients(rows: np.ndarray, weights: np.ndarray, W: np.ndarray, b: np.ndarray, y: int):
    """One document's cross-entropy loss and its gradients, by hand: ``(loss, d_rows, dW, db)``.

    Forward: ``h = weights @ rows`` (the mean feature row, d), ``z = h W + b``,
    ``p = softmax(z)``, loss ``-log p[y]``. Backward: ``dz = p - onehot(y)``,
    ``dW = outer(h, dz)``, ``db = dz``, ``dh = W dz``, and each feature row gets
    its share of ``dh``: ``d_rows = outer(weights, dh)``.
    """
    h = weights @ rows  # (d,)
    p = _softmax((h @ W + b)[None])[0]  # (K,)
    loss = -float(np.log(max(p[y], 1e-30)))
    dz = p
    dz[y] -= 1.0
    dh = W @ dz  # (d,), taken before W moves (as fastText)
    return loss, np.outer(weights, dh), np.outer(h, dz), dz


class HashedNgramClassifier:
    """fastText's supervised model: hashed n-gram embeddings, averaged, then a linear softmax layer.

    ``HashedNgramClassifier().fit(["buy now cheap"] * 20 + ["a dark night"] * 20, ["spam"] * 20 + ["ok"] * 20)``
    then ``.predict(["cheap pills, buy now"]) -> ["spam"]``.
    """

    def __init__(self, features: HashedNgrams | None = None, dim: int = 16):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.features = features or HashedNgrams()
        self.dim = dim  # fastText's paper uses 10 hidden units for sentiment; 16 is as cheap
        self.classes_: np.ndarray | None = None
        self.E: np.ndarray | None = None  # (B, d) the bucket embeddings
        self.W: np.ndarray | None = None  # (d, K)
        self.b: np.ndarray | None = None  # (K,)
        self._scores: np.ndarray | None = None  # (B, K) = E @ W, rebuilt after training or loading

    # ---- training -------------------------------------------------------------------------------------------
    def fit(self, texts: Sequence[str], labels: Sequence, epochs: int = 5, lr: float = 1.0, seed: int = 0):
        """Train from scratch: SGD on cross-entropy, lr falling linearly to 0 (fastText's schedule).

        One document per step, as fastText, so ``lr`` means what fastText's
        ``-lr`` means: its default is 0.1, its tutorial trains with 1.0, and
        1.0 is what learns in 5 epochs from the 700 labelled pages of a
        1,500-page corpus (0.5 finds a third of the low-quality pages there).
        The same texts, labels and seed give the same weights, bit for bit.
        """
        texts, labels = list(texts), list(labels)
        if len(texts) != len(labels) or not texts:
            raise ValueError(f"fit needs as many labels as texts (at least one), got {len(texts)} and {len(labels)}")
        classes = np.array(sorted(set(labels)))
        if classes.dtype == object or len(classes) < 2:
            raise ValueError(f"labels must be at least 2 classes, all strings or all numbers, got {classes[:5]}")
        if epochs < 1 or not lr > 0:
            raise ValueError(f"epochs >= 1 and lr > 0, got epochs={epochs}, lr={lr}")
        y = np.searchsorted(classes, np.array(labels))
        bags = featurize(texts, self.features)
        rng = np.random.default_rng(seed)
        B, d, K = self.features.buckets, self.dim, len(classes)
        E = rng.uniform(-1.0 / d, 1.0 / d, size=(B, d)).astype(np.float32)  # fastText's init: U(-1/d, 1/d), W = 0
        W = np.zeros((d, K), dtype=np.float32)
        b = np.zeros(K, dtype=np.float32)
        with threadpool_limits(1, "blas"):  # one BLAS thread: same sums every run, and no thread fights on 2 cores
            self._sgd(bags, y, E, W, b, epochs, lr, rng)
        self.classes_, self.E, self.W, self.b = classes, E, W, b
        self._scores = None
        return self

    def _sgd(self, bags: Bags, y: np.ndarray, E, W, b, epochs: int, lr: float, rng: np.random.Generator) -> None:
        """fastText's loop: one document at a time in a seeded random order, updating E, W, b in place."""
        n = len(bags)
        steps, step = epochs * n, 0
        for _ in range(epochs):
            for i in rng.permutation(n):
                rate = np.float32(lr * (1.0 - step / steps))
                step += 1
                buckets, weights = bags[i]
                rows = E[buckets]  # (u, d) the document's feature rows (distinct buckets)
                _, d_rows, dW, db = gradients(rows, weights, W, b, y[i])
                W -= rate * dW
                b -= rate * db
                E[buckets] = rows - rate * d_rows

    def embed(self, bags: Bags) -> np.ndarray:
        """The documents' mean feature vectors ``H`` (N x d), the hidden layer (zeros for an empty document)."""
        self._check_trained()
        H = np.zeros((len(bags), self.dim), dtype=np.float32)
        for i in range(len(bags)):
            buckets, weights = bags[i]
            H[i] = weights @ self.E[buckets]
        return H

    # ---- prediction -----------------------------------------------------------------------------------------
    def _check_trained(self):
        if self.E is None:
            raise ValueError("this classifier is not trained: call fit(texts, labels) or HashedNgramClassifier.load")

    def decision_function(self, texts: Sequence[str], chunk_chars: int = 250_000) -> np.ndarray:
        """The logits (N, K), computed from the score table ``S = E W`` one distinct word at a time.

        A document's logits are ``mean_f S[f] + b``; its word-level features
        (unigram + char n-grams) are summed once per distinct word of the
        chunk, then per token, so a word seen 1,000 times costs one lookup of
        its n-grams. Equal to ``softmax(mean_f E[f] W + b)`` up to float rounding.
        A chunk holds about ``chunk_chars`` characters (a hundred pages, or a
        few thousand lines), which bounds the memory.
        """
        self._check_trained()
        if self._scores is None:
            with threadpool_limits(1, "blas"):
                self._scores = (self.E @ self.W).astype(np.float64)
        S, K = self._scores, len(self.classes_)
        texts = list(texts)
        out = np.empty((len(texts), K), dtype=np.float64)
        ends = np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)))
        cuts = np.searchsorted(ends, np.arange(chunk_chars, ends[-1] if len(ends) else 0, chunk_chars), side="right")
        for lo, hi in pairwise([0, *np.unique(cuts).tolist(), len(texts)]):
            if hi <= lo:
                continue
            part = texts[lo:hi]
            words, ids, lengths = tokenize(part)
            hashes, flat, offsets = self.features.word_features(words)
            per_word = np.diff(offsets)
            word_sum = np.zeros((len(words), K))  # every word has its unigram feature, so no group is empty
            if len(words):
                word_sum = np.add.reduceat(S[flat], offsets[:-1], axis=0)
            grams, gram_doc = self.features.ngram_buckets(hashes, ids, lengths)
            token_doc = np.repeat(np.arange(len(part)), lengths)
            count = np.bincount(token_doc, weights=per_word[ids], minlength=len(part))
            count += np.bincount(gram_doc, minlength=len(part))
            for k in range(K):
                total = np.bincount(token_doc, weights=word_sum[ids, k], minlength=len(part))
                total += np.bincount(gram_doc, weights=S[grams, k], minlength=len(part))
                out[lo : lo + len(part), k] = total / np.maximum(count, 1)
        return out + self.b

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities (N, K), columns in the order of ``classes_``."""
        return _softmax(self.decision_function(texts))

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(texts), axis=1)]

    def proba_of(self, texts: Sequence[str], label) -> np.ndarray:
        """P(label) for every text."""
        self._check_trained()
        where = np.flatnonzero(self.classes_ == label)
        if len(where) == 0:
            raise ValueError(f"unknown label {label!r}: this classifier knows {list(self.classes_)}")
        return self.predict_proba(texts)[:, where[0]]

    # ---- saving ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the weights and settings as an ``.npz`` (plain arrays: loading runs no code)."""
        self._check_trained()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lo, hi = self.features.char_ngrams or (0, 0)
        settings = np.array([self.features.buckets, self.features.word_ngrams, lo, hi, self.dim])
        with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the name
            np.savez(f, E=self.E, W=self.W, b=self.b, classes=self.classes_, settings=settings)
        return path

    @classmethod
    def load(cls, path: str | Path) -> HashedNgramClassifier:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such classifier file (HashedNgramClassifier.save writes one)")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("E", "W", "b", "classes", "settings")}
        except (ValueError, KeyError, OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: not a HashedNgramClassifier file ({exc}); train and save one again") from None
        buckets, word_ngrams, lo, hi, dim = (int(v) for v in arrays["settings"])
        E, W, b, classes = arrays["E"], arrays["W"], arrays["b"], arrays["classes"]
        if E.shape != (buckets, dim) or W.shape != (dim, len(classes)) or b.shape != (len(classes),):
            raise ValueError(f"{path}: weights of inconsistent shapes {E.shape}, {W.shape}, {b.shape}; save it again")
        features = HashedNgrams(buckets, word_ngrams, (lo, hi) if hi else None)
        clf = cls(features, dim=dim)
        clf.E, clf.W, clf.b, clf.classes_ = E, W, b, classes
        return clf


# ---- measuring ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrecisionRecall:
    """How well ``positive`` was found: precision = TP / (TP + FP), recall = TP / (TP + FN) (0 when undefined)."""

    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int
    tn: int

    def as_dict(self) -> dict:
        return asdict(self)


def precision_recall(y_true: Sequence, y_pred: Sequence, positive=True) -> PrecisionRecall:
    """Precision and recall of the label ``positive``.

    ``precision_recall([1, 1, 0, 0], [1, 0, 1, 0], positive=1) -> precision 0.5, recall 0.5``.
    """
    t = np.asarray(y_true) == positive
    p = np.asarray(y_pred) == positive
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.shape} and {p.shape}")
    tp, fp, fn = int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PrecisionRecall(precision, recall, f1, tp, fp, fn, int((~t & ~p).sum()))


def sample(items: list, k: int | None, seed: int = 0) -> list:
    """At most ``k`` of ``items``, a seeded random choice kept in the original order (all of them for k=None)."""
    if k is None or len(items) <= k:
        return items
    keep = np.sort(np.random.default_rng(seed).choice(len(items), k, replace=False))
    return [items[i] for i in keep]


def held_out(doc: Document, test_fraction: float = 0.2, seed: int = 0) -> bool:
    """Whether a document falls in the held-out split: decided by a stable hash of its group id.

    A planted copy (``metadata["dup_of"]``) goes with its original, so the
    test split never holds a near-twin of a training document.
    """
    group = str(doc.metadata.get("dup_of") or doc.id)
    return zlib.crc32(f"{seed}:{group}".encode()) % 10_000 < test_fraction * 10_000


# ---- the quality filter ---------------------------------------------------------------------------------------
LOW_QUALITY = ("spam", "gibberish", "lorem", "repeated_chars")  # planted problems that make a page "low quality"


def quality_label(doc: Document) -> str | None:
    """ "low" for a page with a planted low-quality problem, "ok" for a clean page, None for the rest (not trained on).

    Pages with other problems (duplicates, foreign text, PII, HTML...) are
    someone else's job; a quality classifier trained on them would learn
    those instead.
    """
    planted = doc.metadata.get("planted") or []
    if any(label in LOW_QUALITY for label in planted):
        return "low"
    return "ok" if not planted and doc.metadata.get("format", "text") == "text" else None


def train_labelled(
    docs: Iterable[Document],
    label_of,
    positive: str,
    seed: int = 0,
    test_fraction: float = 0.2,
    threshold: float = 0.5,
    max_train: int | None = 4000,
    max_test: int | None = None,
    **fit_args,
) -> tuple[HashedNgramClassifier, dict]:
    """Train on the documents ``label_of`` labels, outside the held-out split; measure on the held-out split.

    The report has precision and recall of ``positive`` at ``threshold``,
    the split sizes, seconds to train and to predict, and, for every planted
    label, the fraction of held-out pages (labelled or not) the classifier
    flags: what it catches beyond what it was trained on.
    """
    docs = list(docs)
    test = sample([d for d in docs if held_out(d, test_fraction, seed)], max_test, seed)
    train = [d for d in docs if not held_out(d, test_fraction, seed) and label_of(d) is not None]
    train = sample(train, max_train, seed)
    if len({label_of(d) for d in train}) < 2:
        raise ValueError("training needs documents of both classes outside the held-out split; use more documents")
    t0 = time.perf_counter()
    clf = HashedNgramClassifier().fit([d.text for d in train], [label_of(d) for d in train], seed=seed, **fit_args)
    t1 = time.perf_counter()
    flagged = clf.proba_of([d.text for d in test], positive) > threshold
    t2 = time.perf_counter()
    labelled = [i for i, d in enumerate(test) if label_of(d) is not None]
    truth = [label_of(test[i]) == positive for i in labelled]
    pr = precision_recall(truth, flagged[labelled], positive=True)
    by_label: dict[str, list[int]] = {}
    for i, d in enumerate(test):
        for label in d.metadata.get("planted") or ["clean"]:
            by_label.setdefault(label, []).append(i)
    report = {
        "positive": positive,
        "threshold": threshold,
        "n_train": len(train),
        "n_test_labelled": len(labelled),
        "n_test": len(test),
        **pr.as_dict(),
        "flag_rate_by_label": {k: float(flagged[v].mean()) for k, v in sorted(by_label.items())},
        "train_seconds": t1 - t0,
        "predict_docs_per_s": len(test) / max(t2 - t1, 1e-9),
    }
    return clf, report


def train_quality_classifier(docs: Iterable[Document], seed: int = 0, **kwargs) -> tuple[HashedNgramClassifier, dict]:
    """A "low" vs "ok" classifier trained on the corpus's planted labels, measured on a held-out split."""
    return train_labelled(docs, quality_label, "low", seed=seed, **kwargs)


class QualityFilter(Filter):
    """Drop a page whose P(low quality) exceeds ``threshold`` (reason ``"quality:low_quality"``).

    Give it a trained classifier (or the path of a saved one). Without one,
    it trains on the planted labels of the corpus it is run on (``fit``, up
    to ``max_train`` documents outside the held-out split): convenient for the
    chapter's corpus, and exactly the circularity a real pipeline avoids by
    training on a separate labelled set.
    """

    name = "quality"
    positive = "low"
    rule = "low_quality"
    label_of = staticmethod(quality_label)

    def __init__(
        self,
        model: HashedNgramClassifier | str | Path | None = None,
        threshold: float = 0.5,
        seed: int = 0,
        max_train: int = 4000,
    ):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a probability in [0, 1], got {threshold}")
        self.clf = HashedNgramClassifier.load(model) if isinstance(model, str | Path) else model
        self.threshold, self.seed, self.max_train = threshold, seed, max_train
        self.needs_fit = self.clf is None
        self.report: dict | None = None

    def fit(self, docs: Iterable[Document]) -> None:
        if self.clf is None:
            self.clf, self.report = train_labelled(
                docs, self.label_of, self.positive, seed=self.seed, max_train=self.max_train, max_test=2000
            )

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        if self.clf is None:
            raise ValueError(f"the {self.name} filter has no classifier: pass one (or a path), or call fit(docs)")
        return self.clf.proba_of(texts, self.positive)

    def reason(self, text: str) -> str | None:
        return self.rule if self.scores([text])[0] > self.threshold else None

    def run(self, docs: Iterable[Document]) -> Iterator[Decision]:
        if self.needs_fit and self.clf is None:
            docs = list(docs)
            self.fit(docs)
        yield from scored_decisions(docs, self.scores, self.threshold, f"{self.name}:{self.rule}")


def scored_decisions(
    docs: Iterable[Document], scores, threshold: float, reason: str, chunk: int = 2048
) -> Iterator[Decision]:
    """``Stage.run`` for a classifier: score 2,048 documents per call (one numpy pass, not 2,048), in order."""
    batch: list[Document] = []
    for doc in chain(docs, [None]):
        if doc is not None:
            batch.append(doc)
        if batch and (doc is None or len(batch) == chunk):
            drop = scores([d.text for d in batch]) > threshold
            for d, bad in zip(batch, drop, strict=True):
                yield d, (reason if bad else None)
            batch = []


def top_words(clf: HashedNgramClassifier, texts: Sequence[str], label, k: int = 15) -> list[tuple[str, float]]:
    """The k words of ``texts`` that, alone as a document, push hardest towards ``label`` (logit margin).

    What a linear model learnt, read off directly: each distinct word is
    scored as a one-word document (its own features: the word and its
    character n-grams), and the margin is its logit for ``label`` minus the
    best other class's.
    """
    words = sorted({w for t in texts for w in t.lower().split()})
    if not words:
        return []
    logits = clf.decision_function(words)
    at = int(np.flatnonzero(clf.classes_ == label)[0])
    margin = logits[:, at] - np.delete(logits, at, axis=1).max(axis=1)
    best = np.argsort(-margin, kind="stable")[:k]
    return [(words[i], round(float(margin[i]), 3)) for i in best]
