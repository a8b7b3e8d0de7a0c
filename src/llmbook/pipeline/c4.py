"""C4's cleaning rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", section 2.2): keep the lines of a page that read like sentences.

Common Crawl's text of a page is mostly menus, buttons and footers, lines that rarely end like a
sentence. C4 keeps only the lines that do, then drops what is left if it is too little or clearly not
prose. Line by line (on the stripped line):

- drop a line with a "word" (whitespace-separated) over 1,000 characters (a data blob, not text),
- remove Wikipedia-style citation marks ("[1]", "[edit]", "[citation needed]"),
- drop a line that does not end in terminal punctuation (. ? ! " ') or ends in an ellipsis,
- drop a line of fewer than 3 words,
- drop a line mentioning "javascript" ("Please enable JavaScript") or a policy phrase ("privacy policy",
  "uses cookies", "terms of use"...),

and the whole page if a kept line contains "lorem ipsum" (placeholder text) or a curly bracket "{" (code),
or if fewer than 5 sentences remain. The page that survives is its kept lines joined by newlines: this
stage changes text, it does not only decide.

These are datatrove 0.10.1's ``C4QualityFilter`` rules with its defaults, in its order and with its names
("lorem_ipsum", "curly_bracket", "too_few_sentences"); the bad-words rule of the paper is a separate
filter there and is left out here too. Everything but the sentence count needs no tokenizer; datatrove
counts sentences with spaCy's sentencizer. A kept line holds at least one sentence, so the count is needed
only when fewer than 5 lines are kept: the common case costs nothing, and the rare one is counted with
``count_sentences``, the sentencizer's rule run over ``split_words`` tokens.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

from llmbook.pipeline.document import Document
from llmbook.pipeline.gopher import split_words
from llmbook.pipeline.stage import Decision, Filter

CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
ELLIPSIS = "..."
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")

# spaCy's sentencizer ends a sentence at one of these characters (its default punct_chars, copied).
SENTENCE_END = frozenset(
    "!.?\u0589\u061f\u06d4\u0700\u0701\u0702\u07f9\u0964\u0965\u104a\u104b\u1362\u1367\u1368\u166e"
    "\u1735\u1736\u1803\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1c3b\u1c3c"
    "\u1c7e\u1c7f\u203c\u203d\u2047\u2048\u2049\u2e2e\u2e3c\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877"
    "\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e"
    "\uff1f\U00010a56\U00010a57\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1\U00011141"
    "\U00011142\U00011143\U000111c5\U000111c6\U000111cd\U000111de\U000111df\U00011238\U00011239"
    "\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca"
    "\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2\U000115d3"
    "\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c\U0001173d\U0001173e"
    "\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42\U00016a6e\U00016a6f\U00016af5"
    "\U00016b37\U00016b38\U00016b44\U0001bc9f\U0001da88\uff61\u3002"
)

SentenceCounter = Callable[[str], int]


def _is_punct(token: str) -> bool:
    return all(unicodedata.category(c).startswith("P") for c in token)


def count_sentences(line: str) -> int:
    """Sentences in ``line`` by spaCy's sentencizer rule: a token that is not punctuation, after a sentence end.

    "He left. Then? She stayed." -> 3; "Mr. Smith left." -> 1 ("Mr." is one token, not a sentence end);
    "Wait... then go." -> 1 ("..." is not a sentence end). An empty line counts 1, as datatrove's does.
    """
    n, seen_end = 1, False
    for token in split_words(line):
        if token in SENTENCE_END:
            seen_end = True
        elif seen_end and not _is_punct(token):
            n += 1
            seen_end = False
    return n


def datatrove_sentence_counter(language: str = "en") -> SentenceCounter:
    """datatrove's own count (spaCy's sentencizer through ``split_into_sentences``): the reference."""
    from datatrove.utils.text import split_into_sentences

    return lambda line: len(split_into_sentences(line, language))


@dataclass(frozen=True)
class C4Thresholds:
    """C4's settings as datatrove's defaults; -1 switches a count off, False a rule."""

    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


@dataclass
class C4Quality(Filter):
    """Keep the sentence-like lines of a page; drop the page if too little or clearly not prose is left.

    ``clean(text)`` returns ``(kept text, None)`` or ``(None, rule)``; ``apply`` returns the document with
    the kept text (``reason`` only decides). ``count`` is the sentence counter (``count_sentences``, or
    ``datatrove_sentence_counter()`` for datatrove's spaCy count).
    """

    thresholds: C4Thresholds = field(default_factory=C4Thresholds)
    count: SentenceCounter = count_sentences
    name: str = "c4_quality"

    def clean(self, text: str) -> tuple[str | None, str | None]:
        t = self.thresholds
        kept: list[str] = []
        for line in text.splitlines():
            line = line.strip()
            words = line.split()
            if t.max_word_length != -1 and len(line) > t.max_word_length and max(map(len, words)) > t.max_word_length:
                continue
            if t.remove_citations:
                line = CITATION.sub("", line)
            if t.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith(ELLIPSIS)):
                continue
            if len(words) < t.min_words_per_line:
                continue
            lower = line.lower()
            if t.filter_lorem_ipsum and "lorem ipsum" in lower:
                return None, "lorem_ipsum"
            if t.filter_javascript and "javascript" in lower:
                continue
            if t.filter_curly_bracket and "{" in line:
                return None, "curly_bracket"
            if t.filter_policy and any(p in lower for p in POLICY_SUBSTRINGS):
                continue
            kept.append(line)
        # every kept line holds at least one sentence: count them only when that is not already enough
        if t.min_num_sentences != -1 and len(kept) < t.min_num_sentences:
            if sum(map(self.count, kept)) < t.min_num_sentences:
                return None, "too_few_sentences"
        return "\n".join(kept).strip(), None

    def reason(self, text: str) -> str | None:
        return self.clean(text)[1]

    def apply(self, doc: Document) -> Decision:
        text, why = self.clean(doc.text)
        if why is not None:
            return doc, f"{self.name}:{why}"
        return dataclasses.replace(doc, text=text), None
