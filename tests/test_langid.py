"""Language identification: lingua offline, the character n-gram classifier from scratch, the filter."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("lingua")

from llmbook import data  # noqa: E402
from llmbook.pipeline import foreign  # noqa: E402
from llmbook.pipeline.document import Document  # noqa: E402
from llmbook.pipeline.langid import (  # noqa: E402
    CharNgramLangID,
    LanguageFilter,
    LinguaLangID,
    char_ngram_ids,
    langid_agreement,
)

CLEAR = {
    "en": "The weather was fine, so the children walked to the school by the river with their friends.",
    "fr": "Il faisait beau, alors les enfants sont allés à l'école au bord de la rivière avec leurs amis.",
    "de": "Das Wetter war schön, also gingen die Kinder mit ihren Freunden am Fluss entlang zur Schule.",
}


@pytest.fixture(scope="module")
def lingua() -> LinguaLangID:
    return LinguaLangID(("en", "fr", "de", "es", "el", "ru", "zh"))  # the corpus's languages (built once)


def test_lingua_finds_clear_languages(lingua):
    assert lingua.predict(list(CLEAR.values())) == list(CLEAR)
    proba = lingua.predict_proba(list(CLEAR.values()))
    assert proba.shape == (3, len(lingua.languages))
    assert np.allclose(proba.sum(1), 1.0)
    assert proba[0, lingua.languages.index("en")] > 0.65


def test_lingua_bad_input(lingua):
    assert lingua.predict(["", "   ", "12345"]) == ["unknown", "unknown", "unknown"]
    assert lingua.predict(["\ud800 a lone surrogate is replaced"])[0] in lingua.languages
    with pytest.raises(ValueError, match="ISO 639-1"):
        LinguaLangID(("en", "xx"))


def sample_sentences() -> tuple[list[str], list[str]]:
    """Sentences per language: the foreign sample's, and English from Pride and Prejudice."""
    texts, labels = [], []
    for lang in ("fr", "de", "es", "el", "ru"):
        sents = foreign.sentences(lang)
        texts += sents
        labels += [lang] * len(sents)
    english = [s for s in data.read_text("pride_and_prejudice").split(". ") if len(s) > 40][200:260]
    return texts + english, labels + ["en"] * len(english)


def test_char_ngram_beats_90_percent_held_out():
    texts, labels = sample_sentences()
    order = np.random.default_rng(0).permutation(len(texts))
    train, test = order[: len(order) // 2], order[len(order) // 2 :]
    model = CharNgramLangID().fit([texts[i] for i in train], [labels[i] for i in train])
    predicted = model.predict([texts[i] for i in test])
    accuracy = np.mean([p == labels[i] for p, i in zip(predicted, test, strict=True)])
    assert accuracy > 0.9, accuracy
    proba = model.predict_proba([texts[i] for i in test[:5]])
    assert np.allclose(proba.sum(1), 1.0)


def test_char_ngram_ids_and_errors():
    ids = char_ngram_ids("ab", buckets=1000)
    assert len(ids) == 4 + 3 + 2  # " ab " has 4 characters, 3 bigrams, 2 trigrams
    assert np.array_equal(ids, char_ngram_ids("AB", buckets=1000))  # lower-cased
    assert len(char_ngram_ids("\ud800", buckets=10)) == 3 + 2 + 1  # a lone surrogate is a code point, not a crash
    with pytest.raises(ValueError, match="not trained"):
        CharNgramLangID().predict(["x"])
    with pytest.raises(ValueError, match="as many labels"):
        CharNgramLangID().fit(["a", "b"], ["en"])


def test_filter_drops_non_english(lingua):
    docs = [Document(lang, text) for lang, text in CLEAR.items()] + [Document("empty", "")]
    decisions = list(LanguageFilter(detector=lingua).run(docs))
    assert [why for _, why in decisions] == [None, "langid:fr", "langid:de", "langid:unknown"]
    assert LanguageFilter(detector=lingua).apply(docs[0]) == (docs[0], None)
    with pytest.raises(ValueError, match="does not know"):
        LanguageFilter(detector=lingua, language="pt").reason("text")


def test_langid_agreement_on_the_corpus(lingua):
    from llmbook.pipeline.dirty_corpus import CorpusConfig, make_corpus

    docs = make_corpus(CorpusConfig(n_docs=300, seed=1, foreign=0.2))
    report = langid_agreement(docs, lingua=lingua)
    assert report["n_train"] + report["n_test"] == 300
    assert len(report["languages"]) >= 4
    assert report["ngram_accuracy"] > 0.9 and report["lingua_accuracy"] > 0.9
    assert report["ngram_accuracy_foreign"] > 0.9 and report["lingua_accuracy_foreign"] > 0.9
    assert 0.9 < report["agreement"] <= 1.0
