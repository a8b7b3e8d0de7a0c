"""Impolite wording in answers: a word list read off the preference data, and the rate of answers that use it.

The polite preference data (``pairs.polite_split``) pairs a polite ``chosen``
answer with an impolite ``rejected`` one that says the same thing with a
sneer: "Obviously, a mammal that lays eggs is the platypus.", "... is the past
perfect tense, get it?". DPO should move a model's own answers away from that
wording; this module counts it, so a chapter can report the rate before and
after.

How the list was chosen. Over the 929 *training* pairs (the test pairs were not
looked at), every word and every 2- and 3-word phrase was counted in the
rejected and in the chosen answers; phrases that occur in many rejected
answers and in no chosen ones, and that are impolite in themselves, were
kept, with a few rarer ones found by reading the rejected answers the list
still missed. Counts of answers containing each entry, rejected / chosen, training
split:

    obviously 178 / 0     get it 90 / 0          look it up 29 / 0      duh 27 / 0
    i'll tell you anyway 25 / 0                  freaking 23 / 0        not that hard 16 / 0
    stupid 14 / 0         ridiculously 12 / 0    damn 8 / 0             annoyingly 3 / 0
    seriously, geez, darn, crappy, dude, huh 2 / 0 each                 damned, nonsense 1 / 0 each

Left out though frequent in rejected answers: words that are rude only in
context and plain in others ("okay" 27 / 0, "already" 18 / 0, "basically"
12 / 0, "look" 69 / 0 ("look at the data" is polite), "just" 25 / 2,
"anyway" 26 / 0 outside "i'll tell you anyway"). "get it" covers "get it
together" (39) and "get it straight" (26). The list finds the data's sneer,
not every impoliteness.

Measured (``tests/test_politeness.py`` asserts it): the list flags 322 of the
929 training rejected answers (35%) and none of the chosen; on the 111 test
pairs, 39 rejected answers (35%) and 0 chosen ones. Most rejected answers are
impolite without any fixed phrase, by being curt ("4, 8, 12, 16, 20." where
the chosen one says "The first five multiples of 4 are: ...") or by dropping
the chosen answer's "kindly" and "I'd be happy to help!": a word list cannot
see that. So the rate is a lower bound on impoliteness, and a model that only
stopped using these words would fool it (the chapter says so).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# lowercase; matched as whole words (or whole phrases), any case, any whitespace between the words
IMPOLITE_WORDS: tuple[str, ...] = (
    "obviously", "get it", "look it up", "duh", "i'll tell you anyway", "freaking", "stupid", "not that hard",
    "ridiculously", "damn", "damned", "annoyingly", "seriously", "geez", "darn", "crappy", "dude", "huh", "nonsense",
)


def _pattern(words: Iterable[str]) -> re.Pattern[str]:
    """One regular expression for all entries: each a whole word or phrase (``\\b`` on both ends)."""
    alternatives = [r"\s+".join(re.escape(w) for w in entry.split()) for entry in words]
    if not alternatives:
        raise ValueError("the word list is empty: give at least one word or phrase")
    # (?<![\w']) and (?![\w']) rather than \b: "it's" must not match "it", nor "getit" match "get it"
    return re.compile(r"(?<![\w'])(?:" + "|".join(alternatives) + r")(?![\w'])", re.IGNORECASE)


_IMPOLITE = _pattern(IMPOLITE_WORDS)


def impolite_words_in(text: str, words: Iterable[str] | None = None) -> list[str]:
    """The entries of the list found in ``text``, lowercased, in order of appearance.

    >>> impolite_words_in("Obviously, it's the platypus. Get it?")
    ['obviously', 'get it']
    >>> impolite_words_in("The word 'obviousness' is not on the list.")
    []
    """
    pattern = _IMPOLITE if words is None else _pattern(words)
    return [" ".join(m.group(0).lower().split()) for m in pattern.finditer(text)]


def is_impolite(text: str, words: Iterable[str] | None = None) -> bool:
    """Whether ``text`` contains any entry of the list (``IMPOLITE_WORDS`` unless ``words`` is given)."""
    pattern = _IMPOLITE if words is None else _pattern(words)
    return pattern.search(text) is not None


def impolite_rate(texts: Iterable[str], words: Iterable[str] | None = None) -> tuple[int, int]:
    """``(count, n)``: how many of the ``n`` texts contain an impolite word or phrase (whole words, any case).

    A pair of counts, not a fraction, so a chapter can put a Wilson interval on
    it (``tasks.wilson_interval(count, n)``).

    >>> impolite_rate(["Obviously it is 4.", "It is 4.", "Look it up yourself."])
    (2, 3)
    """
    if isinstance(texts, str):
        raise ValueError("impolite_rate takes a list of texts, not one string (it would count its characters)")
    texts = list(texts)
    if not texts:
        raise ValueError("impolite_rate needs at least one text")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("impolite_rate takes texts (str); got " +
                         next(type(t).__name__ for t in texts if not isinstance(t, str)))
    pattern = _IMPOLITE if words is None else _pattern(words)
    return sum(pattern.search(t) is not None for t in texts), len(texts)
