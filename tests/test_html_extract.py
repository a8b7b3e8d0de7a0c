"""HTML to text: boilerplate elements dropped, main text and its blocks kept; compared with trafilatura."""

from __future__ import annotations

import pytest

from llmbook.pipeline.dirty_corpus import CorpusConfig, make_corpus
from llmbook.pipeline.document import Document
from llmbook.pipeline.html import HtmlExtract, extraction_agreement, html_to_text, word_f1, word_scores
from llmbook.pipeline.text import words

PAGE = """<!DOCTYPE html><html><head><title>A title</title><style>p { color: red; }</style>
<script>var tracking = "do not keep me";</script></head>
<body>
<header><div class="logo">Site Name</div><nav><ul><li><a href="/">Home</a></li><li>About</li></ul></nav></header>
<div id="cookie-banner"><p>We use cookies to improve your experience.</p><button>Accept</button></div>
<main><article>
<h1>The heading</h1>
<p>It is a truth universally acknowledged, that a single man in possession of a good fortune,
must be in want of a wife.</p>
<p>However little known the feelings<br>or views of such a man may be &amp; so on.</p>
<div class="share-buttons"><a href="#">Share on Facebook</a></div>
</article></main>
<aside class="sidebar">Related posts</aside>
<form><input name="q"><button>Search</button></form>
<footer><p>&copy; 2024 Site Name. All rights reserved.</p></footer>
</body></html>"""


def test_boilerplate_elements_are_dropped_and_main_text_kept():
    text = html_to_text(PAGE)
    for gone in ("Home", "About", "cookies", "Share on Facebook", "Related posts", "Search", "All rights reserved",
                 "tracking", "color", "A title", "Site Name"):
        assert gone not in text
    assert text == ("The heading\n\n"
                    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife.\n\n"
                    "However little known the feelings\nor views of such a man may be & so on.")


def test_blocks_become_paragraphs_and_br_a_line_break():
    assert html_to_text('<p>One<br>two</p><div class="share">Tweet</div><p>Three</p>') == "One\ntwo\n\nThree"
    assert html_to_text("<ul><li>a<li>b</ul>text <b>bold</b> <i>and</i> more") == "a\n\nb\n\ntext bold and more"


def test_broken_html_never_crashes():
    assert html_to_text("<div><p>unclosed <b>tags</div> and </span> stray ends") == "unclosed tags\n\nand stray ends"
    assert html_to_text("<nav>menu only") == ""
    assert html_to_text("") == ""
    with pytest.raises(ValueError, match="str"):
        html_to_text(b"<p>bytes</p>")


def test_stage_extracts_html_documents_and_passes_others():
    stage = HtmlExtract()
    doc, reason = stage.apply(Document("a", PAGE, {"format": "html", "planted": ["html"]}))
    assert reason is None and doc.metadata["format"] == "text" and doc.text.startswith("The heading")
    plain = Document("b", "<p>not parsed</p>", {"format": "text"})
    assert stage.apply(plain) == (plain, None)
    _, reason = stage.apply(Document("c", "<nav>Home</nav>", {"format": "html"}))
    assert reason == "html:empty"


def test_word_f1():
    assert word_f1("a b c", "a b c") == 1.0
    assert word_f1("", "") == 1.0 and word_f1("x", "a b") == 0.0
    assert word_f1("a b", "a b c d") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert word_scores("a b x y", "a b c d") == (0.5, 0.5, 0.5)
    assert word_scores("", "a") == (1.0, 0.0, 0.0)


@pytest.fixture(scope="module")
def pages():
    docs = make_corpus(CorpusConfig(n_docs=300, seed=0, html=0.3))
    return [(d.text, d.metadata["main_text"]) for d in docs if d.metadata["format"] == "html"]


def test_corpus_pages_with_semantic_markup_extract_exactly(pages):
    semantic = [(h, m) for h, m in pages if "<nav" in h]
    assert len(semantic) > 10
    assert all(words(html_to_text(h)) == words(m) for h, m in semantic)


def test_agreement_with_trafilatura_runs_and_is_measured(pages):
    result = extraction_agreement(pages[:25])
    assert result["pages"] == 25
    for name in ("ours", "trafilatura"):
        for what in ("f1", "precision", "recall", "exact"):
            assert 0.0 <= result[f"{name}_{what}"] <= 1.0
        assert result[f"{name}_seconds"] > 0
    assert 0.0 <= result["ours_vs_trafilatura_f1"] <= 1.0
    assert result["ours_recall"] == 1.0  # the rules never drop main text on these pages; boilerplate may stay
    assert result["ours_f1"] > 0.8 and result["trafilatura_f1"] > 0.6
    assert extraction_agreement(pages[:3], favor_recall=True)["pages"] == 3
    with pytest.raises(ValueError, match="at least one"):
        extraction_agreement([])
