"""The dirty corpus: deterministic, every label true (recomputed from the text), clean pages unrelated."""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest

from llmbook.pipeline.dirty_corpus import PROBLEMS, CorpusConfig, make_corpus, summary, write_corpus
from llmbook.pipeline.document import read_jsonl
from llmbook.pipeline.text import jaccard, normalize, word_shingles, words

KEYS = {"source", "origin", "planted", "dup_of", "jaccard", "lang", "pii", "boilerplate", "format"}


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(CorpusConfig(n_docs=600, seed=1))


@pytest.fixture(scope="module")
def by_id(corpus):
    return {d.id: d for d in corpus}


def labelled(corpus, label):
    return [d for d in corpus if label in d.metadata["planted"]]


def test_same_seed_same_corpus_other_seed_other_corpus():
    a = make_corpus(CorpusConfig(n_docs=150, seed=3))
    b = make_corpus(CorpusConfig(n_docs=150, seed=3))
    c = make_corpus(CorpusConfig(n_docs=150, seed=4))
    assert [(d.id, d.text, d.metadata) for d in a] == [(d.id, d.text, d.metadata) for d in b]
    assert [d.text for d in a] != [d.text for d in c]


def test_every_problem_planted_and_about_half_clean(corpus):
    counts = summary(corpus)
    assert counts["total"] == 600
    assert all(counts[p] > 0 for p in PROBLEMS), counts
    assert 0.4 < counts["clean"] / 600 < 0.65


def test_metadata_has_the_agreed_keys(corpus):
    assert len({d.id for d in corpus}) == len(corpus)
    for d in corpus:
        assert KEYS <= d.metadata.keys()
        assert set(d.metadata["planted"]) <= set(PROBLEMS)
        assert d.metadata["format"] in ("text", "html")


def test_near_duplicates_have_their_recorded_true_jaccard(corpus, by_id):
    near = labelled(corpus, "near_dup")
    assert len(near) > 20
    values = []
    for d in near:
        orig = by_id[d.metadata["dup_of"]]
        assert orig.id < d.id and orig.metadata["planted"] == []
        assert d.metadata["jaccard"] == jaccard(word_shingles(d.text), word_shingles(orig.text))
        values.append(d.metadata["jaccard"])
    assert min(values) < 0.4 and max(values) > 0.85 and max(values) < 1.0  # a spread over 0.3..1


def test_exact_duplicates_normalize_equal_and_keep_their_originals_labels(corpus, by_id):
    dups = labelled(corpus, "exact_dup")
    assert len(dups) > 10
    variants = set()
    for d in dups:
        orig = by_id[d.metadata["dup_of"]]
        assert orig.id < d.id
        assert normalize(d.text) == normalize(orig.text)
        assert d.metadata["planted"] == ["exact_dup", *orig.metadata["planted"]]
        variants.add(d.metadata["variant"])
        if d.metadata["variant"] == "identical":
            assert d.text == orig.text
        else:
            assert d.text != orig.text
    assert variants == {"identical", "whitespace", "case"}


def test_planted_pii_strings_are_in_the_text(corpus):
    docs = labelled(corpus, "pii")
    assert docs
    for d in docs:
        assert d.metadata["pii"]
        text = d.metadata.get("main_text", d.text)
        assert all(s in text for s in d.metadata["pii"])
    kinds = {("@" in s) + 2 * (s.count(".") == 3 and s.replace(".", "").isdigit()) for d in docs
             for s in d.metadata["pii"]}
    assert kinds == {0, 1, 2}  # phones, e-mail addresses and IPv4 addresses


def test_short_pages_are_short_and_clean_pages_are_not(corpus):
    for d in labelled(corpus, "short"):
        assert len(words(d.text)) < 50 and len(d.text.split()) < 50
    for d in corpus:
        if not d.metadata["planted"]:
            assert len(d.text.split()) >= 80


def test_boilerplate_lines_and_html_main_text_are_recorded(corpus):
    for d in labelled(corpus, "boilerplate"):
        assert d.metadata["boilerplate"] and all(ln in d.text for ln in d.metadata["boilerplate"])
    pages = labelled(corpus, "html")
    assert pages
    for d in pages:
        assert d.metadata["format"] == "html" and d.text.startswith("<!DOCTYPE html>")
        assert d.metadata["main_text"] and "<" not in d.metadata["main_text"].split("\n")[0][:1]
    gutenberg = make_corpus(CorpusConfig(n_docs=60, seed=0, boilerplate=0.6, html=0.0, gutenberg=1.0))
    guts = [d for d in gutenberg if d.metadata.get("boilerplate_kind") == "gutenberg"]
    assert guts and all("*** START OF THIS PROJECT GUTENBERG EBOOK" in d.text for d in guts)


def test_foreign_pages_are_labelled_with_their_language(corpus):
    langs = {d.metadata["lang"] for d in labelled(corpus, "foreign")}
    assert langs <= {"fr", "de", "es", "el", "ru", "zh"} and len(langs) >= 4
    assert all(d.metadata["lang"] == "en" for d in corpus if "foreign" not in d.metadata["planted"])


def test_unrelated_clean_pages_share_no_line_and_little_text():
    # clean pages only, long enough to use the supply up twice over: excerpts and recombined pages
    cfg = CorpusConfig(n_docs=330, seed=2, min_words=1500, max_words=1800, **{p: 0.0 for p in PROBLEMS})
    docs = make_corpus(cfg)
    assert {d.metadata["origin"] for d in docs} == {"excerpt", "recombined"}
    lines = defaultdict(set)
    for i, d in enumerate(docs):
        for ln in d.text.split("\n"):
            if normalize(ln):
                lines[normalize(ln)].add(i)
    assert max(len(v) for v in lines.values()) == 1  # line-level dedup has nothing to remove
    # every pair sharing a 5-gram shingle (through an inverted index), its Jaccard similarity
    shingles = [word_shingles(d.text) for d in docs]
    index = defaultdict(list)
    for i, s in enumerate(shingles):
        for g in s:
            index[g].append(i)
    shared = defaultdict(int)
    for ids in index.values():
        if len(ids) <= 30:  # a phrase in many pages ("i do not know") cannot make two pages alike alone
            for a, b in itertools.combinations(ids, 2):
                shared[a, b] += 1
    worst = max(n / (len(shingles[a]) + len(shingles[b]) - n) for (a, b), n in shared.items())
    assert worst < 0.3


def test_write_corpus_round_trips(tmp_path):
    cfg = CorpusConfig(n_docs=40, seed=5)
    assert write_corpus(cfg, tmp_path / "c.jsonl") == 40
    back = list(read_jsonl(tmp_path / "c.jsonl"))
    assert [(d.id, d.text, d.metadata) for d in back] == [(d.id, d.text, d.metadata) for d in make_corpus(cfg)]


@pytest.mark.parametrize("bad", [{"n_docs": 0}, {"spam": 1.5}, {"near_dup": 0.6, "exact_dup": 0.5},
                                 {"min_words": 700, "max_words": 600}, {"pii": "0.1"}, {"seed": 1.5}])
def test_bad_config_is_one_clear_error(bad):
    with pytest.raises(ValueError, match=r"n_docs|share|sum|min_words|whole number"):
        CorpusConfig(**bad)
