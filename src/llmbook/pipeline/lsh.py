"""Locality-sensitive hashing over MinHash signatures, clusters by union-find, and the near-dedup stage.

Comparing every pair of N signatures costs N^2 / 2 comparisons: 5 * 10^9 for
100K documents. Banding (Leskovec, Rajaraman, Ullman, *Mining of Massive
Datasets*, ch. 3.4) cuts a signature of b*r values into b bands of r rows;
two documents become a *candidate pair* when all r rows of some band agree,
which for Jaccard s happens with probability 1 - (1 - s^r)^b (``s_curve``).
Each band is one sort of N keys, so the cost is b sorts instead of N^2.

Candidates are joined into clusters with union-find (a duplicate of a
duplicate is a duplicate) and one document per cluster is kept: the first in
corpus order, as datatrove's ``MinhashDedupFilter`` keeps one. Optionally each
candidate is first *verified*: its shingle sets' true Jaccard must reach the
threshold, which removes the S-curve's false positives at the price of
reading the candidates' texts again.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np

from llmbook.pipeline.document import Document
from llmbook.pipeline.exact_dedup import _InCorpusOrder
from llmbook.pipeline.minhash import HashName, MinHasher, Scheme, s_curve, shingle_hashes_batch
from llmbook.pipeline.stage import Decision, Stage


def _check_bands(sigs: np.ndarray, bands: int, rows: int) -> None:
    if bands < 1 or rows < 1:
        raise ValueError(f"bands and rows must be at least 1, got bands={bands}, rows={rows}")
    if sigs.ndim != 2 or bands * rows > sigs.shape[1]:
        raise ValueError(f"{bands} bands x {rows} rows need {bands * rows} signature values per document; "
                         f"the signatures have shape {sigs.shape}: lower bands or rows, or raise num_perm")


def band_buckets(sigs: np.ndarray, band: int, rows: int) -> np.ndarray:
    """Each document's bucket in one band: documents with equal ``rows`` values there share a bucket id.

    The band's r values are viewed as one r*4-byte key and ``np.unique``
    sorts the keys: equal keys, equal bucket (no hash of the band, so no
    collision can invent a candidate).
    """
    block = np.ascontiguousarray(sigs[:, band * rows : (band + 1) * rows])  # (D, rows)
    keys = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel()  # (D,) one key per document
    return np.unique(keys, return_inverse=True)[1].ravel()


def _groups(bucket: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Documents sorted by bucket (stable: corpus order inside a bucket), each group's start and size."""
    order = np.argsort(bucket, kind="stable")
    sorted_bucket = bucket[order]
    start = np.flatnonzero(np.r_[True, sorted_bucket[1:] != sorted_bucket[:-1]])
    size = np.diff(np.r_[start, len(bucket)])
    return order, start, size


def lsh_edges(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``(E, 2)`` pairs ``(first, other)``: every document linked to the first document of each bucket it shares.

    These "star" edges connect exactly the documents that all candidate pairs
    connect, with at most one edge per document and band instead of k^2/2
    for a bucket of k: a bucket of 1,000 empty pages is 999 edges, not 499,500.
    """
    sigs = np.asarray(sigs)
    _check_bands(sigs, bands, rows)
    parts = []
    for band in range(bands):
        order, start, size = _groups(band_buckets(sigs, band, rows))
        first_of = np.repeat(order[start], size)  # (D,) in sorted order: the first member of each one's bucket
        member = order
        keep = first_of != member
        parts.append(np.stack([first_of[keep], member[keep]], axis=1))
    edges = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
    return np.unique(edges, axis=0) if len(edges) else edges.reshape(0, 2).astype(np.int64)


def lsh_candidates(sigs: np.ndarray, bands: int, rows: int) -> set[tuple[int, int]]:
    """Every pair ``(i, j)``, i < j, that shares a bucket in at least one band: what ``MinHashLSH.query`` finds.

    Quadratic in a bucket's size; for clustering use ``lsh_edges``.
    """
    sigs = np.asarray(sigs)
    _check_bands(sigs, bands, rows)
    pairs: set[tuple[int, int]] = set()
    for band in range(bands):
        order, start, size = _groups(band_buckets(sigs, band, rows))
        for s, k in zip(start[size > 1].tolist(), size[size > 1].tolist(), strict=True):
            pairs.update(itertools.combinations(sorted(order[s : s + k].tolist()), 2))
    return pairs


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving; the root of a set is its smallest member (first in corpus order).

    >>> uf = UnionFind(5); uf.union(3, 1); uf.union(1, 4); uf.roots().tolist()
    [0, 1, 2, 1, 1]
    """

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving: point at the grandparent, the tree flattens as we walk
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> bool:
        """Join the sets of ``a`` and ``b``; False if they were already one."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        lo, hi = (ra, rb) if ra < rb else (rb, ra)
        self.parent[hi] = lo
        return True

    def roots(self) -> np.ndarray:
        """``(n,)`` each element's root."""
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def shingle_sets(texts: Sequence[str], n: int = 5) -> list[np.ndarray]:
    """Each text's shingle set as sorted unique 64-bit hashes (the sets MinHash summarises, for exact Jaccard)."""
    hashes, counts = shingle_hashes_batch(texts, n)
    return [np.unique(part) for part in np.split(hashes, np.cumsum(counts)[:-1])]


def set_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two sorted unique hash arrays; 1.0 for two empty sets, as ``text.jaccard``."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def verify_edges(edges: np.ndarray, texts: Sequence[str], threshold: float, n: int = 5) -> np.ndarray:
    """The edges whose two texts' true shingle Jaccard is at least ``threshold`` (only their texts are shingled)."""
    if len(edges) == 0:
        return edges
    involved = np.unique(edges)
    sets = dict(zip(involved.tolist(), shingle_sets([texts[i] for i in involved.tolist()], n), strict=True))
    keep = [set_jaccard(sets[i], sets[j]) >= threshold for i, j in edges.tolist()]
    return edges[np.array(keep, dtype=bool)]


def clusters_from_edges(n_docs: int, edges: np.ndarray) -> np.ndarray:
    """``(n_docs,)`` cluster id of each document: the index of its cluster's first document."""
    uf = UnionFind(n_docs)
    for i, j in edges.tolist():
        uf.union(i, j)
    return uf.roots()


class NearDedup(_InCorpusOrder, Stage):
    """MinHash + LSH near-deduplication: keep the first document of every cluster of near-duplicates.

    Defaults are FineWeb's (Penedo et al. 2024; datatrove's ``MinhashConfig``):
    word 5-grams, 14 bands x 8 rows = 112 permutations, an S-curve stepping at
    (1/14)^(1/8) = 0.72. With ``verify`` a candidate pair must also have true
    Jaccard >= ``threshold``. Kept and dropped members of a cluster get
    ``metadata["near_dup_cluster"]`` = the kept document's id.
    """

    name = "near_dedup"
    needs_fit = True

    def __init__(self, bands: int = 14, rows: int = 8, num_perm: int | None = None, n: int = 5, seed: int = 1,
                 threshold: float = 0.7, verify: bool = True, workers: int = 1, hash: HashName = "fast",
                 scheme: Scheme = "affine32") -> None:
        num_perm = bands * rows if num_perm is None else num_perm
        if bands * rows > num_perm:
            raise ValueError(f"{bands} bands x {rows} rows need num_perm >= {bands * rows}, got {num_perm}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a Jaccard similarity in [0, 1], got {threshold}")
        self.bands, self.rows, self.threshold, self.verify, self.workers = bands, rows, threshold, verify, workers
        self.hasher = MinHasher(num_perm=num_perm, seed=seed, n=n, hash=hash, scheme=scheme)
        self.clusters: np.ndarray | None = None
        self.edges: np.ndarray | None = None
        self.stats: dict[str, int] = {}

    def fit(self, docs: Iterable[Document]) -> None:
        docs = list(docs)
        texts = [d.text for d in docs]
        sigs = self.hasher.signatures(texts, workers=self.workers)
        edges = lsh_edges(sigs, self.bands, self.rows)
        candidates = len(edges)
        if self.verify:
            edges = verify_edges(edges, texts, self.threshold, self.hasher.n)
        self.edges, self.clusters = edges, clusters_from_edges(len(docs), edges)
        self._ids = [d.id for d in docs]
        self._remember(docs)
        sizes = np.bincount(self.clusters, minlength=len(docs))
        self._size = sizes[self.clusters]
        self.stats = {"documents": len(docs), "candidate_edges": candidates, "edges": len(edges),
                      "clusters_with_duplicates": int((sizes > 1).sum()),
                      "duplicates": int((self.clusters != np.arange(len(docs))).sum())}

    def apply(self, doc: Document) -> Decision:
        i = self._position(doc)
        root = int(self.clusters[i])
        if self._size[i] > 1:
            doc = Document(doc.id, doc.text, {**doc.metadata, "near_dup_cluster": self._ids[root]})
        return doc, (None if root == i else f"{self.name}:duplicate")


# ------------------------------------------------------------------------------ measured on the planted pairs


def planted_pairs(docs: Sequence[Document]) -> list[tuple[int, int, float]]:
    """``(original, copy, true Jaccard)`` for each planted exact or near duplicate whose original is in ``docs``."""
    index = {}
    for i, d in enumerate(docs):
        index.setdefault(d.id, i)
    pairs = []
    for j, d in enumerate(docs):
        planted = d.metadata.get("planted") or []
        original = d.metadata.get("dup_of")
        if original in index and ("near_dup" in planted or "exact_dup" in planted):
            jac = d.metadata.get("jaccard")
            pairs.append((index[original], j, 1.0 if jac is None else float(jac)))  # an exact copy: 1.0
    return pairs


def recall_by_jaccard(docs: Sequence[Document], clusters: np.ndarray, bands: int, rows: int,
                      bins: Sequence[float] = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)) -> list[dict]:
    """For planted pairs binned by true Jaccard: the fraction found in one cluster, beside the S-curve's prediction.

    The prediction is the mean of 1 - (1 - s^r)^b over the bin's pairs (the
    probability that LSH makes the pair a candidate); clustering can only add
    to it (a pair may be joined through a third document). The last bin
    includes 1.0.
    """
    pairs = planted_pairs(docs)
    jac = np.array([p[2] for p in pairs])
    found = np.array([clusters[i] == clusters[j] for i, j, _ in pairs], dtype=bool)
    rows_out = []
    for k, (lo, hi) in enumerate(itertools.pairwise(bins)):
        last = k == len(bins) - 2
        mask = (jac >= lo) & ((jac <= hi) if last else (jac < hi))
        m = int(mask.sum())
        rows_out.append({"jaccard_lo": lo, "jaccard_hi": hi, "pairs": m,
                         "recall": float(found[mask].mean()) if m else None,
                         "s_curve": float(np.mean(s_curve(jac[mask], bands, rows))) if m else None})
    return rows_out


def pair_precision(texts: Sequence[str], edges: np.ndarray, threshold: float, n: int = 5) -> float | None:
    """The fraction of flagged pairs whose true shingle Jaccard is at least ``threshold`` (None without pairs)."""
    if len(edges) == 0:
        return None
    return len(verify_edges(np.asarray(edges), texts, threshold, n)) / len(edges)
