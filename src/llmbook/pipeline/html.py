"""HTML to text: keep a page's main text, drop its navigation, cookie banner, footer, scripts and styles.

Common Crawl's WARC files hold raw HTML; its WET files hold the text of the
whole page, menus and all. FineWeb (Penedo et al. 2024) found that extracting
the main text from the HTML with ``trafilatura`` instead of using WET text gave
a better model, because the boilerplate a page repeats (menus, "Share on
Facebook", "All rights reserved") is most of what a WET page says.

The extractor here is the simplest one that works on the usual page: walk the
tags with the standard library's ``html.parser``, skip whole elements that
are never main text (``script``, ``style``, ``nav``, ``header``, ``footer``,
``aside``, ``form``, ...) or whose ``class``/``id`` names them as boilerplate
(cookie, banner, menu, share, sidebar, ...), and turn block elements into line
breaks. trafilatura adds much more (link density, text-to-markup ratios,
fallback extractors); ``extraction_agreement`` measures how far the simple
rules get on the corpus's pages.

    >>> html_to_text('<nav>Home | About</nav><p>Main text.</p><footer>(c) 2024</footer>')
    'Main text.'
"""

from __future__ import annotations

import re
import time
from collections import Counter
from html.parser import HTMLParser

from llmbook.pipeline.document import Document
from llmbook.pipeline.stage import Decision, Stage
from llmbook.pipeline.text import words

# Elements that never hold a page's main text: skipped with everything inside them.
SKIP_TAGS = frozenset(
    {
        "script",
        "style",
        "noscript",
        "template",
        "head",
        "nav",
        "header",
        "footer",
        "aside",
        "form",
        "button",
        "select",
        "iframe",
        "svg",
        "canvas",
        "menu",
        "dialog",
    }
)
# class or id values that name boilerplate (matched as a word part: "cookie-banner", "share-buttons", "mainMenu").
BOILERPLATE_ATTR = re.compile(
    r"cookie|consent|gdpr|banner|menu|navbar|breadcrumb|share|social|sidebar|footer|header|advert|promo|popup|"
    r"modal|newsletter|subscribe|related|comment|widget",
    re.IGNORECASE,
)
# Elements that start a new block of text: a paragraph break before and after.
BLOCK_TAGS = frozenset(
    {
        "p",
        "div",
        "section",
        "article",
        "main",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "ul",
        "ol",
        "li",
        "dl",
        "dt",
        "dd",
        "table",
        "tr",
        "blockquote",
        "pre",
        "figure",
        "figcaption",
        "hr",
        "address",
        "body",
        "html",
    }
)
# Elements without an end tag (never pushed on the open-element stack).
VOID_TAGS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}
)

_SPACES = re.compile(r"[ \t\r\f\v]+")


class _Extractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # open elements: (tag, whether skipping starts here)
        self.skipping = 0  # how many open elements are skipped ones (text is kept only at 0)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID_TAGS:
            if not self.skipping:
                self.parts.append("\n" if tag == "br" else "\n\n" if tag == "hr" else " ")
            return
        names = " ".join(v for k, v in attrs if k in ("class", "id") and v)
        skip = tag in SKIP_TAGS or bool(names and BOILERPLATE_ATTR.search(names))
        if tag in ("p", "li") and self.stack and self.stack[-1][0] == tag:  # an unclosed <p> or <li>: close it
            self.handle_endtag(tag)
        self.stack.append((tag, skip))
        self.skipping += skip
        if tag in BLOCK_TAGS and not self.skipping:
            self.parts.append("\n\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID_TAGS:
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_TAGS or all(t != tag for t, _ in self.stack):
            return  # a stray end tag: ignore it, as browsers do
        while self.stack:  # close everything opened inside the element (unclosed tags in real HTML)
            t, skip = self.stack.pop()
            self.skipping -= skip
            if t == tag:
                break
        if tag in BLOCK_TAGS and not self.skipping:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(_SPACES.sub(" ", data.replace("\n", " ")))


def html_to_text(html: str) -> str:
    """The page's main text: boilerplate elements dropped, blocks as paragraphs (blank line), ``<br>`` as a newline.

    ``'<p>One<br>two</p><div class="share">Tweet</div><p>Three</p>'`` -> ``'One\\ntwo\\n\\nThree'``
    """
    if not isinstance(html, str):
        raise ValueError(f"html_to_text takes the page as a str, got {type(html).__name__}")
    parser = _Extractor()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [_SPACES.sub(" ", ln).strip() for ln in block.split("\n")]
        lines = [ln for ln in lines if ln]
        if lines:
            paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


class HtmlExtract(Stage):
    """Pages that arrive as HTML (``metadata["format"] == "html"``) get their main text; other documents pass.

    A page with no main text left is dropped (reason ``html:empty``).
    """

    name = "html"

    def apply(self, doc: Document) -> Decision:
        if doc.metadata.get("format") != "html":
            return doc, None
        text = html_to_text(doc.text)
        out = Document(doc.id, text, {**doc.metadata, "format": "text"})
        return out, (None if text.strip() else f"{self.name}:empty")


def word_scores(predicted: str, reference: str) -> tuple[float, float, float]:
    """Bag-of-words (precision, recall, F1) of an extraction against the true text; see ``word_f1``."""
    p, r = Counter(words(predicted)), Counter(words(reference))
    if not p and not r:
        return 1.0, 1.0, 1.0
    overlap = sum((p & r).values())
    if overlap == 0:
        return (0.0 if p else 1.0), (0.0 if r else 1.0), 0.0
    precision, recall = overlap / sum(p.values()), overlap / sum(r.values())
    return precision, recall, 2 * precision * recall / (precision + recall)


def word_f1(predicted: str, reference: str) -> float:
    """Bag-of-words F1 of an extraction against the true text (words as ``text.words``; 1.0 when both are empty).

    The measure extraction benchmarks use (e.g. the ScrapingHub article
    extraction benchmark): it forgives changed whitespace and order, and
    punishes both lost main text (recall) and kept boilerplate (precision).
    """
    return word_scores(predicted, reference)[2]


def extraction_agreement(pages: list[tuple[str, str]], favor_recall: bool = False) -> dict:
    """Ours and trafilatura's extraction of each ``(html, main_text)`` page, scored against the main text.

    Returns, averaged over the pages, each extractor's word precision (how much
    of its output is main text), recall (how much of the main text it kept) and
    F1 against the truth, the F1 of the two against each other, the share of
    pages each extracted exactly (the same words as the truth), and the seconds
    each took. ``favor_recall`` is trafilatura's switch for keeping more text
    when in doubt (its default favours neither).
    """
    import trafilatura  # imported here: only this measurement needs it

    if not pages:
        raise ValueError("extraction_agreement needs at least one (html, main_text) page")
    sums = Counter()
    for html, main in pages:
        t0 = time.perf_counter()
        ours = html_to_text(html)
        t1 = time.perf_counter()
        traf = trafilatura.extract(html, include_comments=False, favor_recall=favor_recall) or ""
        t2 = time.perf_counter()
        sums["ours_seconds"] += t1 - t0
        sums["trafilatura_seconds"] += t2 - t1
        truth = words(main)
        for name, out in (("ours", ours), ("trafilatura", traf)):
            p, r, f1 = word_scores(out, main)
            sums[f"{name}_precision"] += p
            sums[f"{name}_recall"] += r
            sums[f"{name}_f1"] += f1
            sums[f"{name}_exact"] += words(out) == truth
        sums["ours_vs_trafilatura_f1"] += word_f1(ours, traf)
    n = len(pages)
    result: dict = {"pages": n}
    for name in ("ours", "trafilatura"):
        for what in ("f1", "precision", "recall", "exact"):
            result[f"{name}_{what}"] = sums[f"{name}_{what}"] / n
    result["ours_vs_trafilatura_f1"] = sums["ours_vs_trafilatura_f1"] / n
    result["ours_seconds"] = sums["ours_seconds"]
    result["trafilatura_seconds"] = sums["trafilatura_seconds"]
    return result
