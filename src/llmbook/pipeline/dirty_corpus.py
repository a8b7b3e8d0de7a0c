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
   deck) are grouped two to six to a paragraph. Two recombined pages share a
   sentence now and then but almost never a run of them, so unrelated clean
   pages have a low 5-gram Jaccard similarity (measured in the tests).
   A line that repeats one already written anywhere in the corpus (a
   Shakespeare "My lord?", an instruction repeated in the data) is merged
   into the next line, so no two clean pages share a line and line-level
   deduplication has nothing to remove from them.
2. **Planted problems** are labelled in ``metadata["planted"]`` (names in
   ``PROBLEMS``). A page's *kind* is drawn first: clean text, or an exact
   duplicate, a near duplicate, spam, gibberish, a short page, foreign text,
   lorem ipsum. A page with a clean body may then get, independently, PII,
   offensive lines, runs of repeated characters, boilerplate (a site's
   navigation, cookie banner and footer, or Project Gutenberg's real header
   and license), or arrive as an HTML page. Duplicates come after their
   original, name it in ``dup_of``, and an exact duplicate inherits its
   original's labels. A near duplicate edits words and sentences of a clean
   original until the true 5-gram Jaccard similarity (``text.word_shingles``)
   reaches a target drawn uniformly from ``near_dup_min_jaccard..1``; the
   similarity it reached is recorded exactly in ``jaccard``.

Every document's metadata: ``source``, ``origin`` (excerpt, recombined or
generated), ``planted``, ``dup_of``, ``jaccard``, ``lang``, ``pii`` (the
planted strings), ``boilerplate`` (the planted lines), ``format`` ("text" or
"html", then also ``main_text``: the page's true main text).

The foreign pages recombine a small public-domain sample (``foreign``), so they
are near duplicates of each other as well; a pipeline removes them with the
language filter before deduplication.

    >>> docs = make_corpus(CorpusConfig(n_docs=200, seed=0))   # doctest: +SKIP
    >>> summary(docs)["clean"]                                  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import html as html_lib
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
            if f.type == "float" and not (0.0 <= value <= 1.0):
                raise ValueError(f"CorpusConfig.{f.name} is a share in [0, 1], got {value!r}")
        if sum(getattr(self, k) for k in KINDS) >= 1.0:
            raise ValueError("the shares of exact_dup, near_dup, spam, gibberish, short, foreign, lorem sum to >= 1")
        if not 1 <= self.min_words <= self.max_words <= self.long_max_words:
            raise ValueError("need 1 <= min_words <= max_words <= long_max_words")


# ---------------------------------------------------------------------------------------------------------------
# The clean supply: paragraphs (lists of lines) for excerpts, and sentences for recombination


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_BLOCK_WORDS = 1500  # excerpts are cut from blocks this long, visited in a random order


def _sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENTENCE_END.split(text)) if len(s.split()) >= 3]


@dataclass
class _Source:
    name: str
    paragraphs: list[list[str]]  # each a list of lines
    sentences: list[str]

    @property
    def n_words(self) -> int:
        return sum(len(line.split()) for p in self.paragraphs for line in p)


@functools.lru_cache(maxsize=1)
def _sources() -> tuple[_Source, ...]:
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
    sources.append(_Source("tinyshakespeare", paragraphs, sents))
    # Pride and Prejudice: a paragraph is one line (unwrapped); chapter headings and the title are dropped.
    paragraphs, sents = [], []
    for block in re.split(r"\n\s*\n", data.read_text("pride_and_prejudice")):
        line = " ".join(block.split())
        if len(line.split()) < 4 or re.fullmatch(r"(Chapter|CHAPTER) \w+\.?", line):
            continue
        paragraphs.append([line])
        sents.extend(_sentences(line))
    sources.append(_Source("pride_and_prejudice", paragraphs, sents))
    # corpus.en: one sentence a line, from many unrelated pages; three consecutive lines make a paragraph.
    lines = [ln.strip() for ln in data.path("corpus.en").read_text(encoding="utf-8").splitlines() if ln.strip()]
    paragraphs = [[" ".join(lines[i : i + 3])] for i in range(0, len(lines), 3)]
    sources.append(_Source("corpus.en", paragraphs, [s for s in lines if len(s.split()) >= 3]))
    # Instruction data: a record is a paragraph of instruction, input and response lines.
    records = json.loads(data.path("instruction-data").read_text(encoding="utf-8"))
    paragraphs, sents = [], []
    for r in records:
        lines = [" ".join(str(r.get(k, "")).split()) for k in ("instruction", "input", "output")]
        lines = [ln for ln in lines if ln]
        paragraphs.append(lines)
        for ln in lines:
            sents.extend(_sentences(ln))
    sources.append(_Source("instruction-data", paragraphs, sents))
    return tuple(sources)


class _Supply:
    """Hands out clean bodies: excerpts while a source lasts, recombined sentences after."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.sources = _sources()
        self.weights = [s.n_words for s in self.sources]
        self.order: list[list[list[str]]] = []  # per source: paragraphs in block-shuffled order
        for s in self.sources:
            blocks, block, n = [], [], 0
            for p in s.paragraphs:
                block.append(p)
                n += sum(len(ln.split()) for ln in p)
                if n >= _BLOCK_WORDS:
                    blocks.append(block)
                    block, n = [], 0
            if block:
                blocks.append(block)
            rng.shuffle(blocks)
            self.order.append([p for b in blocks for p in b])
        self.pos = [0] * len(self.sources)
        self.decks: list[list[str]] = [[] for _ in self.sources]
        self.seen: set[int] = set()  # hashes of every clean line written so far (normalized)
        vocab = sorted({w for s in self.sources for ln in s.sentences[:4000] for w in ln.split() if w.isalpha()})
        self.vocab = vocab

    def length(self, cfg: CorpusConfig) -> int:
        lo, hi = (cfg.max_words, cfg.long_max_words) if self.rng.random() < cfg.long_share else (
            cfg.min_words, cfg.max_words)
        return int(math.exp(self.rng.uniform(math.log(lo), math.log(hi))))

    def sentence(self, k: int) -> str:
        """The next sentence of source k's deck (reshuffled when used up)."""
        if not self.decks[k]:
            deck = list(self.sources[k].sentences)
            self.rng.shuffle(deck)
            self.decks[k] = deck
        return self.decks[k].pop()

    def body(self, n_words: int) -> tuple[list[list[str]], str, str]:
        """A clean body of about ``n_words`` words: (paragraphs of lines, source name, origin)."""
        k = self.rng.choices(range(len(self.sources)), weights=self.weights)[0]
        paragraphs, n = [], 0
        origin = "excerpt" if self.pos[k] < len(self.order[k]) else "recombined"
        while n < n_words:
            if self.pos[k] < len(self.order[k]):
                para = self.order[k][self.pos[k]]
                self.pos[k] += 1
            else:
                para = [" ".join(self.sentence(k) for _ in range(self.rng.randint(2, 6)))]
            paragraphs.append(para)
            n += sum(len(ln.split()) for ln in para)
        return self._unique(paragraphs), self.sources[k].name, origin

    def _unique(self, paragraphs: list[list[str]]) -> list[list[str]]:
        """Merge every line already written somewhere (or empty once normalized) into the line after it."""
        out: list[list[str]] = []
        carry = ""
        for para in paragraphs:
            kept: list[str] = []
            for line in para:
                cand = f"{carry} {line}".strip() if carry else line
                key = normalize(cand)
                if not key or hash(key) in self.seen:
                    carry = cand
                    continue
                self.seen.add(hash(key))
                kept.append(cand)
                carry = ""
            if kept:
                out.append(kept)
        if carry and out:
            last = out[-1][-1]
            self.seen.discard(hash(normalize(last)))
            out[-1][-1] = f"{last} {carry}"
            self.seen.add(hash(normalize(out[-1][-1])))
        return out


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
    # a page shows most, not always all, of the site's template
    header = [ln for ln in header if rng.random() < 0.85] or header[:1]
    footer = [ln for ln in footer if rng.random() < 0.85] or footer[-1:]
    return header, footer


@functools.lru_cache(maxsize=1)
def _gutenberg() -> tuple[str, str]:
    """Project Gutenberg's real header and license footer from the raw Pride and Prejudice file."""
    lines = data.path("pride_and_prejudice").read_text(encoding="utf-8").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("*** START OF"))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("End of the Project Gutenberg"))
    return "\n".join(lines[: start + 1]).strip(), "\n".join(lines[end:]).strip()


_PRODUCTS = ["watches", "sneakers", "phone cases", "sunglasses", "handbags", "car insurance", "payday loans",
             "hotel deals", "weight loss pills", "web hosting", "concert tickets", "replica jerseys", "vitamins",
             "laptops", "garden furniture", "essay writing", "followers", "crypto signals"]
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
            kws = [f"{a} {p}" for a in rng.sample(["cheap", "best", "discount", "buy", "top", "sale", "online",
                                                   "free", "new", "original", "wholesale"], 6)]
            lines.append("Tags: " + ", ".join(kws + [f"{p} {city}", f"cheap {q}"]))
        elif form == 2:
            lines.append(f"CLICK HERE for the best {p} deals in {city}! Save {rng.randint(20, 90)}% today only, "
                         f"order now, limited offer, best price guaranteed.")
        elif form == 3:
            lines.append(" ".join([f"cheap {p} best price"] * rng.randint(3, 8)))
        else:
            lines.append(f"{p} {p} {p} {city} {p} buy {p} now {p} cheap {q} cheap {q} best {q} "
                         f"#{rng.randint(100, 99999)}")
    return [lines]


def _gibberish(rng: random.Random) -> list[list[str]]:
    symbols = "#$%&*@^~|<>{}[]=+/\\_"
    lines = []
    for _ in range(rng.randint(3, 12)):
        style = rng.randrange(3)
        toks = []
        for _ in range(rng.randint(5, 25)):
            n = rng.randint(2, 12)
            if style == 0:  # letter soup
                toks.append("".join(rng.choice(string.ascii_lowercase) for _ in range(n)))
            elif style == 1:  # symbols and digits
                toks.append("".join(rng.choice(symbols + string.digits + "xyzq") for _ in range(n)))
            else:  # base64-like blobs
                toks.append("".join(rng.choice(string.ascii_letters + string.digits + "+/=") for _ in range(n * 3)))
        lines.append(" ".join(toks))
    return [lines]


_LOREM = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "
          "dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea "
          "commodo consequat duis aute irure in reprehenderit voluptate velit esse cillum fugiat nulla pariatur "
          "excepteur sint occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim id est "
          "laborum").split()


def _lorem_paragraph(rng: random.Random, first: bool) -> str:
    sents = ["Lorem ipsum dolor sit amet, consectetur adipiscing elit."] if first else []
    for _ in range(rng.randint(3, 7)):
        w = [rng.choice(_LOREM) for _ in range(rng.randint(6, 14))]
        sents.append(" ".join(w).capitalize() + ".")
    return " ".join(sents)


_ERRORS = ["404 Not Found. The page {p} does not exist.", "Loading... Please enable JavaScript to view {p}.",
           "Access denied. You do not have permission to view {p}.", "This page {p} has moved. Redirecting...",
           "Coming soon! {p} is under construction."]


def _short(rng: random.Random, supply: _Supply) -> list[list[str]]:
    if rng.random() < 0.3:
        path = f"/{rng.choice(['blog', 'shop', 'news', 'item', 'user'])}/{rng.randint(1, 10**7)}"
        return [[rng.choice(_ERRORS).format(p=path)]]
    k = rng.choices(range(len(supply.sources)), weights=supply.weights)[0]
    words: list[str] = []
    target = rng.randint(5, 45)
    while len(words) < target:
        words.extend(supply.sentence(k).split())
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


_INSULTS = ["a complete idiot", "an absolute moron", "a clueless jerk", "full of crap", "a pathetic loser",
            "dumb as a rock", "a lying sack of crap", "a stupid ass", "an arrogant twit", "a total dumbass"]
_CURSES = ["", " Shut up.", " What a load of crap.", " Damn it.", " This is bullshit.", " Get lost, idiot.",
           " Holy shit.", " Go to hell."]
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
    phone = rng.choice([f"({a}) {b}-{c:04d}", f"{a}-{b}-{c:04d}", f"+1 {a} {b} {c:04d}",
                        f"+44 20 {b:03d}{rng.randint(0, 9)} {c:04d}", f"{a}.{b}.{c:04d}"])
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
            "!" * rng.randint(6, 30))
    return " ".join(rng.choice(["a", "z", "x", "lol", "ha"]) * rng.randint(6, 30) for _ in range(rng.randint(1, 4)))


def _insert_lines(rng: random.Random, paragraphs: list[list[str]], new: list[str]) -> None:
    """Insert each new line as its own line at a random place among the paragraphs."""
    for line in new:
        p = paragraphs[rng.randrange(len(paragraphs))]
        p.insert(rng.randint(0, len(p)), line)


# ---------------------------------------------------------------------------------------------------------------
# Duplicates


def _exact_copy(rng: random.Random, text: str) -> tuple[str, str]:
    """A copy equal after ``text.normalize``: byte-identical, or with whitespace or letter case changed."""
    variant = rng.choice(["identical", "identical", "whitespace", "case"])
    if variant == "whitespace":
        lines = text.split("\n")
        lines = [("  " if rng.random() < 0.3 else "") + ln.replace(" ", rng.choice([" ", "  ", " \t"]), 2)
                 + (" " if rng.random() < 0.3 else "") for ln in lines]
        text = "\n".join(lines) + "\n\n"
    elif variant == "case":
        text = rng.choice([text.lower(), text.upper(), "\n".join(
            ln.upper() if rng.random() < 0.3 else ln for ln in text.split("\n"))])
    return text, variant


def _near_copy(rng: random.Random, text: str, target: float, vocab: list[str]) -> tuple[str, float]:
    """Edit words and sentences of ``text`` until its 5-gram Jaccard to the original is closest to ``target``.

    A fixed random sequence of edits (replace, delete or insert a word; delete
    a run of words; insert a sentence) is applied one prefix at a time, and the
    prefix length is found by bisection: the similarity falls as edits are added.
    """
    lines = text.split("\n")
    toks = [ln.split(" ") for ln in lines]
    pos = [(i, j) for i, t in enumerate(toks) for j in range(len(t)) if t[j]]
    order = list(range(len(pos)))
    rng.shuffle(order)
    ops = []
    for p in order:
        r = rng.random()
        if r < 0.55:
            ops.append(("replace", p, rng.choice(vocab)))
        elif r < 0.75:
            ops.append(("delete", p, ""))
        elif r < 0.93:
            ops.append(("insert", p, rng.choice(vocab)))
        elif r < 0.97:
            ops.append(("span", p, rng.randint(4, 12)))
        else:
            ops.append(("sentence", p, " ".join(rng.choice(vocab) for _ in range(rng.randint(6, 14))) + "."))

    def render(k: int) -> str:
        out = [list(t) for t in toks]
        deleted = set()
        for kind, p, arg in ops[:k]:
            i, j = pos[p]
            if kind == "replace":
                if normalize(arg) == normalize(toks[i][j]):
                    arg = arg + "s"
                out[i][j] = arg
            elif kind == "delete":
                deleted.add((i, j))
            elif kind == "span":
                deleted.update((i, jj) for jj in range(j, min(j + arg, len(toks[i]))))
            else:
                out[i][j] = f"{out[i][j]} {arg}"
        new_lines = []
        for i, t in enumerate(out):
            kept = [w for j, w in enumerate(t) if (i, j) not in deleted]
            if kept or not toks[i] or toks[i] == [""]:
                new_lines.append(" ".join(kept))
        return "\n".join(new_lines)

    original = word_shingles(text)
    lo, hi = 1, len(ops)
    while lo < hi:  # smallest k whose similarity is <= target
        mid = (lo + hi) // 2
        if jaccard(original, word_shingles(render(mid))) <= target:
            hi = mid
        else:
            lo = mid + 1
    best = None
    for k in {lo, max(1, lo - 1)}:
        cand = render(k)
        j = jaccard(original, word_shingles(cand))
        if j < 1.0 and (best is None or abs(j - target) < abs(best[1] - target)):
            best = (cand, j)
    if best is None:  # every edit so far left the shingles unchanged (a tiny text): take them all
        cand = render(len(ops))
        best = (cand, jaccard(original, word_shingles(cand)))
    return best


# ---------------------------------------------------------------------------------------------------------------
# HTML pages


def _to_html(rng: random.Random, paragraphs: list[list[str]], site: tuple[str, list[str]]) -> tuple[str, list[str]]:
    """Wrap a clean body in a realistic page: head with style and scripts, nav, cookie banner, aside, footer."""
    name, menu = site
    header, footer = _site_lines(rng, site)
    esc = html_lib.escape
    layout = rng.randrange(3)
    title = esc(" ".join(paragraphs[0][0].split()[:6]))
    body = []
    for p in paragraphs:
        inner = "<br>\n".join(esc(ln) for ln in p)
        body.append(f"<p>{inner}</p>" if layout != 2 else f'<div class="para">{inner}</div>')
    nav = "".join(f'<li><a href="/{esc(m.lower().replace(" ", "-"))}">{esc(m)}</a></li>' for m in menu)
    related = "".join(f'<li><a href="/post/{rng.randint(1, 9999)}">{esc(rng.choice(_SHARE[:1]))} '
                      f"{rng.choice(['Top 10 tips', 'Read this next', 'Popular this week'])}</a></li>"
                      for _ in range(3))
    cookie = _COOKIE[_SITES.index(site) % len(_COOKIE)]
    share = " ".join(f'<a class="share" href="#">{s}</a>' for s in _SHARE[:3])
    year = 2015 + _SITES.index(site) % 9
    main_open, main_close = [("<main><article>", "</article></main>"),
                             ('<div id="content" class="post-content">', "</div>"),
                             ('<div class="main"><div class="entry">', "</div></div>")][layout]
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} - {esc(name)}</title>
<style>body {{ font-family: Georgia, serif; }} .menu li {{ display: inline; }}</style>
<script>window.dataLayer = window.dataLayer || []; function gtag(){{dataLayer.push(arguments);}}</script>
</head>
<body>
<header class="site-header"><div class="logo">{esc(name)}</div>
<nav class="menu"><ul>{nav}</ul></nav>
</header>
<div id="cookie-banner" class="cookie-consent"><p>{esc(cookie)}</p><button>Accept</button></div>
{main_open}
{chr(10).join(body)}
{main_close}
<aside class="sidebar"><h3>Related posts</h3><ul>{related}</ul></aside>
<div class="share-buttons">{share}</div>
<footer><p>{esc(_FOOTER[_SITES.index(site) % len(_FOOTER)])}</p>
<p>&copy; {year} {esc(name)}. All rights reserved.</p></footer>
<script src="/static/js/app.{rng.randint(1000, 9999)}.js"></script>
</body>
</html>
"""
    return page, [*header, *footer]


# ---------------------------------------------------------------------------------------------------------------
# The corpus


def _meta(source: str, origin: str, lang: str = "en") -> dict:
    return {"source": source, "origin": origin, "planted": [], "dup_of": None, "jaccard": None, "lang": lang,
            "pii": [], "boilerplate": [], "format": "text"}


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
    width = max(7, len(str(cfg.n_docs - 1)))
    for i in range(cfg.n_docs):
        doc_id = f"doc{i:0{width}d}"
        kind = rng.choices((*KINDS, "clean"), weights=kind_weights)[0]
        if kind in ("exact_dup", "near_dup") and not clean_ids:
            kind = "clean"
        if kind == "exact_dup":
            orig = docs[rng.choice(body_ids)]
            text, variant = _exact_copy(rng, orig.text)
            meta = json.loads(json.dumps(orig.metadata))
            meta.update(planted=["exact_dup", *orig.metadata["planted"]], dup_of=orig.id, variant=variant)
            docs.append(Document(doc_id, text, meta))
            continue
        if kind == "near_dup":
            orig = docs[rng.choice(clean_ids)]
            target = rng.uniform(cfg.near_dup_min_jaccard, 1.0)
            text, jac = _near_copy(rng, orig.text, target, supply.vocab)
            meta = _meta(orig.metadata["source"], orig.metadata["origin"])
            meta.update(planted=["near_dup"], dup_of=orig.id, jaccard=jac)
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
                header, footer = _site_lines(rng, rng.choice(_SITES))
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
