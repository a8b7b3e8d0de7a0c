"""Exact deduplication: the fast normalisation equals text.normalize; whole-document copies go (the first stays);
boilerplate lines shared by many pages go, everything else stays; on the dirty corpus the planted copies and
the planted boilerplate are exactly what is removed."""

from __future__ import annotations

import pytest

from llmbook.pipeline import text
from llmbook.pipeline.dirty_corpus import CorpusConfig, make_corpus
from llmbook.pipeline.document import Document
from llmbook.pipeline.exact_dedup import (
    ExactDedup,
    LineDedup,
    line_keys,
    normalized_bytes,
    normalized_words,
    text_hash,
    word_bytes,
)
from llmbook.pipeline.stage import kept

SAMPLES = [
    "",
    "   \n\t ",
    "Hello, World!  Hello again.",
    "snake_case and CamelCase, 3.14 and 1,000",
    "control\x1cchars\x1fsplit\x07here",
    "Ünïcode: ﬁne ﬂour, İstanbul, Straße, ΣΊΣΥΦΟΣ, 東京 and ５ apples",
    "tabs\tand\r\nwindows\rline endings",
    "— dashes – and “quotes” «guillemets» ¿qué? ¡sí!",
    "* * *\n---\n...",
]


@pytest.mark.parametrize("sample", SAMPLES)
def test_fast_normalisation_equals_text_module(sample):
    assert normalized_words(sample) == text.words(sample)
    assert word_bytes(sample) == [w.encode() for w in text.words(sample)]
    assert normalized_bytes(sample) == text.normalize(sample).encode()
    lines = sample.split("\n")
    assert line_keys(sample) == [text.normalize(line).encode() for line in lines]


def test_text_hash_ignores_case_punctuation_and_spacing():
    assert text_hash("Hello,   world!") == text_hash("hello world") == text_hash("HELLO\nWORLD.")
    assert text_hash("hello world") != text_hash("hello worlds")
    assert len(text_hash("x")) == 8


def docs_of(*texts: str, ids: list[str] | None = None) -> list[Document]:
    ids = ids or [f"d{i}" for i in range(len(texts))]
    return [Document(i, t, {}) for i, t in zip(ids, texts, strict=True)]


def test_exact_dedup_keeps_the_first_copy():
    docs = docs_of("The cat sat.", "A different page.", "the CAT   sat!", "The cat sat.", "", "")
    decisions = list(ExactDedup().run(docs))
    reasons = [r for _, r in decisions]
    assert reasons == [None, None, "exact_dedup:duplicate", "exact_dedup:duplicate", None, "exact_dedup:duplicate"]
    assert [d.metadata.get("exact_dup_of") for d, _ in decisions] == [None, None, "d0", "d0", None, "d4"]
    assert docs[2].metadata == {}  # the input document is not changed


def test_exact_dedup_with_repeated_ids_decides_by_position():
    docs = docs_of("same text", "same text", "other", ids=["x", "x", "y"])
    assert [r for _, r in ExactDedup().run(docs)] == [None, "exact_dedup:duplicate", None]


def test_exact_dedup_bad_use_is_one_clear_error():
    stage = ExactDedup()
    with pytest.raises(ValueError, match="call fit"):
        stage.apply(Document("a", "text", {}))
    stage.fit(docs_of("one", "two"))
    with pytest.raises(ValueError, match="not in the corpus"):
        stage.apply(Document("zzz", "one", {}))


def site(content: str) -> str:
    return f"Home | About | Contact\nWe use cookies. By browsing you agree.\n\n{content}\n\n\nBack to top\n© 2024 Site"


def test_line_dedup_removes_template_lines_and_keeps_the_rest():
    pages = [site(f"Page {i} talks about topic number {i} at length.") for i in range(6)]
    pages.append("HOME | ABOUT | CONTACT!!\n\nBACK TO TOP")  # only template lines, written differently
    pages.append("A refrain.\nA refrain.\nA refrain.\n* * *\nA line in four pages.")
    pages += ["* * *\nA line in four pages.\nunique a", "* * *\nA line in four pages.\nunique b",
              "* * *\nA line in four pages.\nunique c"]
    docs = docs_of(*pages)
    stage = LineDedup(min_docs=5)
    decisions = list(stage.run(docs))
    out = [d.text for d, _ in decisions]
    for i in range(6):
        assert out[i] == f"Page {i} talks about topic number {i} at length."
        assert decisions[i][0].metadata["lines_removed"] == 4
    assert decisions[6][1] == "line_dedup:empty"
    assert out[7] == pages[7]  # a refrain inside one page counts once; 4 pages < min_docs; "* * *" never counts
    assert decisions[7][0] is docs[7]  # untouched pages are passed on as they are
    assert [r for _, r in decisions[:6] + decisions[7:]] == [None] * 10
    assert len(stage.repeated) == 4  # navigation, cookie banner, "back to top", the copyright line
    assert all(r is None and d is doc for (d, r), doc in zip(LineDedup(min_docs=8).run(docs), docs, strict=True))


def test_line_dedup_bad_use():
    with pytest.raises(ValueError, match="at least 2"):
        LineDedup(min_docs=1)
    with pytest.raises(ValueError, match="call fit"):
        LineDedup().apply(Document("a", "x", {}))


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return make_corpus(CorpusConfig(n_docs=1000, seed=3))


def test_exact_dedup_on_the_corpus_removes_exactly_the_planted_copies(corpus):
    dropped = {d.id for d, r in ExactDedup().run(corpus) if r}
    planted = {d.id for d in corpus if "exact_dup" in d.metadata["planted"]}
    assert planted and dropped == planted


def test_line_dedup_on_the_corpus_removes_the_planted_boilerplate(corpus):
    # near copies share their original's lines (a page and two copies are three pages): NearDedup's job
    docs = [d for d in kept(ExactDedup().run(corpus))
            if d.metadata["format"] == "text" and "near_dup" not in d.metadata["planted"]]
    decisions = list(LineDedup(min_docs=3).run(docs))
    planted_lines = removed_planted = removed_clean = 0
    for (out, _), doc in zip(decisions, docs, strict=True):
        boiler = set(line_keys("\n".join(doc.metadata["boilerplate"])))
        left = line_keys(out.text)
        for key in line_keys(doc.text):
            if not key:
                continue
            if key in boiler:
                planted_lines += 1
                removed_planted += key not in left
            elif not doc.metadata["planted"]:
                removed_clean += key not in left
    assert planted_lines > 200
    assert removed_planted == planted_lines  # every planted template line is gone
    assert removed_clean == 0  # and no clean page lost a line
