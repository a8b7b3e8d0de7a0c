"""The fastText-style classifier: stable hashing, exact factorized prediction, hand gradients equal to numerical
ones, deterministic training, safe save/load; the quality and toxicity filters on the dirty corpus, held out."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from llmbook.pipeline.classifier import (
    HashedNgramClassifier,
    HashedNgrams,
    QualityFilter,
    featurize,
    gradients,
    held_out,
    precision_recall,
    quality_label,
    tokenize,
    top_words,
    train_quality_classifier,
)
from llmbook.pipeline.dirty_corpus import CorpusConfig, make_corpus
from llmbook.pipeline.document import Document
from llmbook.pipeline.toxicity import (
    ToxicityFilter,
    compare_with_profanity_check,
    labelled_lines,
    lines_of,
    train_toxicity_classifier,
)

SPAM = ["buy cheap watches online best price", "cheap pills click here free shipping", "best price cheap sale now"]
OK = ["it is a truth universally acknowledged", "my dear lizzy do not give way", "the king is in his chamber"]


def toy(n: int = 30) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for i in range(n):
        pool, label = (SPAM, "spam") if i % 2 else (OK, "ok")
        words = " ".join(pool[j] for j in rng.integers(0, 3, size=2))
        texts.append(words)
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return make_corpus(CorpusConfig(n_docs=1500, seed=3))


@pytest.fixture(scope="module")
def toxicity(corpus):
    return train_toxicity_classifier(corpus, seed=0, max_negative=3000)


def test_tokenize_counts_each_distinct_word_once():
    words, ids, lengths = tokenize(["a b a", "B !", ""])
    assert words == ["a", "b", "!"]
    assert ids.tolist() == [0, 1, 0, 1, 2] and lengths.tolist() == [3, 2, 0]


def test_features_of_a_short_text():
    f = HashedNgrams(buckets=2**20, word_ngrams=2, char_ngrams=(3, 3))
    bags = featurize(["The cat", "the the"], f)
    # "the", "cat", "the cat", and the trigrams of "<the>" and "<cat>": 3 + 3 -> 9 features, all distinct
    assert bags.offsets[1] == 9
    assert np.allclose(bags.weights[:9], 1 / 9)
    # "the the": each word's 4 features twice and the bigram once -> 4 distinct buckets of weight 2/9, one of 1/9
    assert sorted(np.round(bags[1][1] * 9, 6).tolist()) == [1, 2, 2, 2, 2]
    for i in range(len(bags)):
        assert bags[i][1].sum() == pytest.approx(1.0)
    assert featurize([""], f).offsets.tolist() == [0, 0]
    texts = [*toy(20)[0], "", "x y z"]
    small, whole = featurize(texts, f, chunk=3), featurize(texts, f)  # chunking bounds memory, changes nothing
    assert all(np.array_equal(getattr(small, k), getattr(whole, k)) for k in ("buckets", "weights", "offsets"))


def test_buckets_are_stable_across_processes():
    """Python's str hash is salted per process; ours must not be, or a saved model reads the wrong rows."""
    code = (
        "from llmbook.pipeline.classifier import HashedNgrams, featurize;"
        "print(featurize(['Stable hashing, please!'], HashedNgrams()).buckets.tolist())"
    )
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        for seed in ("1", "2")
    }
    assert len(runs) == 1
    assert runs.pop().strip() == str(featurize(["Stable hashing, please!"], HashedNgrams()).buckets.tolist())


def test_hand_gradients_equal_numerical_ones():
    rng = np.random.default_rng(0)
    rows, W, b = rng.normal(size=(5, 4)), rng.normal(size=(4, 3)), rng.normal(size=3)
    weights = np.array([0.1, 0.2, 0.3, 0.25, 0.15])
    loss, d_rows, dW, db = gradients(rows, weights, W, b, y=2)
    eps = 1e-6
    for param, grad in ((rows, d_rows), (W, dW), (b, db)):
        numeric = np.zeros_like(param)
        for idx in np.ndindex(param.shape):
            old = param[idx]
            param[idx] = old + eps
            up = gradients(rows, weights, W, b, 2)[0]
            param[idx] = old - eps
            down = gradients(rows, weights, W, b, 2)[0]
            param[idx] = old
            numeric[idx] = (up - down) / (2 * eps)
        assert np.allclose(grad, numeric, atol=1e-6)
    assert loss > 0


def test_learns_deterministically_and_predicts_by_the_factorized_table():
    texts, labels = toy()
    a = HashedNgramClassifier().fit(texts, labels, epochs=10, lr=1.0, seed=1)  # 30 texts need more passes
    b = HashedNgramClassifier().fit(texts, labels, epochs=10, lr=1.0, seed=1)
    c = HashedNgramClassifier().fit(texts, labels, epochs=10, lr=1.0, seed=2)
    assert np.array_equal(a.E, b.E) and np.array_equal(a.W, b.W) and not np.array_equal(a.E, c.E)
    assert a.predict(["cheap watches, best price online", "the king is universally acknowledged"]).tolist() == [
        "spam",
        "ok",
    ]
    # the per-word score table gives the same probabilities as averaging embeddings, then the linear layer
    probe = [*texts[:5], "", "unseen words entirely"]
    H = a.embed(featurize(probe, a.features))
    z = H @ a.W + a.b
    explicit = np.exp(z - z.max(axis=1, keepdims=True))
    explicit /= explicit.sum(axis=1, keepdims=True)
    assert np.allclose(a.predict_proba(probe), explicit, atol=1e-5)
    # an empty text has no features: its logits are the bias alone
    assert np.allclose(a.decision_function([""])[0], a.b)
    assert top_words(a, texts, "spam", k=3)[0][0] in {w for t in SPAM for w in t.split()}


def test_save_load_round_trip_and_bad_files(tmp_path):
    texts, labels = toy()
    clf = HashedNgramClassifier(HashedNgrams(buckets=4096, char_ngrams=(2, 4)), dim=8).fit(texts, labels, epochs=2)
    path = clf.save(tmp_path / "clf.npz")
    back = HashedNgramClassifier.load(path)
    assert back.features == clf.features and back.dim == 8
    assert np.array_equal(back.predict_proba(texts), clf.predict_proba(texts))
    with np.load(path, allow_pickle=False) as z:  # plain arrays only: loading runs no code
        assert set(z.files) == {"E", "W", "b", "classes", "settings"}
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a HashedNgramClassifier file"):
        HashedNgramClassifier.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="no such classifier file"):
        HashedNgramClassifier.load(tmp_path / "missing.npz")


def test_bad_input_says_what_to_do():
    with pytest.raises(ValueError, match="as many labels as texts"):
        HashedNgramClassifier().fit(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="at least 2 classes"):
        HashedNgramClassifier().fit(["a", "b"], ["x", "x"])
    with pytest.raises(ValueError, match="not trained"):
        HashedNgramClassifier().predict(["a"])
    clf = HashedNgramClassifier(HashedNgrams(buckets=1024)).fit(*toy(), epochs=1)
    with pytest.raises(ValueError, match="unknown label 'ham'"):
        clf.proba_of(["a"], "ham")
    with pytest.raises(ValueError, match="char_ngrams"):
        HashedNgrams(char_ngrams=(4, 2))
    with pytest.raises(ValueError, match="threshold"):
        QualityFilter(threshold=1.5)


def test_precision_recall():
    pr = precision_recall([1, 1, 0, 0], [1, 0, 1, 0], positive=1)
    assert (pr.precision, pr.recall, pr.f1, pr.tp, pr.fp, pr.fn, pr.tn) == (0.5, 0.5, 0.5, 1, 1, 1, 1)
    none = precision_recall(["a", "b"], ["b", "b"], positive="a")
    assert none.precision == 0.0 and none.recall == 0.0  # nothing predicted positive: 0, as scikit-learn
    with pytest.raises(ValueError, match="same length"):
        precision_recall([1, 0], [1])


def test_held_out_split_keeps_copies_with_their_original():
    original = Document("doc1", "x")
    copies = [Document(f"copy{i}", "x", {"dup_of": "doc1"}) for i in range(20)]
    assert {held_out(c, seed=5) for c in copies} == {held_out(original, seed=5)}
    share = np.mean([held_out(Document(f"d{i}", "")) for i in range(5000)])
    assert 0.17 < share < 0.23


def test_quality_classifier_on_the_corpus(corpus):
    clf, report = train_quality_classifier(corpus, seed=0)
    assert report["n_test_labelled"] > 100
    assert report["precision"] >= 0.95 and report["recall"] >= 0.7
    rates = report["flag_rate_by_label"]
    assert rates["spam"] >= 0.9 and rates["gibberish"] >= 0.9 and rates["clean"] <= 0.02
    # the filter's batched run decides as its one-at-a-time reason does
    f = QualityFilter(clf)
    sample = corpus[:300]
    batched = [reason for _, reason in f.run(sample)]
    assert batched == [f.apply(d)[1] for d in sample]
    assert set(batched) <= {None, "quality:low_quality"}
    flagged = [d for d, r in zip(sample, batched, strict=True) if r is not None]
    assert flagged and all(d.metadata["planted"] for d in flagged)  # no clean page among them
    assert any(quality_label(d) is None for d in flagged)  # it also flags what it was not trained on (foreign...)


def test_quality_filter_fits_itself_when_given_no_model(corpus):
    f = QualityFilter(max_train=300)
    assert f.needs_fit
    decisions = list(f.run(corpus[:400]))
    assert len(decisions) == 400 and f.report["n_train"] <= 300
    with pytest.raises(ValueError, match="no classifier"):
        QualityFilter().scores(["x"])


def test_toxicity_on_planted_lines(corpus, toxicity):
    lines, owner = lines_of(["a\n\nb", ""])
    assert lines == ["a", "b", ""] and owner.tolist() == [0, 0, 1]
    texts, labels = labelled_lines(corpus)
    assert labels.count("toxic") > 20
    clf, report = toxicity
    assert report["n_train_lines"] <= report["n_train_toxic_lines"] + 3000
    assert report["line"]["recall"] >= 0.9 and report["line"]["precision"] >= 0.9
    assert report["page"]["recall"] >= 0.9 and report["page"]["precision"] >= 0.8
    # bias, on purpose: it learnt the planted template as much as the insults
    template, old_insult = clf.proba_of(["Comment by reader: I loved this chapter.", "Thou whoreson dog!"], "toxic")
    assert template > old_insult
    f = ToxicityFilter(clf)
    sample = [d for d in corpus if d.metadata.get("format") == "text"][:200]
    assert [r for _, r in f.run(sample)] == [f.apply(d)[1] for d in sample]


def test_compare_with_profanity_check(corpus, toxicity):
    result = compare_with_profanity_check(corpus, toxicity[0], seed=0)
    assert result["n_offensive"] > 0 and 0.0 <= result["agreement"] <= 1.0
    # profanity-check was trained on other people's comments: it finds the planted insults too ...
    assert result["profanity_check"]["recall"] >= 0.8
    # ... and flags clean book text our planted-label model leaves alone (Shakespeare's "bloody", "whoreson")
    assert result["flag_rate_by_label"]["clean"]["theirs"] > result["flag_rate_by_label"]["clean"]["ours"]
    for example in result["disagreements"]:
        assert example["ours"] != example["profanity_check"]
