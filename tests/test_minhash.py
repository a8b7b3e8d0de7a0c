"""MinHash + LSH against datasketch: identical signatures (both permutation schemes), the fast shingle hash's
Jaccard estimates within their standard error, the same LSH candidates as MinHashLSH, the same (b, r) as its
optimiser; the S-curve's properties; near-dedup keeps exactly one document per cluster, and on the dirty
corpus its recall by true Jaccard follows 1 - (1 - s^r)^b."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH
from datasketch.lsh import _optimal_param

from llmbook.pipeline import minhash, text
from llmbook.pipeline.dirty_corpus import CorpusConfig, make_corpus
from llmbook.pipeline.document import Document
from llmbook.pipeline.lsh import (
    NearDedup,
    UnionFind,
    clusters_from_edges,
    lsh_candidates,
    lsh_edges,
    pair_precision,
    planted_pairs,
    recall_by_jaccard,
    shingle_sets,
)
from llmbook.pipeline.minhash import MinHasher, choose_bands_rows, estimate_jaccard, s_curve, signatures

TEXTS = [
    "",
    "one",
    "four words only here",
    "the cat sat on the mat today and then it went away quietly",
    "the cat sat on the mat yesterday and then it went away quietly",
    "Ünïcode: ﬁne ﬂour from İstanbul, Straße and 東京, five ５ words or more",
    " ".join(f"w{i % 37}" for i in range(600)),  # long, repetitive: its shingles repeat
]


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return make_corpus(CorpusConfig(n_docs=1500, seed=1))


def datasketch_signature(t: str, num_perm: int, seed: int, scheme: str) -> np.ndarray:
    m = MinHash(num_perm=num_perm, seed=seed, scheme=scheme)
    m.update_batch([s.encode() for s in text.word_shingles(t)])
    return m.hashvalues


@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
@pytest.mark.parametrize(("num_perm", "seed", "chunk"), [(128, 1, 8192), (64, 7, 13), (3, 42, 1)])
def test_signatures_identical_to_datasketch(scheme, num_perm, seed, chunk):
    mh = MinHasher(num_perm=num_perm, seed=seed, hash="sha1", scheme=scheme, chunk=chunk)
    ours = mh.signatures(TEXTS, batch=3)
    assert ours.dtype == (np.uint32 if scheme == "affine32" else np.uint64)
    for t, sig in zip(TEXTS, ours, strict=True):
        np.testing.assert_array_equal(sig, datasketch_signature(t, num_perm, seed, scheme))
        np.testing.assert_array_equal(mh.signature(t), sig)


def test_signatures_identical_to_datasketch_on_corpus_pages(corpus):
    texts = [d.text for d in corpus[:60]]
    ours = signatures(texts, num_perm=128, seed=1, hash="sha1")
    for t, sig in zip(texts, ours, strict=True):
        np.testing.assert_array_equal(sig, datasketch_signature(t, 128, 1, "affine32"))


def test_fast_shingle_hashes_are_the_shingle_sets(corpus):
    texts = [d.text for d in corpus[:300]] + TEXTS
    sets = shingle_sets(texts)
    assert [len(s) for s in sets] == [len(text.word_shingles(t)) for t in texts]  # no collision, nothing lost
    a, b = texts[3], texts[4]
    for x, y in [(TEXTS[3], TEXTS[4]), (a, b)]:
        sx, sy = shingle_sets([x, y])
        inter = len(np.intersect1d(sx, sy))
        assert inter / (len(sx) + len(sy) - inter) == pytest.approx(text.jaccard(text.word_shingles(x),
                                                                                  text.word_shingles(y)))


def test_fast_estimates_agree_with_datasketch_within_their_error(corpus):
    """Planted pairs of known Jaccard: our fast-hash estimate and datasketch's both within 4 standard errors."""
    P = 256
    pairs = [(i, j, jac) for i, j, jac in planted_pairs(corpus) if "near_dup" in corpus[j].metadata["planted"]]
    assert len(pairs) > 60
    texts = [d.text for d in corpus]
    ours = signatures(texts, num_perm=P, seed=1)
    z_ours, z_ds = [], []
    for i, j, jac in pairs:
        se = max(np.sqrt(jac * (1 - jac) / P), 1 / P)
        z_ours.append((estimate_jaccard(ours[i], ours[j]) - jac) / se)
        ds = estimate_jaccard(datasketch_signature(texts[i], P, 1, "affine32"),
                              datasketch_signature(texts[j], P, 1, "affine32"))
        z_ds.append((ds - jac) / se)
    z_ours, z_ds = np.array(z_ours), np.array(z_ds)
    assert np.abs(z_ours).max() < 4 and np.abs(z_ds).max() < 4
    assert abs(z_ours.mean()) < 4 / np.sqrt(len(pairs))  # unbiased: the mean error is within 4 of its own errors
    assert 0.5 < z_ours.std() < 1.5  # and the spread is the binomial one


def test_estimate_jaccard_shapes_and_errors():
    sigs = signatures(TEXTS[3:5], num_perm=64)
    assert isinstance(estimate_jaccard(sigs[0], sigs[0]), float) and estimate_jaccard(sigs[0], sigs[0]) == 1.0
    assert estimate_jaccard(sigs, sigs[0]).shape == (2,)
    with pytest.raises(ValueError, match="different lengths"):
        estimate_jaccard(sigs[0], sigs[0][:10])


def test_bad_parameters_are_one_clear_error():
    for kwargs, match in [({"num_perm": 0}, "num_perm"), ({"scheme": "affine64"}, "scheme"),
                          ({"hash": "md5"}, "hash"), ({"n": 0}, "shingle size")]:
        with pytest.raises(ValueError, match=match):
            MinHasher(**kwargs).signatures(["a b c"])
    with pytest.raises(ValueError, match="workers"):
        MinHasher().signatures(["a"], workers=0)
    with pytest.raises(ValueError, match="need 130"):
        lsh_edges(np.zeros((3, 128), dtype=np.uint32), 13, 10)
    with pytest.raises(ValueError, match="num_perm >= 130"):
        NearDedup(bands=13, rows=10, num_perm=128)
    with pytest.raises(ValueError, match="threshold"):
        choose_bands_rows(1.0, 128)


def test_two_workers_give_the_same_signatures(corpus):
    texts = [d.text for d in corpus[:400]]
    mh = MinHasher(num_perm=32)
    np.testing.assert_array_equal(mh.signatures(texts, workers=2, batch=64), mh.signatures(texts))


# ---------------------------------------------------------------------------------------------- the S-curve


def test_s_curve_properties():
    s = np.linspace(0, 1, 101)
    for b, r in [(14, 8), (20, 5), (1, 1), (64, 2)]:
        y = s_curve(s, b, r)
        assert y[0] == 0.0 and y[-1] == 1.0
        assert np.all(np.diff(y) >= 0)  # more similar, never less likely
        t = (1 / b) ** (1 / r)  # near the step: one band matches with probability 1/b
        assert s_curve(t, b, r) == pytest.approx(1 - (1 - 1 / b) ** b)
    assert s_curve(0.5, 1, 1) == 0.5  # one band of one row: P(candidate) = P(one minimum agrees) = s
    assert s_curve(0.8, 14, 8) == pytest.approx(0.924, abs=1e-3)  # datatrove's docstring: 0.924


@pytest.mark.parametrize("num_perm", [16, 64, 128, 256])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 0.8, 0.9])
def test_choose_bands_rows_equals_datasketch(threshold, num_perm):
    assert choose_bands_rows(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)


def test_choose_bands_rows_weights_equal_datasketch():
    for weights in [(0.9, 0.1), (0.2, 0.8)]:
        assert choose_bands_rows(0.75, 100, weights) == _optimal_param(0.75, 100, *weights)


# ---------------------------------------------------------------------------------------------- LSH


@pytest.mark.parametrize(("bands", "rows"), [(14, 8), (32, 4), (8, 2)])
def test_lsh_candidates_equal_datasketch(corpus, bands, rows):
    docs = corpus[:400]
    P = bands * rows
    sigs = signatures([d.text for d in docs], num_perm=P, seed=1, hash="sha1")
    lsh = MinHashLSH(num_perm=P, params=(bands, rows))
    mhs = []
    for i, d in enumerate(docs):
        m = MinHash(num_perm=P, seed=1)
        m.update_batch([s.encode() for s in text.word_shingles(d.text)])
        np.testing.assert_array_equal(m.hashvalues, sigs[i])
        lsh.insert(i, m)
        mhs.append(m)
    theirs = {(min(i, j), max(i, j)) for i, m in enumerate(mhs) for j in lsh.query(m) if j != i}
    ours = lsh_candidates(sigs, bands, rows)
    assert len(ours) > 20 and ours == theirs
    # the star edges connect exactly what the candidate pairs connect
    all_pairs = np.array(sorted(ours))
    np.testing.assert_array_equal(clusters_from_edges(len(docs), lsh_edges(sigs, bands, rows)),
                                  clusters_from_edges(len(docs), all_pairs))


def test_union_find():
    uf = UnionFind(6)
    assert uf.union(4, 2) and uf.union(2, 5) and not uf.union(5, 4)
    assert uf.union(1, 0)
    assert uf.roots().tolist() == [0, 0, 2, 3, 2, 2]  # the root is the first member in corpus order


# ---------------------------------------------------------------------------------------------- near-dedup


def planted_clusters(seed: int = 0, n_bases: int = 40) -> list[Document]:
    """Random-word pages, each followed (somewhere later) by 0-3 copies with 1% of the words replaced (J ~ 0.9)."""
    rng = random.Random(seed)
    vocab = [f"word{i}" for i in range(5000)]
    docs: list[Document] = []
    pending: list[tuple[int, str]] = []
    for b in range(n_bases):
        words = [rng.choice(vocab) for _ in range(rng.randint(80, 300))]
        docs.append(Document(f"base{b}", " ".join(words), {"cluster": b}))
        for _ in range(rng.randint(0, 3)):
            edited = [rng.choice(vocab) if rng.random() < 0.01 else w for w in words]
            pending.append((b, " ".join(edited)))
        # copies arrive later, interleaved with other pages
        while pending and rng.random() < 0.5:
            cl, t = pending.pop(rng.randrange(len(pending)))
            docs.append(Document(f"copy{len(docs)}", t, {"cluster": cl}))
    docs += [Document(f"copy{len(docs) + k}", t, {"cluster": cl}) for k, (cl, t) in enumerate(pending)]
    return docs


@pytest.mark.parametrize("verify", [True, False])
def test_near_dedup_keeps_exactly_one_per_planted_cluster(verify):
    docs = planted_clusters()
    stage = NearDedup(verify=verify)
    decisions = list(stage.run(docs))
    kept_docs = [d for d, r in decisions if r is None]
    assert [d.id for d in kept_docs] == [d.id for d in docs if d.id.startswith("base")]  # the first of each cluster
    assert sorted(d.metadata["cluster"] for d in kept_docs) == list(range(40))
    assert all(r == "near_dedup:duplicate" for d, r in decisions if d.id.startswith("copy"))
    for d, _ in decisions:  # every member of a cluster names the kept page
        if d.id.startswith("copy"):
            assert d.metadata["near_dup_cluster"] == f"base{d.metadata['cluster']}"
    assert stage.stats["duplicates"] == len(docs) - 40


def test_near_dedup_bad_use():
    stage = NearDedup()
    with pytest.raises(ValueError, match="call fit"):
        stage.apply(Document("a", "x", {}))
    stage.fit([Document("a", "some text here", {})])
    with pytest.raises(ValueError, match="not in the corpus"):
        stage.apply(Document("b", "x", {}))


def test_recall_on_the_corpus_follows_the_s_curve(corpus):
    docs = [d for d in corpus if d.metadata["format"] == "text"]
    stage = NearDedup(verify=False)
    stage.fit(docs)
    rows = recall_by_jaccard(docs, stage.clusters, 14, 8)
    assert sum(r["pairs"] for r in rows) == len(planted_pairs(docs)) > 150
    for row in rows:
        if row["pairs"]:
            p, n = row["s_curve"], row["pairs"]
            # clustering can only add to LSH's probability; 4 binomial standard errors (+1 pair) of slack
            assert row["recall"] >= p - 4 * np.sqrt(p * (1 - p) / n) - 1 / n
            assert row["recall"] <= p + 4 * np.sqrt(p * (1 - p) / n) + 0.1
    assert rows[-1]["recall"] == 1.0 and rows[-1]["jaccard_lo"] == 0.9
    texts = [d.text for d in docs]
    assert pair_precision(texts, stage.edges, 0.5) > 0.9


def test_verified_pairs_all_reach_the_threshold(corpus):
    docs = [d for d in corpus if d.metadata["format"] == "text"]
    stage = NearDedup(verify=True, threshold=0.7)
    stage.fit(docs)
    assert len(stage.edges) > 50
    for i, j in stage.edges.tolist():
        assert text.jaccard(text.word_shingles(docs[i].text), text.word_shingles(docs[j].text)) >= 0.7
    assert pair_precision([d.text for d in docs], stage.edges, 0.7) == 1.0


def test_minhash_module_reaches_the_lsh_names():
    assert minhash.NearDedup is NearDedup
    with pytest.raises(AttributeError):
        minhash.no_such_name  # noqa: B018
