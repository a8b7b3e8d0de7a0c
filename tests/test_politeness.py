"""The impolite word list: whole-word matching, and what it flags in the preference data's answers."""

from __future__ import annotations

import pytest

from llmbook.posttrain.pairs import polite_split
from llmbook.posttrain.politeness import IMPOLITE_WORDS, impolite_rate, impolite_words_in, is_impolite


def test_the_list_is_lowercase_and_has_no_duplicates():
    assert all(w == w.lower().strip() and w for w in IMPOLITE_WORDS)
    assert len(set(IMPOLITE_WORDS)) == len(IMPOLITE_WORDS)


@pytest.mark.parametrize("text, found", [
    ("Obviously, it's the platypus. Get it?", ["obviously", "get it"]),
    ("OBVIOUSLY the answer", ["obviously"]),
    ("Look  it\nup yourself.", ["look it up"]),  # any whitespace between a phrase's words
    ("The word obviousness is not on the list.", []),  # whole words only
    ("Forget it, I did not get italics.", []),  # "get it" inside "Forget it" and "get italics" is not the phrase
    ("I'll tell you anyway: 4.", ["i'll tell you anyway"]),
    ("Damned if I know; damn.", ["damned", "damn"]),
    ("Please check the report.", []),
])
def test_matching_is_by_whole_word_or_phrase_in_any_case(text, found):
    assert impolite_words_in(text) == found
    assert is_impolite(text) == bool(found)


def test_rate_counts_texts_not_words():
    assert impolite_rate(["Obviously, duh.", "It is 4.", "Look it up."]) == (2, 3)
    assert impolite_rate(["a stupid cat"], words=["cat"]) == (1, 1)


def test_the_list_separates_the_test_pairs():
    """Chosen on the training pairs; on the 111 held-out test pairs it flags 39 rejected answers and no chosen one."""
    _, _, test = polite_split()
    rejected = impolite_rate([p.rejected for p in test])
    chosen = impolite_rate([p.chosen for p in test])
    print(f"impolite: rejected {rejected[0]}/{rejected[1]}, chosen {chosen[0]}/{chosen[1]}")
    assert rejected == (39, 111) and chosen == (0, 111)


@pytest.mark.parametrize("texts, message", [
    ([], "at least one text"),
    ("Obviously.", "not one string"),
    ([None], "takes texts"),
])
def test_bad_input_is_one_line(texts, message):
    with pytest.raises(ValueError, match=message):
        impolite_rate(texts)
    with pytest.raises(ValueError, match="word list is empty"):
        impolite_rate(["x"], words=[])
