"""Gopher's quality rules (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from
Training Gopher", appendix A.1.1): cheap statistics of a page that separate prose from everything else.

A page of running text has a typical shape: a few hundred words of 3 to 10 characters, few symbols, most
words alphabetic, and the glue words of the language ("the", "and", "of"...) somewhere in it. Navigation
menus, lists of links, code, tables of numbers, keyword spam and machine-made text break at least one of
these. Gopher keeps a document only if

- it has 50 to 100,000 words (words that are not pure punctuation),
- their mean length is 3 to 10 characters,
- "#" and ellipses ("..." or "…") are each at most 10% of the word count,
- at most 90% of its lines start with a bullet ("•" or "-") and at most 30% end with an ellipsis,
- at least 80% of its words contain an alphabetic character,
- at least 2 of the stop words "the, be, to, of, and, that, have, with" occur.

The thresholds are the paper's, as datatrove 0.10.1 (``GopherQualityFilter``) sets them; this module's
decisions are identical to datatrove's given the same words (tested), including datatrove's details:
the "#" and ellipsis ratios divide by all tokens, punctuation tokens included, and the stop words are
matched case-sensitively.

What "a word" is matters. datatrove splits with spaCy's blank English tokenizer ("don't" -> "do", "n't";
"U.S." stays one token; "," and "." are tokens), which costs about a millisecond per page. ``split_words``
here is one regular expression that imitates spaCy on ordinary prose, about ten times faster; the word
splitter is a parameter, so a test runs these rules with datatrove's own tokenizer and gets datatrove's
decisions exactly, and ``compare_with_datatrove`` measures how often the fast splitter decides the same.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llmbook.pipeline.stage import Filter

WordSplitter = Callable[[str], list[str]]

# datatrove's PUNCTUATION_SET (datatrove/utils/text.py: ASCII punctuation, control characters, common
# Unicode punctuation and every terminal punctuation mark it knows): a token made only of these is a
# "symbol", not a word. Copied character for character (a test checks it equals datatrove's set).
PUNCTUATION = (
    "\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\r\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19"
    "\x1a\x1b\x1c\x1d\x1e\x1f!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\x7f\x80\x81\x82\x83\x84\x85\x86\x87"
    "\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96\x97\x98\x99\x9a\x9b\x9c\x9d\x9e\x9f"
    "\xab\xb4\xbb\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964"
    "\u0965\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803\u1809"
    "\u1944\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c\u1c7e\u1c7f"
    "\u2013\u2014\u2019\u201c\u201d\u201e\u2026\u203c\u203d\u2047\u2048\u2049\u2236\u2501\u25ba\u2e2e"
    "\u2e3c\u2e53\u2e54\u3001\u3002\u3008\u3009\u300a\u300b\u300c\u300d\u3010\u3011\ua4ff\ua60e\ua60f"
    "\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52"
    "\ufe56\ufe57\uff01\uff05\uff08\uff09\uff0c\uff0e\uff11\uff1a\uff1b\uff1f\uff5e\uff61\U00010a56"
    "\U00010a57\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88"
    "\U00010f89\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1\U00011141\U00011142"
    "\U00011143\U000111c5\U000111c6\U000111cd\U000111de\U000111df\U00011238\U00011239\U0001123b"
    "\U0001123c\U000112a9\U0001144b\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb"
    "\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2\U000115d3\U000115d4"
    "\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c\U0001173d\U0001173e\U00011944"
    "\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42\U00011ef7\U00011ef8"
    "\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44\U00016e98"
    "\U0001bc9f\U0001da88"
)

# Abbreviations spaCy's English tokenizer keeps whole with their period (its tokenizer exceptions):
# "Mr. Smith" is two tokens, not three, and the period does not end a sentence.
_ABBREVIATIONS = (
    "Adm Ak Ala Apr Ariz Ark Aug Bros Calif Co Colo Conn Corp Dec Del Dr Feb Fla Ga Gen Gov Ia Id Ill Inc Ind "
    "Jan Jr Jul Jun Kan Kans Ky La Ltd Mar Mass Md Messrs Mich Minn Miss Mo Mont Mr Mrs Ms Mt Neb Nebr Nev Nov "
    "Oct Okla Ore Pa Prof Rep Rev Sen Sep Sept St Tenn Va Wash Wis co vs"
).split()
# spaCy splits "'s" off any word, but "'d 'll 'm 're 've" only off these (its exceptions: "we'll", not "arm'd").
_PRONOUNS = (
    "i you he she it we they that there these this those what when where who why how could might must not should would"
)
_PRONOUN = "|".join(f"[{w[0]}{w[0].upper()}]{w[1:]}" for w in _PRONOUNS.split())
_CLITIC = r"(?:d|ll|m|re|ve)(?![^\W_])"
# ... and "n't" off these only (spaCy's exceptions: "don't" -> "do" "n't", but Shakespeare's "an't" stays whole)
_NT_BASES = "ai are ca could dare did do does had has have is may might must need ought sha should was were wo would"
_NT_BASE = "|".join(f"[{w[0]}{w[0].upper()}]{w[1:]}" for w in _NT_BASES.split())
# "--" splits a chunk only between a letter or digit and a letter ("word--word"); anywhere else spaCy leaves
# the chunk whole ("Lizzy!--", "said,--\"no"), as Project Gutenberg's dashes often are.
_GLUED_DASHES = r"(?:(?<![^\W_-])-{2,}+|(?<!-)-{2,}+(?![^\W\d_]))"

_ABBREVIATION = "|".join(_ABBREVIATIONS)

# One alternative per kind of token, tried in order at each position (the first that matches wins); the
# leading (?=\S) skips a space with one test instead of one per alternative (twice as fast).
_TOKEN = re.compile(
    rf"""(?=\S)(?:
      (?<![^\s"“‘(\[])(?!https?:|[cC]annot|gonna|gotta)[^\W_]++(?=[,;:!?)"”\]]*+(?:\s|$))
                                                         # fast path: a plain word, alone in its chunk ...
    | (?<![^\s"“‘(\[])(?!(?:{_ABBREVIATION}|[^\W\d_])\.)[^\W_]++(?=\.(?:\s|$))  # ... or before a full stop
    | [,;:!?()\[\]"“”%&*/=+#$<>] | \.(?=\s|$)                       # punctuation that is always a token of its own
    | https?://\S+?(?=[.,;:!?)\]"'>]*(?:\s|$))           # a URL, without the punctuation after it
    | [\w.+-]++@\w[\w-]*(?:\.\w[\w-]*)+                  # an e-mail address
    | (?<![^\s"“‘'(\[])(?!["“‘'(\[])(?=[^\s-]*+-)\S*?{_GLUED_DASHES}\S*?(?=[,.!?;:"”’')\]]*(?:\s|$))  # ask?--  "--and
    | (?<![^\W_])(?:{_ABBREVIATION})\.(?![a-z\d])  # Mr. Dr. Jan. Inc.
    | (?<![^\W_])(?:[cC]an(?=not)|gon(?=na)|got(?=ta))(?=[^\W_]{{2,3}}(?![^\W_]))  # "can" of "cannot", "gon" of "gonna"
    | (?<![^\W_.])(?:[^\W\d_]\.){{2,}}(?![^\W_])          # U.S. e.g. i.e. a.m.
    | (?<![^\W_.])(?:[A-Z]|[a-z])\.(?![^\W_.])           # a single letter with its period: "J." (spaCy: "J.")
    | \d+(?:[.,:/]\d+)+                                 # 3.5  1,000  9:30  1/2 (but 3 - 4: spaCy splits)
    | (?<![^\W_])(?:{_NT_BASE})(?=[nN]['’][tT](?![^\W_]))  # "do" of "don't", "ca" of "can't" (not "an't")
    | (?<![^\W_])['’]em(?![^\W_])                        # 'em
    | [nN]['’][tT](?![^\W_])                             # "n't"
    | (?<=[^\W_])['’][sS](?![^\W_])                     # 's after any word
    | (?<![^\W_])(?:{_PRONOUN})(?=['’]{_CLITIC})          # "we" of "we'll", "I" of "I'm"
    | (?<=[^\W_])['’]{_CLITIC}                           # 'd 'll 'm 're 've after those
    | @[^\W_]+                                           # @handle
    | @[-.,]@ | \|\w+\|                                   # WikiText's @-@ and @,@; |endoftext|
    | (?:(?<!\S)-)?[^\W_]+(?:(?:_+|['’](?![sS](?![^\W_]))|\.(?=[a-z\d])|(?<=[^\W\d_])-(?=\d)|[;@|])[^\W_]+)*(?:-(?!\S))?
                                                         # a word: a_b O'Neil example.com covid-19 -born users-
    | \.{{2,}} | -{{2,}} | ~+                             # ... -- ~~~ stay one token
    | [^\w\s]                                            # any other symbol is a token of its own
    | _
    )""",
    re.VERBOSE,
)


@functools.lru_cache(maxsize=1024)
def split_words(text: str) -> list[str]:
    """Words and punctuation tokens the way spaCy's blank English tokenizer splits ordinary prose (one regex).

    "Don't stop, Mr. Smith!" -> ["Do", "n't", "stop", ",", "Mr.", "Smith", "!"]. It is an imitation: spaCy
    has hundreds of special cases (emoticons, "'90s", units after numbers); ``compare_with_datatrove``
    measures how often a rule decides differently because of them. The last 1,024 pages' words are cached
    (as datatrove caches its splits): the runner passes an input shard (1,000 pages by default) through the
    repetition rules and then the quality rules, and each page is split once. The returned list is shared:
    do not modify it.
    """
    return _TOKEN.findall(text)


@functools.cache
def datatrove_splitter(language: str = "en") -> WordSplitter:
    """datatrove's own word splitter (spaCy's blank tokenizer via ``load_word_tokenizer``): slow, but the reference."""
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    return load_word_tokenizer(language).word_tokenize


_SYMBOL_CLASS = "[" + re.escape(PUNCTUATION) + "]"
_SYMBOL_WORD = re.compile(rf"^{_SYMBOL_CLASS}+$", re.MULTILINE)


# A line (token) with a character in ``[^\W\d_]``: a letter, or one of the few numerals that are neither
# digits nor letters (½ ² Ⅻ), which ``str.isalpha`` does not count; ``_alpha_tokens`` corrects for those.
_WORDCHAR_LINE = re.compile(r"^[^\n]*?[^\W\d_]", re.MULTILINE)
_WORDCHAR = re.compile(r"[^\W\d_]")


def _alpha_tokens(tokens: list[str], joined: str) -> int:
    """How many tokens have a character ``c`` with ``c.isalpha()`` (datatrove's test), one regex pass plus a fix.

    The regex counts numerals like "½" as letters; only a non-ASCII token can hold one, so those few are
    checked one by one.
    """
    n = len(_WORDCHAR_LINE.findall(joined))
    if not joined.isascii():
        for token in tokens:
            if not token.isascii() and not any(map(str.isalpha, token)) and _WORDCHAR.search(token):
                n -= 1
    return n


@dataclass(frozen=True)
class WordStats:
    """What the rules read from a page's tokens: counts and lengths, computed with regexes over the joined tokens."""

    n_tokens: int  # every token, punctuation included (datatrove's ``n_words``)
    n_words: int  # tokens with at least one character that is not punctuation
    mean_word_length: float  # over those words
    n_alpha: int  # tokens with at least one alphabetic character
    vocabulary: frozenset[str]  # the distinct tokens (for the stop-word rule)


def word_stats(tokens: list[str]) -> WordStats:
    """Count words, symbols and alphabetic tokens without a Python loop over the tokens.

    The tokens are joined with newlines (no token contains one) and each count is one regex pass over the
    joined string in multi-line mode: a symbol-only token is a whole line of punctuation characters, an
    alphabetic token a line with a letter in it.
    """
    n = len(tokens)
    if n == 0:
        return WordStats(0, 0, float("nan"), 0, frozenset())
    joined = "\n".join(tokens)
    if joined.count("\n") != n - 1:  # a custom splitter kept a newline inside a token: count one by one
        symbols = [t for t in tokens if not t.strip(PUNCTUATION)]
        n_alpha = sum(any(c.isalpha() for c in t) for t in tokens)
    else:
        symbols = _SYMBOL_WORD.findall(joined)
        n_alpha = _alpha_tokens(tokens, joined)
    n_words = n - len(symbols)
    word_chars = len(joined) - (n - 1) - sum(map(len, symbols))
    mean = word_chars / n_words if n_words else float("nan")
    return WordStats(n, n_words, mean, n_alpha, frozenset(tokens))


STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


@dataclass(frozen=True)
class GopherThresholds:
    """Gopher's thresholds (Rae et al. 2021, A.1.1), with datatrove's defaults; ``None`` switches a rule off."""

    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8  # datatrove calls it max_non_alpha_words_ratio
    min_stop_words: int | None = 2
    stop_words: tuple[str, ...] = STOP_WORDS


@dataclass
class GopherQuality(Filter):
    """Drop a page that does not look like prose (Gopher's quality rules, decisions as datatrove's).

    ``reason`` names the first rule a page breaks with datatrove's names ("gopher_short_doc",
    "gopher_below_alpha_threshold"...), in datatrove's order. ``split`` is the word splitter: the fast regex
    by default, ``datatrove_splitter()`` for datatrove's spaCy words.
    """

    thresholds: GopherThresholds = field(default_factory=GopherThresholds)
    split: WordSplitter = split_words
    name: str = "gopher_quality"

    def reason(self, text: str) -> str | None:
        t = self.thresholds
        tokens = self.split(text)
        s = word_stats(tokens)
        if s.n_words == 0 or (t.min_doc_words and s.n_words < t.min_doc_words):
            return "gopher_short_doc"  # (no words at all: datatrove divides by zero when the rule is off)
        if t.max_doc_words and s.n_words > t.max_doc_words:
            return "gopher_long_doc"
        if t.min_avg_word_length and s.mean_word_length < t.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if t.max_avg_word_length and s.mean_word_length > t.max_avg_word_length:
            return "gopher_above_avg_threshold"
        if t.max_symbol_word_ratio and text.count("#") / s.n_tokens > t.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        if t.max_symbol_word_ratio and (text.count("...") + text.count("…")) / s.n_tokens > t.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
        lines = text.splitlines()
        if t.max_bullet_lines_ratio or t.max_ellipsis_lines_ratio:
            stripped = [line.strip() for line in lines]
            if t.max_bullet_lines_ratio:
                bullets = sum(1 for line in stripped if line.startswith(("•", "-")))
                if bullets / len(lines) > t.max_bullet_lines_ratio:
                    return "gopher_too_many_bullets"
            if t.max_ellipsis_lines_ratio:
                ellipses = sum(1 for line in stripped if line.endswith(("...", "…")))
                if ellipses / len(lines) > t.max_ellipsis_lines_ratio:
                    return "gopher_too_many_end_ellipsis"
        if t.min_alpha_words_ratio and s.n_alpha / s.n_tokens < t.min_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        if t.min_stop_words and len(s.vocabulary.intersection(t.stop_words)) < t.min_stop_words:
            return "gopher_enough_stop_words"
        return None


def _datatrove_reason(result) -> str | None:
    if result is True:
        return None
    if isinstance(result, tuple):
        return result[1]
    return None if result else "dropped"


def compare_with_datatrove(docs: Iterable, exact: bool = False, max_examples: int = 5) -> dict:
    """Run datatrove's three rule filters and this chapter's on the same documents; count where they differ.

    For each filter ("gopher_quality", "gopher_repetition", "c4_quality"): ``n`` documents, ``agree``
    (same keep/drop), ``agree_reason`` (same rule named too), ``agree_text`` (C4: same kept text as well),
    the seconds and documents/s of each side, and up to ``max_examples`` disagreements (id, both reasons,
    the start of the text); times are CPU seconds of this process (a shared machine's load does not
    count). ``exact=True`` gives this chapter's filters datatrove's own spaCy word splitter
    and sentence counter: every count must then agree (the rules are the same); the default compares the
    fast regex splitter, and its disagreements are the cost of not running spaCy.
    """
    from datatrove.data import Document as DatatroveDocument
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    from llmbook.pipeline.c4 import C4Quality, datatrove_sentence_counter
    from llmbook.pipeline.repetition import GopherRepetition

    split = datatrove_splitter() if exact else split_words
    ours = {
        "gopher_quality": GopherQuality(split=split),
        "gopher_repetition": GopherRepetition(split=split),
        "c4_quality": C4Quality(count=datatrove_sentence_counter()) if exact else C4Quality(),
    }
    theirs = {
        "gopher_quality": GopherQualityFilter(),
        "gopher_repetition": GopherRepetitionFilter(),
        "c4_quality": C4QualityFilter(),
    }
    docs = list(docs)
    report: dict = {}
    for name, mine in ours.items():
        start = time.process_time()
        our_out = [mine.clean(d.text) if name == "c4_quality" else (d.text, mine.reason(d.text)) for d in docs]
        our_s = time.process_time() - start
        their_docs = [DatatroveDocument(text=d.text, id=str(d.id)) for d in docs]
        start = time.process_time()
        their_reasons = [_datatrove_reason(theirs[name].filter(d)) for d in their_docs]
        their_s = time.process_time() - start
        row = {"n": len(docs), "agree": 0, "agree_reason": 0, "agree_text": 0, "examples": []}
        for doc, (text, why), their_why, their_doc in zip(docs, our_out, their_reasons, their_docs, strict=True):
            same = (why is None) == (their_why is None)
            same_text = same and (why is not None or text == their_doc.text)
            row["agree"] += same
            row["agree_reason"] += why == their_why
            row["agree_text"] += same_text
            if not (same_text and why == their_why) and len(row["examples"]) < max_examples:
                row["examples"].append({"id": doc.id, "ours": why, "datatrove": their_why, "text": doc.text[:300]})
        row["agreement"] = row["agree"] / len(docs) if docs else 1.0
        row["ours_s"], row["datatrove_s"] = our_s, their_s
        row["ours_docs_per_s"] = len(docs) / our_s if our_s else float("inf")
        row["datatrove_docs_per_s"] = len(docs) / their_s if their_s else float("inf")
        report[name] = row
    return report
