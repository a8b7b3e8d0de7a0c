"""A "dirty web" corpus with ground truth: the book's clean text, plus every problem a crawl has, each labelled.

No web crawl is reachable from the book, and a real crawl has no labels, so
nobody could say what a filter *should* have removed. This module builds one
whose answers are known. How it is made (what the chapter says):

1. **Clean pages** come from the book's text: Tiny Shakespeare, Pride and
   Prejudice (Gutenberg body), ``corpus.en`` and the instruction data. A page
   asks for a length (log-uniform in ``min_words..max_words``, a few longer)
   and a source (in proportion to its size). While a source lasts, a page is a
   contiguous excerpt: paragraphs in their original order, from blocks of the
   source visited in a seeded random order, each paragraph used once. The
   supply is about 2.4 MB (roughly 450 K words), enough for about 1,500 pages
   of 300 words; beyond that a page is *recombined*: sentences drawn from a
   shuffled deck of the source's sentences (each used once per pass over the
   deck; sentences longer than 25 words cut at clause ends) are grouped two
   to six to a paragraph. Two recombined pages share a sentence now and then
   but almost never a run of them, so unrelated clean pages have a low 5-gram
   Jaccard similarity: with seed 0, the most similar pair of clean pages has
   0.18 among 10 K documents and 0.23 among 100 K (no pair reaches 0.3).
   A line that repeats one already written anywhere in the corpus (a
   Shakespeare "My lord?", an instruction repeated in the data) is merged
   into the next line, so no two clean pages share a line and line-level
   deduplication has nothing to remove from them.
2. **Planted problems** are labelled in ``metadata["planted"]`` (names in
   ``PROBLEMS``). A page's *kind* is drawn first: clean text, or an exact
   duplicate, a near duplicate, spam, gibberish, a short page, foreign text,
   lorem ipsum. A page with a clean body may then get, independently, PII,
   offensive lines, runs of repeated characters, boilerplate (the navigation,
   cookie banner and footer of one of ten sites, which take turns so that
   each site's lines recur on many pages; or Project Gutenberg's real header
   and license), or arrive as an HTML page. Duplicates come after their
   original, name it in ``dup_of``, and an exact duplicate inherits its
   original's labels. A near duplicate edits words and sentences of a clean
   original until the true 5-gram Jaccard similarity (``text.word_shingles``)
   reaches a target drawn uniformly from ``near_dup_min_jaccard..1`` (the
   word salad of a spun or scraped copy); the similarity it reached (at
   10 K documents, 95 % within 0.03 of the target) is recorded exactly in
   ``jaccard``.

Every document's metadata: ``source``, ``origin`` (excerpt, recombined or
generated), ``planted``, ``dup_of``, ``jaccard``, ``lang``, ``pii`` (the
planted strings), ``boilerplate`` (the planted lines), ``format`` ("text" or
"html"). Some also carry ``main_text`` and ``html_boilerplate`` (an HTML
page's true main text and its boilerplate strings), ``offensive`` (the planted
lines), ``boilerplate_kind`` ("site" or "gutenberg"), ``variant`` (how an
exact duplicate differs: "identical", "whitespace", "case") and
``jaccard_target`` (the similarity a near duplicate aimed at).

The foreign pages recombine a small public-domain sample (``foreign``), so they
are near duplicates of each other as well; a pipeline removes them with the
language filter before deduplication.

    >>> docs = make_corpus(CorpusConfig(n_docs=200, seed=0))   # doctest: +SKIP
    >>> summary(docs)["clean"]                                  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import html as html_lib
import itertools
import json
import math
import random
import re
import string
from dataclasses import dataclass, fields
from pathlib import Path

from llmbook import data
from llmbook.pipeline import foreign
from llmbook.pipeline.document import Document, write_jsonl
from llmbook.pipeline.text import jaccard, normalize, word_shingles

PROBLEMS: tuple[str, ...] = (
    "exact_dup",
    "near_dup",
    "boilerplate",
    "spam",
    "gibberish",
    "repeated_chars",
    "short",
    "foreign",
    "offensive",
    "pii",
    "lorem",
    "html",
)

# A page's kind is one of these (shares of the corpus in CorpusConfig); the rest are clean text.
KINDS: tuple[str, ...] = ("exact_dup", "near_dup", "spam", "gibberish", "short", "foreign", "lorem")
# Problems added on top of a clean body, independently (shares of the corpus in CorpusConfig).
ADDITIVE: tuple[str, ...] = ("pii", "offensive", "repeated_chars", "boilerplate", "html")


@dataclass
class CorpusConfig:
    """How large the corpus is and how often each problem is planted (shares of all documents).

    The defaults leave a bit more than half of the pages clean, the other half
    spread over the problems so that each has a few hundred examples in the
    chapter's 10 K documents (enough for a recall with a few points of error).
    """

    n_docs: int = 10_000
    seed: int = 0
    # kinds of page (exclusive)
    exact_dup: float = 0.05
    near_dup: float = 0.08
    spam: float = 0.03
    gibberish: float = 0.02
    short: float = 0.03
    foreign: float = 0.04
    lorem: float = 0.01
    # problems added to a clean body (independent; html and boilerplate exclude each other)
    pii: float = 0.05
    offensive: float = 0.03
    repeated_chars: float = 0.02
    boilerplate: float = 0.08
    html: float = 0.05
    gutenberg: float = 0.3  # share of Pride and Prejudice pages with boilerplate that get Gutenberg's own
    near_dup_min_jaccard: float = 0.3  # near duplicates' true Jaccard is drawn from [this, 1)
    min_words: int = 80  # clean page lengths: log-uniform in [min_words, max_words] ...
    max_words: int = 600
    long_share: float = 0.05  # ... and this share log-uniform in [max_words, long_max_words]
    long_max_words: int = 2000

    def __post_init__(self) -> None:
        if not isinstance(self.n_docs, int) or self.n_docs < 1:
            raise ValueError(f"n_docs must be a positive integer, got {self.n_docs!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"CorpusConfig.{f.name} is a whole number, got {value!r}")
            if f.type == "float" and (not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0):
                raise ValueError(f"CorpusConfig.{f.name} is a share in [0, 1], got {value!r}")
        if sum(getattr(self, k) for k in KINDS) >= 1.0:
            raise ValueError("the shares of exact_dup, near_dup, spam, gibberish, short, foreign, lorem sum to >= 1")
        if not 1 <= self.min_words <= self.max_words <= self.long_max_words:
            raise ValueError("need 1 <= min_words <= max_words <= long_max_words")


# ---------------------------------------------------------------------------------------------------------------
# The clean supply: paragraphs (lists of lines) for excerpts, and sentences for recombination


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_BLOCK_WORDS = 1500  # excerpts are cut from blocks this long, visited in a random order


_CLAUSE_END = re.compile(r"(?<=[;:,])\s+")
_MAX_SENTENCE_WORDS = 25


def _sentences(text: str) -> list[str]:
    """Sentences of at least 3 words; a longer one than 25 words is cut at clause ends into pieces of <= 25.

    Shakespeare's and Austen's sentences run to a hundred words; shared by two
    short recombined pages, one such sentence would make them near duplicates.
    """
    out = []
    for s in (p.strip() for p in _SENTENCE_END.split(text)):
        if len(s.split()) <= _MAX_SENTENCE_WORDS:
            out.append(s)
            continue
        piece: list[str] = []
        for clause in _CLAUSE_END.split(s):
            w = clause.split()
            if piece and len(piece) + len(w) > _MAX_SENTENCE_WORDS:
                out.append(" ".join(piece))
                piece = []
            piece.extend(w)
            while len(piece) > _MAX_SENTENCE_WORDS:
                out.append(" ".join(piece[:_MAX_SENTENCE_WORDS]))
                piece = piece[_MAX_SENTENCE_WORDS:]
        if piece:
            out.append(" ".join(piece))
    return [s for s in out if len(s.split()) >= 3]


def _drop_repeats(lines: list[str], max_seen: float = 0.5) -> list[str]:
    """Drop a line when more than ``max_seen`` of its 5-gram shingles occurred in earlier lines.

    ``corpus.en`` was crawled from the web and already holds near copies (the
    variants of a Creative Commons notice); they would be unlabelled near
    duplicates in the corpus.
    """
    seen: set[str] = set()
    kept = []
    for line in lines:
        sh = word_shingles(line)
        if sh and len(sh & seen) > max_seen * len(sh):
            continue
        seen |= sh
        kept.append(line)
    return kept


@dataclass
class _Line:
    """A line of clean text with its normalized form (the key that says two lines are the same) and word count."""

    text: str
    key: str
    n_words: int

    @classmethod
    def of(cls, text: str) -> _Line:
        return cls(text, normalize(text), len(text.split()))

    def __add__(self, other: _Line) -> _Line:
        # normalize works word by word, so the key of two joined lines is the two keys joined
        return _Line(f"{self.text} {other.text}", f"{self.key} {other.key}".strip(), self.n_words + other.n_words)


@dataclass
class _Source:
    name: str
    paragraphs: list[list[_Line]]
    sentences: list[_Line]
    n_words: int = 0

    def __post_init__(self) -> None:
        self.n_words = sum(ln.n_words for p in self.paragraphs for ln in p)


@functools.lru_cache(maxsize=1)
def _sources() -> tuple[_Source, ...]:
    """The four sources as paragraphs of lines and as sentences (read and normalized once per process)."""
    sources = []
    # Tiny Shakespeare: a speech is a paragraph, the speaker's name joins its first line.
    paragraphs, sents = [], []
    for block in data.path("tinyshakespeare").read_text(encoding="utf-8").split("\n\n"):
        lines = [ln.strip() for ln in block.strip().split("\n") if ln.strip()]
        if len(lines) < 2 or not lines[0].endswith(":"):
            continue
        speaker, verse = lines[0], lines[1:]
        paragraphs.append([f"{speaker} {verse[0]}", *verse[1:]])
        sents.extend(_sentences(" ".join(verse)))
    sources.append(("tinyshakespeare", paragraphs, sents))
    # Pride and Prejudice: a paragraph is one line (unwrapped); chapter headings and the title are dropped.
    paragraphs, sents = [], []
    for block in re.split(r"\n\s*\n", data.read_text("pride_and_prejudice")):
        line = " ".join(block.split())
        if len(line.split()) < 4 or re.fullmatch(r"(Chapter|CHAPTER) \w+\.?", line):
            continue
        paragraphs.append([line])
        sents.extend(_sentences(line))
    sources.append(("pride_and_prejudice", paragraphs, sents))
    # corpus.en: one sentence a line, from many unrelated pages; three consecutive lines make a paragraph.
    lines = [ln.strip() for ln in data.path("corpus.en").read_text(encoding="utf-8").splitlines() if ln.strip()]
    lines = _drop_repeats(lines)
    paragraphs = [[" ".join(lines[i : i + 3])] for i in range(0, len(lines), 3)]
    sources.append(("corpus.en", paragraphs, [s for ln in lines for s in _sentences(ln)]))
    # Instruction data: a record is a paragraph of instruction, input and response lines.
    records = json.loads(data.path("instruction-data").read_text(encoding="utf-8"))
    paragraphs, sents = [], []
    for r in records:
        lines = [" ".join(str(r.get(k, "")).split()) for k in ("instruction", "input", "output")]
        lines = [ln for ln in lines if ln]
        paragraphs.append(lines)
        for ln in lines:
            sents.extend(_sentences(ln))
    sources.append(("instruction-data", paragraphs, sents))
    return tuple(
        _Source(name, [[_Line.of(ln) for ln in p] for p in paras], [_Line.of(s) for s in sents])
        for name, paras, sents in sources
    )


class _Supply:
    """Hands out clean bodies: excerpts while a source lasts, recombined sentences after."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.sources = _sources()
        self.weights = [s.n_words for s in self.sources]
        self.order: list[list[list[_Line]]] = []  # per source: paragraphs in block-shuffled order
        for s in self.sources:
            blocks, block, n = [], [], 0
            for p in s.paragraphs:
                block.append(p)
                n += sum(ln.n_words for ln in p)
                if n >= _BLOCK_WORDS:
                    blocks.append(block)
                    block, n = [], 0
            if block:
                blocks.append(block)
            rng.shuffle(blocks)
            self.order.append([p for b in blocks for p in b])
        self.pos = [0] * len(self.sources)
        self.decks: list[list[_Line]] = [[] for _ in self.sources]
        self.seen: set[int] = set()  # hashes of the normalized form of every clean line written so far
        self.vocab = _vocab()

    def length(self, cfg: CorpusConfig) -> int:
        if self.rng.random() < cfg.long_share:
            lo, hi = cfg.max_words, cfg.long_max_words
        else:
            lo, hi = cfg.min_words, cfg.max_words
        return int(math.exp(self.rng.uniform(math.log(lo), math.log(hi))))

    def source(self) -> int:
        return self.rng.choices(range(len(self.sources)), weights=self.weights)[0]

    def sentence(self, k: int) -> _Line:
        """The next sentence of source k's deck (reshuffled when used up)."""
        if not self.decks[k]:
            deck = list(self.sources[k].sentences)
            self.rng.shuffle(deck)
            self.decks[k] = deck
        return self.decks[k].pop()

    def body(self, n_words: int) -> tuple[list[list[str]], str, str]:
        """A clean body of about ``n_words`` words: (paragraphs of lines, source name, origin)."""
        k = self.source()
        paragraphs, n = [], 0
        origin = "excerpt" if self.pos[k] < len(self.order[k]) else "recombined"
        while n < n_words:
            if self.pos[k] < len(self.order[k]):
                para = self.order[k][self.pos[k]]
                self.pos[k] += 1
            else:
                line = self.sentence(k)
                for _ in range(self.rng.randint(1, 5)):
                    line = line + self.sentence(k)
                para = [line]
            paragraphs.append(para)
            n += sum(ln.n_words for ln in para)
        return self._unique(paragraphs), self.sources[k].name, origin

    def _unique(self, paragraphs: list[list[_Line]]) -> list[list[str]]:
        """Merge every line already written somewhere (or empty once normalized) into the line after it."""
        out: list[list[_Line]] = []
        carry = None
        for para in paragraphs:
            kept: list[_Line] = []
            for line in para:
                cand = line if carry is None else carry + line
                if not cand.key or hash(cand.key) in self.seen:
                    carry = cand
                    continue
                self.seen.add(hash(cand.key))
                kept.append(cand)
                carry = None
            if kept:
                out.append(kept)
        if carry is not None and out:
            self.seen.discard(hash(out[-1][-1].key))
            out[-1][-1] = out[-1][-1] + carry
            self.seen.add(hash(out[-1][-1].key))
        return [[ln.text for ln in p] for p in out]


@functools.lru_cache(maxsize=1)
def _vocab() -> tuple[str, ...]:
    """Words a near duplicate's edits insert: the alphabetic words of the sources, in a fixed order."""
    return tuple(sorted({w for s in _sources() for ln in s.sentences[:4000] for w in ln.text.split() if w.isalpha()}))


def _join(paragraphs: list[list[str]]) -> str:
    return "\n\n".join("\n".join(p) for p in paragraphs)


# ---------------------------------------------------------------------------------------------------------------
# Problem generators


_SITES = [
    ("The Daily Ledger", ["Home", "News", "Politics", "Business", "Sports", "Weather", "Contact"]),
    ("GardenTalk", ["Home", "Forums", "Plants", "Tools", "Shop", "Login"]),
    ("TechByte Reviews", ["Home", "Reviews", "Phones", "Laptops", "Deals", "Newsletter"]),
    ("Riverside Community College", ["Home", "Admissions", "Programs", "Library", "Campus Life", "Apply"]),
    ("Sunny Recipes", ["Home", "Recipes", "Baking", "Dinner", "Desserts", "About Us"]),
    ("Open Book Club", ["Home", "Books", "Authors", "Reviews", "Events", "Join"]),
    ("Travel Notes", ["Home", "Destinations", "Europe", "Asia", "Tips", "Contact"]),
    ("Local Classifieds", ["Home", "For Sale", "Jobs", "Housing", "Services", "Post an Ad"]),
    ("HealthWise", ["Home", "Conditions", "Nutrition", "Fitness", "Ask a Doctor"]),
    ("The Drama Archive", ["Home", "Plays", "Playwrights", "Quotes", "Search"]),
]
_COOKIE = [
    "We use cookies to improve your experience. By continuing to browse this site you agree to our use of cookies.",
    "This website uses cookies to ensure you get the best experience on our website. Learn more",
    "We value your privacy. We and our partners use cookies to personalise content and ads. Accept all | Manage",
]
_SHARE = ["Share on Facebook", "Share on Twitter", "Share via Email", "Pin it", "Tweet", "Print this page"]
_FOOTER = [
    "Privacy Policy | Terms of Use | Cookie Settings | Contact Us",
    "Subscribe to our newsletter for the latest updates.",
    "Powered by WordPress",
    "Back to top",
    "Click here to read more articles like this one.",
]


def _site_lines(rng: random.Random, site: tuple[str, list[str]]) -> tuple[list[str], list[str]]:
    """A site's header (navigation, cookie banner) and footer (share, links, copyright) lines."""
    name, menu = site
    year = 2015 + _SITES.index(site) % 9
    header = [" | ".join(menu), "Skip to main content", _COOKIE[_SITES.index(site) % len(_COOKIE)]]
    footer = [
        " ".join(_SHARE[: 2 + _SITES.index(site) % 4]),
        _FOOTER[_SITES.index(site) % len(_FOOTER)],
        f"© {year} {name}. All rights reserved.",
    ]
    # every page shows the menu, the cookie banner and the copyright; the other lines nine pages in ten
    header = [ln for i, ln in enumerate(header) if i != 1 or rng.random() < 0.9]
    footer = [ln for i, ln in enumerate(footer) if i == 2 or rng.random() < 0.9]
    return header, footer


@functools.lru_cache(maxsize=1)
def _gutenberg() -> tuple[str, str]:
    """Project Gutenberg's real header and license footer from the raw Pride and Prejudice file."""
    lines = data.path("pride_and_prejudice").read_text(encoding="utf-8").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("*** START OF"))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("End of the Project Gutenberg"))
    return "\n".join(lines[: start + 1]).strip(), "\n".join(lines[end:]).strip()


_PRODUCTS = [
    "watches",
    "sneakers",
    "phone cases",
    "sunglasses",
    "handbags",
    "car insurance",
    "payday loans",
    "hotel deals",
    "weight loss pills",
    "web hosting",
    "concert tickets",
    "replica jerseys",
    "vitamins",
    "laptops",
    "garden furniture",
    "essay writing",
    "followers",
    "crypto signals",
]
_CITIES = ["London", "New York", "Chicago", "Dallas", "Toronto", "Sydney", "Miami", "Boston", "Denver", "Leeds"]


def _spam(rng: random.Random) -> list[list[str]]:
    p = rng.choice(_PRODUCTS)
    q = rng.choice(_PRODUCTS)
    lines = []
    for _ in range(rng.randint(6, 16)):
        city = rng.choice(_CITIES)
        form = rng.randrange(5)
        if form == 0:
            lines.append(f"Buy cheap {p} online! Best price {p}, discount {p}, cheap {p} sale, free shipping!!!")
        elif form == 1:
            kws = [
                f"{a} {p}"
                for a in rng.sample(
                    [
                        "cheap",
                        "best",
                        "discount",
                        "buy",
                        "top",
                        "sale",
                        "online",
                        "free",
                        "new",
                        "original",
                        "wholesale",
                    ],
                    6,
                )
            ]
            lines.append("Tags: " + ", ".join(kws + [f"{p} {city}", f"cheap {q}"]))
        elif form == 2:
            lines.append(
                f"CLICK HERE for the best {p} deals in {city}! Save {rng.randint(20, 90)}% today only, "
                f"order now, limited offer, best price guaranteed."
            )
        elif form == 3:
            lines.append(" ".join([f"cheap {p} best price"] * rng.randint(3, 8)))
        else:
            lines.append(
                f"{p} {p} {p} {city} {p} buy {p} now {p} cheap {q} cheap {q} best {q} #{rng.randint(100, 99999)}"
            )
    return [lines]


def _gibberish(rng: random.Random) -> list[list[str]]:
    """Letter soup, symbol soup or base64-like blobs: text with no words in it."""
    alphabets = [
        string.ascii_lowercase,
        "#$%&*@^~|<>{}[]=+/\\_" + string.digits + "xyzq",
        string.ascii_letters + string.digits + "+/=",
    ]
    lines = []
    for _ in range(rng.randint(3, 12)):
        style = rng.randrange(3)
        lengths = [rng.randint(2, 12) * (3 if style == 2 else 1) for _ in range(rng.randint(5, 25))]
        chars = rng.choices(alphabets[style], k=sum(lengths))
        starts = list(itertools.accumulate(lengths, initial=0))
        lines.append(" ".join("".join(chars[a:b]) for a, b in itertools.pairwise(starts)))
    return [lines]


_LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea "
    "commodo consequat duis aute irure in reprehenderit voluptate velit esse cillum fugiat nulla pariatur "
    "excepteur sint occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim id est "
    "laborum"
).split()


def _lorem_paragraph(rng: random.Random, first: bool) -> str:
    sents = ["Lorem ipsum dolor sit amet, consectetur adipiscing elit."] if first else []
    for _ in range(rng.randint(3, 7)):
        w = [rng.choice(_LOREM) for _ in range(rng.randint(6, 14))]
        sents.append(" ".join(w).capitalize() + ".")
    return " ".join(sents)


_ERRORS = [
    "404 Not Found. The page {p} does not exist.",
    "Loading... Please enable JavaScript to view {p}.",
    "Access denied. You do not have permission to view {p}.",
    "This page {p} has moved. Redirecting...",
    "Coming soon! {p} is under construction.",
]


def _short(rng: random.Random, supply: _Supply) -> list[list[str]]:
    if rng.random() < 0.3:
        path = f"/{rng.choice(['blog', 'shop', 'news', 'item', 'user'])}/{rng.randint(1, 10**7)}"
        return [[rng.choice(_ERRORS).format(p=path)]]
    k = supply.source()
    words: list[str] = []
    target = rng.randint(5, 45)
    while len(words) < target:
        words.extend(supply.sentence(k).text.split())
    return [[" ".join(words[:target])]]


def _foreign(rng: random.Random) -> tuple[list[list[str]], str]:
    lang = rng.choice(foreign.LANGUAGES)
    pool = foreign.sentences(lang)
    chosen = rng.sample(pool, min(len(pool), rng.randint(5, 14)))
    joiner = "" if lang == "zh" else " "
    paragraphs, i = [], 0
    while i < len(chosen):
        k = rng.randint(1, 4)
        paragraphs.append([joiner.join(chosen[i : i + k])])
        i += k
    return paragraphs, lang


_INSULTS = [
    "a complete idiot",
    "an absolute moron",
    "a clueless jerk",
    "full of crap",
    "a pathetic loser",
    "dumb as a rock",
    "a lying sack of crap",
    "a stupid ass",
    "an arrogant twit",
    "a total dumbass",
]
_CURSES = [
    "",
    " Shut up.",
    " What a load of crap.",
    " Damn it.",
    " This is bullshit.",
    " Get lost, idiot.",
    " Holy shit.",
    " Go to hell.",
]
_TARGETS = ["You are", "The author is", "Whoever wrote this is", "Your boss is", "This guy is", "Honestly, you are"]


def _offensive_line(rng: random.Random) -> str:
    user = f"{rng.choice(['troll', 'anon', 'guest', 'user', 'xx_gamer'])}{rng.randint(1, 99999)}"
    return f"Comment by {user}: {rng.choice(_TARGETS)} {rng.choice(_INSULTS)}.{rng.choice(_CURSES)}"


_FIRST = ["john", "mary", "alex", "sam", "lee", "anna", "raj", "chen", "fatima", "olga", "pierre", "maria"]
_LAST = ["smith", "jones", "garcia", "miller", "nguyen", "patel", "kim", "brown", "rossi", "novak"]
_DOMAINS = ["example.com", "mail.com", "gmail.com", "yahoo.co.uk", "outlook.com", "web.de", "company.org"]


def _pii(rng: random.Random) -> tuple[str, list[str]]:
    """A line with one to three planted PII strings (e-mail, phone, IPv4), and the strings."""
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    sep = rng.choice([".", "_", ""])
    email = f"{first}{sep}{last}{rng.randint(1, 999)}@{rng.choice(_DOMAINS)}"
    a, b, c = rng.randint(200, 989), rng.randint(200, 999), rng.randint(0, 9999)
    phone = rng.choice(
        [
            f"({a}) {b}-{c:04d}",
            f"{a}-{b}-{c:04d}",
            f"+1 {a} {b} {c:04d}",
            f"+44 20 {b:03d}{rng.randint(0, 9)} {c:04d}",
            f"{a}.{b}.{c:04d}",
        ]
    )
    ip = ".".join(str(rng.randint(1, 254)) for _ in range(4))
    form = rng.randrange(5)
    if form == 0:
        return f"For questions, email {email} or call {phone}.", [email, phone]
    if form == 1:
        return f"Contact {first.capitalize()} {last.capitalize()} at {email}.", [email]
    if form == 2:
        return f"Call us today at {phone} (Mon-Fri, 9am-5pm).", [phone]
    if form == 3:
        hour, minute = rng.randint(1, 12), rng.randint(0, 59)
        return f"Posted by {first}{rng.randint(1, 99)} from {ip} at {hour}:{minute:02d} pm", [ip]
    return f"Reach me at {email}, phone {phone}, server {ip}.", [email, phone, ip]


def _repeated_chars(rng: random.Random) -> str:
    form = rng.randrange(3)
    if form == 0:
        return rng.choice("!?.*=-~#") * rng.randint(15, 120)
    if form == 1:
        word = rng.choice(["so", "no", "wow", "yes", "cool", "ha", "go"])
        return f"{word[:-1]}{word[-1] * rng.randint(8, 40)} {rng.choice(['good', 'bad', 'funny', 'true'])}" + (
            "!" * rng.randint(6, 30)
        )
    return " ".join(rng.choice(["a", "z", "x", "lol", "ha"]) * rng.randint(6, 30) for _ in range(rng.randint(1, 4)))


def _insert_lines(rng: random.Random, paragraphs: list[list[str]], new: list[str]) -> None:
    """Insert each new line as its own line at a random place among the paragraphs."""
    for line in new:
        p = paragraphs[rng.randrange(len(paragraphs))]
        p.insert(rng.randint(0, len(p)), line)


# ---------------------------------------------------------------------------------------------------------------
# Duplicates


def _exact_copy(rng: random.Random, orig: Document) -> tuple[str, dict]:
    """A copy equal after ``text.normalize``: byte-identical, or with whitespace or letter case changed.

    Whitespace: lines indented or with trailing spaces, extra blank lines. Case:
    the whole page lower- or upper-cased (the planted strings in the metadata
    follow, so they are still found verbatim).
    """
    meta = json.loads(json.dumps(orig.metadata))
    variant = rng.choice(["identical", "identical", "whitespace", "case"])
    text = orig.text
    if variant == "whitespace":
        lines = [
            (" " * rng.randint(1, 4) if rng.random() < 0.3 else "") + ln + (" " if rng.random() < 0.3 else "")
            for ln in text.split("\n")
        ]
        text = "\n".join(lines).replace("\n\n", "\n\n\n") + "\n"
    elif variant == "case":
        change = rng.choice([str.lower, str.upper])
        text = change(text)
        for key in ("pii", "boilerplate", "offensive", "main_text"):
            if isinstance(meta.get(key), list):
                meta[key] = [change(x) for x in meta[key]]
    meta.update(planted=["exact_dup", *orig.metadata["planted"]], dup_of=orig.id, variant=variant)
    return text, meta


_WORD_RUN = re.compile(r"\w+")


def _near_copy(rng: random.Random, text: str, target: float, supply: _Supply) -> tuple[str, float]:
    """Edit words and sentences of ``text`` until its 5-gram Jaccard to the original is closest to ``target``.

    Word positions are edited in a random order, each once: replace the word
    (55 %), delete it (20 %), insert a word after it (18 %), delete a run of 4
    to 12 words from it (4 %), insert a sentence after it (3 %). How many edits
    (k) is found by searching k on a fast word-level estimate of the similarity,
    which falls as edits are added; the similarity returned is the exact one,
    ``jaccard(word_shingles(original), word_shingles(copy))``.
    """
    toks = [ln.split(" ") for ln in text.split("\n")]
    pos = [(i, j) for i, t in enumerate(toks) for j, w in enumerate(t) if w]
    n = len(pos)
    line_of = [i for i, _ in pos]
    orig_text = [toks[i][j] for i, j in pos]
    orig_words = [_WORD_RUN.findall(w.lower()) for w in orig_text]
    order = rng.sample(range(n), n)
    ops: list[tuple[int, str, int, list[str]]] = []  # (position, its new text, positions deleted, its new words)

    def add_ops(m: int) -> None:
        """Draw the edits of the next ``m`` positions in the order."""
        vocab = supply.vocab
        for p in order[len(ops) : len(ops) + m]:
            r = rng.random()
            if r < 0.55:
                new = rng.choice(vocab)
                while new.lower() == orig_text[p].lower():
                    new = rng.choice(vocab)
                ops.append((p, new, 0, [new.lower()]))
            elif r < 0.75:
                ops.append((p, "", 1, []))
            elif r < 0.93:
                word = rng.choice(vocab)
                ops.append((p, f"{orig_text[p]} {word}", 0, [*orig_words[p], word.lower()]))
            elif r < 0.97:
                ops.append((p, "", rng.randint(4, 12), []))
            else:
                sent = supply.sentence(supply.source()).text
                ops.append((p, f"{orig_text[p]} {sent}", 0, [*orig_words[p], *_WORD_RUN.findall(sent.lower())]))

    def edited(k: int) -> tuple[list[str], list[list[str]]]:
        out, out_words = list(orig_text), list(orig_words)
        for p, new, span, new_words in ops[:k]:
            if span:
                for q in range(p, min(p + span, n)):
                    if line_of[q] == line_of[p]:
                        out[q], out_words[q] = "", []
            else:
                out[p], out_words[p] = new, new_words
        return out, out_words

    orig_sh = _shingles([w for ws in orig_words for w in ws])
    estimates = {0: 1.0}

    def estimate(k: int) -> float:
        if k not in estimates:
            if k > len(ops):
                add_ops(k - len(ops))
            seq = list(itertools.chain.from_iterable(edited(k)[1]))
            estimates[k] = jaccard(orig_sh, _shingles(seq))
        return estimates[k]

    def linear(j: float) -> float:
        # if each edit changed one word at random, a fraction f of edited words leaves a share (1-f)^5 of the
        # 5-gram shingles, and Jaccard j = (1-q)/(1+q) with q = 1-(1-f)^5: f is about linear in k
        q = (1 - j) / (1 + j)
        return 1 - (1 - q) ** 0.2

    # find lo < hi = lo + 1 with estimate(lo) > target >= estimate(hi), by interpolation on the linear scale
    lo, hi = 0, max(1, min(n, int(n * linear(target) * 2.5) + 8))
    while estimate(hi) > target and hi < n:
        lo, hi = hi, min(n, hi * 2)
    while hi - lo > 1:
        x_lo, x_hi, x_t = linear(estimate(lo)), linear(estimate(hi)), linear(target)
        guess = lo + round((hi - lo) * (x_t - x_lo) / max(x_hi - x_lo, 1e-9))
        mid = min(hi - 1, max(lo + 1, guess))
        if estimate(mid) > target:
            lo = mid
        else:
            hi = mid
    original = word_shingles(text)
    best: tuple[str, float] | None = None
    for k in sorted({max(1, lo), hi}):
        if k > len(ops):
            add_ops(k - len(ops))
        out = edited(k)[0]
        lines: list[list[str]] = [[] for _ in toks]
        for p, t in enumerate(out):
            if t:
                lines[line_of[p]].append(t)
        keep = [i for i, t in enumerate(toks) if lines[i] or not any(t)]  # empty lines (paragraph breaks) stay
        cand = "\n".join(" ".join(lines[i]) for i in keep)
        j = jaccard(original, word_shingles(cand))
        if j < 1.0 and (best is None or abs(j - target) < abs(best[1] - target)):
            best = (cand, j)
    if best is None:  # a text so short that no edit changed its shingles: keep the original's text edited fully
        raise ValueError("a near duplicate needs an original of at least one word")
    return best


def _shingles(seq: list[str], n: int = 5) -> set[tuple[str, ...]]:
    if len(seq) < n:
        return {tuple(seq)} if seq else set()
    return set(zip(*(seq[i:] for i in range(n)), strict=False))


# ---------------------------------------------------------------------------------------------------------------
# HTML pages


def _to_html(rng: random.Random, paragraphs: list[list[str]], site: tuple[str, list[str]]) -> tuple[str, list[str]]:
    """Wrap a clean body in a page with head, scripts, navigation, cookie banner, related links, share bar, footer.

    Three pages in five use semantic markup (``<nav>``, ``<footer>``,
    ``class="cookie-banner"``): boilerplate a simple extractor finds by name.
    The others are "div soup": the same boilerplate in ``<div>``s with neutral
    class names, which only smarter extractors (link density, position) remove.
    Returns the page and its boilerplate strings.
    """
    name, menu = site
    s = _SITES.index(site)
    esc = html_lib.escape
    semantic = rng.random() < 0.6
    body = []
    for p in paragraphs:
        lines = [esc(ln) for ln in p]
        if rng.random() < 0.2:  # a link inside the main text
            i = rng.randrange(len(lines))
            w = lines[i].split(" ")
            j = rng.randrange(len(w))
            w[j] = f'<a href="/wiki/{rng.randint(1, 99999)}">{w[j]}</a>'
            lines[i] = " ".join(w)
        inner = "<br>\n".join(lines)
        body.append(f"<p>{inner}</p>" if rng.random() < 0.7 else f'<div class="text">{inner}</div>')
    nav = "".join(f'<li><a href="/{esc(m.lower().replace(" ", "-"))}">{esc(m)}</a></li>' for m in menu)
    picks = [
        rng.choice(
            ["Top 10 tips for beginners", "Read this next", "Popular this week", "Editor's choice", "You may also like"]
        )
        for _ in range(3)
    ]
    related = "".join(f'<li><a href="/post/{rng.randint(1, 9999)}">{esc(t)}</a></li>' for t in picks)
    cookie = _COOKIE[s % len(_COOKIE)]
    shares = _SHARE[: 2 + s % 4]
    share = " ".join(f'<a href="#">{esc(t)}</a>' for t in shares)
    footer_line = _FOOTER[s % len(_FOOTER)]
    copyright_line = f"© {2015 + s % 9} {name}. All rights reserved."
    if semantic:
        main_open, main_close = rng.choice(
            [("<main><article>", "</article></main>"), ('<div id="content" class="post-content">', "</div>")]
        )
        parts = [
            f'<header class="site-header"><div class="logo">{esc(name)}</div>',
            f'<nav class="menu"><ul>{nav}</ul></nav></header>',
            f'<div id="cookie-banner" class="cookie-consent"><p>{esc(cookie)}</p><button>Accept</button></div>',
            main_open,
            *body,
            main_close,
            f'<aside class="sidebar"><h3>Related posts</h3><ul>{related}</ul></aside>',
            f'<div class="share-buttons">{share}</div>',
            f"<footer><p>{esc(footer_line)}</p>\n<p>{esc(copyright_line)}</p></footer>",
        ]
    else:
        parts = [
            f'<div class="top"><div class="logo">{esc(name)}</div>',
            f'<div class="links"><ul>{nav}</ul></div></div>',
            f'<div id="cc-{rng.randint(100, 999)}" class="box"><p>{esc(cookie)}</p></div>',
            '<div class="wrap"><div class="col-left">',
            *body,
            "</div>",
            f'<div class="col-right"><h3>Related posts</h3><ul>{related}</ul></div></div>',
            f'<div class="bar">{share}</div>',
            f'<div class="bottom"><p>{esc(footer_line)}</p>\n<p>{esc(copyright_line)}</p></div>',
        ]
    title = esc(" ".join(paragraphs[0][0].split()[:6]))
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>{title} - {esc(name)}</title>",
            "<style>body { font-family: Georgia, serif; } .links li { display: inline; }</style>",
            "<script>window.dataLayer = window.dataLayer || []; function gtag(){dataLayer.push(arguments);}</script>",
            "</head>",
            "<body>",
            *parts,
            f'<script src="/static/js/app.{rng.randint(1000, 9999)}.js"></script>',
            "</body>",
            "</html>",
            "",
        ]
    )
    return page, [name, " | ".join(menu), cookie, *picks, *shares, footer_line, copyright_line]


# ---------------------------------------------------------------------------------------------------------------
# The corpus


def _meta(source: str, origin: str, lang: str = "en") -> dict:
    return {
        "source": source,
        "origin": origin,
        "planted": [],
        "dup_of": None,
        "jaccard": None,
        "lang": lang,
        "pii": [],
        "boilerplate": [],
        "format": "text",
    }


def make_corpus(cfg: CorpusConfig | None = None) -> list[Document]:
    """The dirty corpus: ``cfg.n_docs`` documents, identical for the same ``cfg`` (ids ``doc0000000``...)."""
    cfg = cfg or CorpusConfig()
    rng = random.Random(cfg.seed)
    supply = _Supply(rng)
    body_share = 1.0 - sum(getattr(cfg, k) for k in KINDS)
    # additive problems are drawn per clean body so that their share of the corpus is the configured one
    add_p = {k: min(1.0, getattr(cfg, k) / body_share) for k in ADDITIVE}
    kind_weights = [getattr(cfg, k) for k in KINDS] + [body_share]
    docs: list[Document] = []
    clean_ids: list[int] = []  # clean text pages: originals of near duplicates
    body_ids: list[int] = []  # pages with a clean body in text format: originals of exact duplicates
    site_cycle: list[tuple[str, list[str]]] = []  # the sites whose boilerplate the next pages get
    width = max(7, len(str(cfg.n_docs - 1)))
    for i in range(cfg.n_docs):
        doc_id = f"doc{i:0{width}d}"
        kind = rng.choices((*KINDS, "clean"), weights=kind_weights)[0]
        if kind in ("exact_dup", "near_dup") and not clean_ids:
            kind = "clean"
        if kind == "exact_dup":
            orig = docs[rng.choice(body_ids)]
            text, meta = _exact_copy(rng, orig)
            docs.append(Document(doc_id, text, meta))
            continue
        if kind == "near_dup":
            orig = docs[rng.choice(clean_ids)]
            target = rng.uniform(cfg.near_dup_min_jaccard, 1.0)
            text, jac = _near_copy(rng, orig.text, target, supply)
            meta = _meta(orig.metadata["source"], orig.metadata["origin"])
            meta.update(planted=["near_dup"], dup_of=orig.id, jaccard=jac, jaccard_target=target)
            docs.append(Document(doc_id, text, meta))
            continue
        if kind == "spam":
            docs.append(Document(doc_id, _join(_spam(rng)), {**_meta("generated", "generated"), "planted": ["spam"]}))
            continue
        if kind == "gibberish":
            meta = {**_meta("generated", "generated"), "planted": ["gibberish"]}
            docs.append(Document(doc_id, _join(_gibberish(rng)), meta))
            continue
        if kind == "short":
            meta = {**_meta("generated", "generated"), "planted": ["short"]}
            docs.append(Document(doc_id, _join(_short(rng, supply)), meta))
            continue
        if kind == "foreign":
            paragraphs, lang = _foreign(rng)
            meta = {**_meta("udhr", "recombined", lang), "planted": ["foreign"]}
            docs.append(Document(doc_id, _join(paragraphs), meta))
            continue
        if kind == "lorem" and rng.random() < 0.5:
            paragraphs = [[_lorem_paragraph(rng, first=j == 0)] for j in range(rng.randint(2, 6))]
            docs.append(Document(doc_id, _join(paragraphs), {**_meta("generated", "generated"), "planted": ["lorem"]}))
            continue
        # a page with a clean body (a lorem page keeps a clean body with a placeholder paragraph in it)
        paragraphs, source, origin = supply.body(supply.length(cfg))
        meta = _meta(source, origin)
        planted: list[str] = []
        if kind == "lorem":
            paragraphs.insert(rng.randint(0, len(paragraphs)), [_lorem_paragraph(rng, first=True)])
            planted.append("lorem")
        if rng.random() < add_p["pii"]:
            new, strings = [], []
            for _ in range(rng.randint(1, 3)):
                line, s = _pii(rng)
                new.append(line)
                strings.extend(s)
            _insert_lines(rng, paragraphs, new)
            planted.append("pii")
            meta["pii"] = strings
        if rng.random() < add_p["offensive"]:
            lines = [_offensive_line(rng) for _ in range(rng.randint(1, 3))]
            _insert_lines(rng, paragraphs, lines)
            planted.append("offensive")
            meta["offensive"] = lines
        if rng.random() < add_p["repeated_chars"]:
            _insert_lines(rng, paragraphs, [_repeated_chars(rng) for _ in range(rng.randint(2, 6))])
            planted.append("repeated_chars")
        as_html = rng.random() < add_p["html"]
        if not as_html and rng.random() < add_p["boilerplate"]:
            if source == "pride_and_prejudice" and rng.random() < cfg.gutenberg:
                head, foot = _gutenberg()
                paragraphs = [[head], *paragraphs, [foot]]
                lines = [ln.strip() for ln in f"{head}\n{foot}".split("\n") if ln.strip()]
                meta["boilerplate_kind"] = "gutenberg"
            else:
                if not site_cycle:  # the sites take turns, so each site's lines repeat on as many pages
                    site_cycle = rng.sample(_SITES, len(_SITES))
                header, footer = _site_lines(rng, site_cycle.pop())
                paragraphs = [header, *paragraphs, footer]
                lines = header + footer
                meta["boilerplate_kind"] = "site"
            planted.append("boilerplate")
            meta["boilerplate"] = lines
        text = _join(paragraphs)
        if as_html:
            page, template = _to_html(rng, paragraphs, rng.choice(_SITES))
            planted.append("html")
            meta.update(format="html", main_text=text, html_boilerplate=template)
            text = page
        meta["planted"] = planted
        docs.append(Document(doc_id, text, meta))
        if not planted:
            clean_ids.append(i)
        if meta["format"] == "text":
            body_ids.append(i)
    return docs


def summary(docs: list[Document]) -> dict[str, int]:
    """How many documents carry each label, plus ``total`` and ``clean`` (no label)."""
    counts = {"total": len(docs), "clean": 0, **{p: 0 for p in PROBLEMS}}
    for d in docs:
        planted = d.metadata.get("planted", [])
        if not planted:
            counts["clean"] += 1
        for p in planted:
            counts[p] = counts.get(p, 0) + 1
    return counts


def write_corpus(cfg: CorpusConfig, path: str | Path) -> int:
    """Build the corpus for ``cfg`` and write it as JSONL (``.jsonl`` or ``.jsonl.gz``); return the count."""
    return write_jsonl(make_corpus(cfg), path)
