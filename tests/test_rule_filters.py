"""Gopher quality, Gopher repetition and C4 rules: decisions identical to datatrove 0.10.1's filters.

With datatrove's own word splitter (spaCy) every decision, rule name and kept text must equal datatrove's;
with the fast regex splitter the agreement on the dirty corpus is stated and checked.
"""

from __future__ import annotations

import pytest

pytest.importorskip("datatrove")
pytest.importorskip("spacy")

from datatrove.data import Document as DTDocument  # noqa: E402
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter  # noqa: E402

from llmbook.pipeline.c4 import C4Quality, C4Thresholds, count_sentences, datatrove_sentence_counter  # noqa: E402
from llmbook.pipeline.document import Document  # noqa: E402
from llmbook.pipeline.gopher import (  # noqa: E402
    PUNCTUATION,
    GopherQuality,
    GopherThresholds,
    compare_with_datatrove,
    datatrove_splitter,
    split_words,
)
from llmbook.pipeline.repetition import GopherRepetition, RepetitionThresholds  # noqa: E402


def theirs(filt, text: str) -> tuple[str | None, str]:
    doc = DTDocument(text=text, id="x")
    result = filt.filter(doc)
    if result is True:
        return None, doc.text
    return (result[1] if isinstance(result, tuple) else "dropped"), doc.text


def words(n: int, word: str = "cats") -> str:
    return " ".join([word] * n)


PROSE = "the cats and the dogs slept with their owners. "  # 9 words, 3 of Gopher's stop words


# --- Gopher quality: each rule exactly at its threshold (kept) and just over it (dropped)
GOPHER_CASES = {
    "49 words": ("the and " + words(47), "gopher_short_doc"),
    "50 words": ("the and " + words(48), None),
    "mean length exactly 3": ("the and " + words(48, "cat"), None),
    "mean length just under 3": ("the and " + words(47, "cat") + " at", "gopher_below_avg_threshold"),
    "mean length exactly 10": ("the and " + words(60, "abcdefghij") + " " + words(2, "abcdefghijklmnopq"), None),
    "mean length over 10": ("the and " + words(60, "abcdefghijk"), "gopher_above_avg_threshold"),
    "hashes 10%": ("the and " + words(88) + " #" * 10, None),
    "hashes over 10%": ("the and " + words(88) + " #" * 11, "gopher_too_many_hashes"),
    "ellipses over 10%": ("the and " + words(88) + " …" * 11, "gopher_too_many_ellipsis"),
    "90% bullet lines": ("\n".join(["- " + PROSE] * 9 + [PROSE]), None),
    "all bullet lines": ("\n".join(["• " + PROSE] * 10), "gopher_too_many_bullets"),
    "30% lines end in ...": ("\n".join([PROSE + "and so..."] * 3 + [PROSE * 2] * 7), None),
    "40% lines end in ...": ("\n".join([PROSE + "and so..."] * 4 + [PROSE * 2] * 6), "gopher_too_many_end_ellipsis"),
    "80% alphabetic": ("the and " + words(78) + " 123" * 20, None),
    "79% alphabetic": ("the and " + words(77) + " 123" * 21, "gopher_below_alpha_threshold"),
    "two stop words": ("the and " + words(60), None),
    "one stop word": ("the " + words(60), "gopher_enough_stop_words"),
    "capitalised stop words do not count": ("The And " + words(60), "gopher_enough_stop_words"),
    "empty": ("", "gopher_short_doc"),
    "whitespace only": (" \n\t \n", "gopher_short_doc"),
    "non-ASCII prose, 80% alphabetic": (
        (
            "the naïve café and the Straße of the city with ½ of ² — “quoted” "
            "here over the long river today and tomorrow\n"
        )
        * 8,
        None,
    ),
}


@pytest.mark.parametrize("case", list(GOPHER_CASES))
def test_gopher_boundaries_match_datatrove(case):
    text, expected = GOPHER_CASES[case]
    reference, _ = theirs(GopherQualityFilter(), text)
    assert reference == expected, f"the case is not at the boundary it claims: datatrove says {reference}"
    assert GopherQuality(split=datatrove_splitter()).reason(text) == expected
    assert GopherQuality().reason(text) == expected  # the fast splitter on plain text


def test_gopher_thresholds_are_respected():
    text = "the and " + words(58) + "\n- a list item"
    ours = GopherQuality(GopherThresholds(min_doc_words=70, max_doc_words=None))
    assert ours.reason(text) == theirs(GopherQualityFilter(min_doc_words=70, max_doc_words=None), text)[0]
    assert ours.reason(text) == "gopher_short_doc"
    small = GopherThresholds(max_doc_words=55)
    assert (
        GopherQuality(small).reason(text) == "gopher_long_doc" == theirs(GopherQualityFilter(max_doc_words=55), text)[0]
    )
    off = GopherThresholds(min_stop_words=None)
    assert (
        GopherQuality(off).reason(words(60)) is None is theirs(GopherQualityFilter(min_stop_words=None), words(60))[0]
    )


def test_punctuation_is_datatrove_s():
    from datatrove.utils.text import PUNCTUATION_SET
    from spacy.pipeline import Sentencizer

    from llmbook.pipeline.c4 import SENTENCE_END

    assert set(PUNCTUATION) == PUNCTUATION_SET
    assert SENTENCE_END == set(Sentencizer.default_punct_chars)


def test_split_words_imitates_spacy():
    spacy_words = datatrove_splitter()
    for text in [
        "Hello, world. Don't can't won't it's I'm we'll they've.",
        "Mr. Smith paid $5 (10%) at 9:30 on 1,000 U.S. e.g. co-op e-mail foo@bar.com http://x.org/a?b=1.",
        "Lizzy!--how \"--and said,--\"no end--\"Yes, cannot gonna O'Neil's arm'd",
        "naïve café Straße 你好世界 Привет мир.",
    ]:
        assert split_words(text) == spacy_words(text), text


# --- Gopher repetition
ANY = "whatever datatrove says"


def distinct_lines(n: int) -> list[str]:
    return [" ".join(f"w{i}x{j}" for j in range(8)) for i in range(n)]


REPETITION_CASES = {
    "empty": ("", "empty"),
    "whitespace only": ("   \n \t ", None),
    "3 of 10 lines repeat": ("\n".join(distinct_lines(6) + ["ok"] * 4), None),
    "4 of 10 lines repeat": ("\n".join(distinct_lines(5) + ["ok"] * 5), "dup_line_frac"),
    "3 of 10 paragraphs repeat": ("\n\n".join(distinct_lines(6) + ["ok"] * 4), None),
    "4 of 10 paragraphs repeat": ("\n\n".join(distinct_lines(5) + ["ok"] * 5), "dup_para_frac"),
    "a long paragraph twice": ("\n\n".join(distinct_lines(8) + ["y" * 200] * 2), "dup_para_char_frac"),
    "a long line twice": ("\n".join(distinct_lines(8) + ["y" * 200] * 2), "dup_line_char_frac"),
    "top 2-gram": ("buy now " * 30 + "please", "top_2_gram"),
    "a repeated 5-gram": (" ".join(f"w{i}" for i in range(40)) + " " + " ".join(f"w{i}" for i in range(12)), ANY),
    "a repeated 10-gram": (
        " ".join(f"word{i}" for i in range(60)) + " " + " ".join(f"word{i}" for i in range(10)),
        ANY,
    ),
    "prose": (" ".join(distinct_lines(30)) + ". The end, as it was; and more.", None),
    "non-ASCII": ("Ελληνικά κείμενα εδώ και εκεί.\n\nΤο ίδιο; όχι.\n\n" + "日本語の文章です。" * 3, ANY),
}


@pytest.mark.parametrize("case", list(REPETITION_CASES))
def test_repetition_matches_datatrove(case):
    text, expected = REPETITION_CASES[case]
    reference, _ = theirs(GopherRepetitionFilter(), text)
    assert expected is ANY or reference == expected, f"datatrove says {reference}"
    assert GopherRepetition(split=datatrove_splitter()).reason(text) == reference
    if case != "non-ASCII":
        assert GopherRepetition().reason(text) == reference


def test_repetition_thresholds_are_respected():
    text = "buy now " * 30 + "please"
    loose = RepetitionThresholds(top_n_grams=((2, 0.99),), dup_n_grams=())
    assert GopherRepetition(loose).reason(text) is None
    reference = GopherRepetitionFilter(top_n_grams=((2, 0.99),), dup_n_grams=())
    assert theirs(reference, text)[0] is None
    assert GopherRepetition(RepetitionThresholds(top_n_grams=())).reason(text) == "duplicated_5_n_grams"


# --- C4: lines removed, pages dropped, the kept text equal to datatrove's
SENTENCE = "This line is a proper sentence."
C4_CASES = {
    "five sentence lines": ("\n".join([SENTENCE] * 5), None),
    "four sentence lines": ("\n".join([SENTENCE] * 4), "too_few_sentences"),
    "four lines, five sentences": ("\n".join([SENTENCE] * 3 + ["He left. Then she did too."]), None),
    "abbreviations do not end sentences": (
        "\n".join([SENTENCE] * 3 + ["Mr. Smith met Dr. Jones."]),
        "too_few_sentences",
    ),
    "menus and short lines removed": ("Home | About | Contact\nClick here\n" + "\n".join([SENTENCE] * 5), None),
    "javascript and policy lines removed": (
        "Please enable JavaScript to view this page.\nRead our Privacy Policy here.\n" + "\n".join([SENTENCE] * 5),
        None,
    ),
    "lorem ipsum": ("\n".join([SENTENCE] * 5 + ["Lorem ipsum dolor sit amet."]), "lorem_ipsum"),
    "curly bracket": ("\n".join([SENTENCE] * 5 + ["function f() { return 1; }."]), "curly_bracket"),
    "citations removed": ("\n".join([SENTENCE + "[1]"] * 5 + ["Ends with a citation. [2]"]), None),
    "ellipsis lines removed": ("\n".join([SENTENCE] * 5 + ["And then..."]), None),
    "a 1001-character word": ("\n".join([SENTENCE] * 5 + ["a b " + "x" * 1001 + "."]), None),
    "empty": ("", "too_few_sentences"),
    "whitespace only": ("  \n\t\n ", "too_few_sentences"),
    "non-ASCII": ("\n".join(["Ceci est une phrase française, n'est-ce pas ?"] * 5), None),
}


@pytest.mark.parametrize("case", list(C4_CASES))
def test_c4_matches_datatrove(case):
    text, expected = C4_CASES[case]
    reference, kept = theirs(C4QualityFilter(), text)
    assert reference == expected, f"datatrove says {reference}"
    for ours in (C4Quality(count=datatrove_sentence_counter()), C4Quality()):
        new_text, why = ours.clean(text)
        assert why == expected
        if why is None:
            assert new_text == kept


def test_c4_apply_returns_the_kept_text():
    text = "Menu\nHome\n" + "\n".join([SENTENCE] * 5)
    doc, why = C4Quality().apply(Document("d1", text, {"lang": "en"}))
    assert why is None and doc.text == "\n".join([SENTENCE] * 5) and doc.metadata == {"lang": "en"} and doc.id == "d1"
    doc, why = C4Quality().apply(Document("d2", "lorem ipsum dolor sit amet.\n" * 5))
    assert why == "c4_quality:lorem_ipsum"
    assert C4Quality(C4Thresholds(filter_lorem_ipsum=False)).reason("lorem ipsum dolor sit amet.\n" * 5) is None


def test_count_sentences():
    assert count_sentences("He left. Then? She stayed.") == 3
    assert count_sentences("Mr. Smith left.") == 1
    assert count_sentences("Wait... then go.") == 1
    assert count_sentences('He said "Stop." Then left.') == 2
    assert count_sentences("") == 1


@pytest.mark.parametrize("text", ["", " ", "\n\n\n", "\ud800 the \udfff and", "\x00\x01\x02", "#" * 500, "…" * 100])
def test_bad_input_never_crashes(text):
    for filt in (GopherQuality(), GopherRepetition(), C4Quality()):
        filt.reason(text)
        doc, _ = filt.apply(Document("x", text))
        assert isinstance(doc.text, str)


# --- on the dirty corpus
@pytest.fixture(scope="module")
def corpus():
    from llmbook.pipeline.dirty_corpus import CorpusConfig, make_corpus

    return make_corpus(CorpusConfig(n_docs=150, seed=3))


def test_identical_to_datatrove_with_its_words(corpus):
    report = compare_with_datatrove(corpus[:60], exact=True)
    for name, row in report.items():
        assert row["agree"] == row["agree_reason"] == row["agree_text"] == row["n"] == 60, (name, row["examples"])


# With the fast regex splitter the words differ from spaCy's on raw HTML markup, Chinese (spaCy keeps a
# run of characters between spaces whole), symbol gibberish and a few of spaCy's special cases. Measured
# on 2,000 corpus pages (seed 0): quality 99.7%, repetition 97.6%, C4 100% same keep/drop; on its 1,823
# English plain-text pages (what the rules see after HTML extraction and language identification):
# 100%, 99.95% (one gibberish page), 100%. Stated floors for this small corpus:
FAST_AGREEMENT = {"gopher_quality": 0.97, "gopher_repetition": 0.93, "c4_quality": 0.99}


def test_fast_splitter_agreement(corpus):
    report = compare_with_datatrove(corpus)
    for name, row in report.items():
        assert row["agreement"] >= FAST_AGREEMENT[name], (name, row["agreement"], row["examples"])


def test_ngram_counts_equal_datatrove_s_on_random_words():
    """Hashed n-grams give datatrove's counts: ties (first seen wins), jumps, and its "".join keys."""
    import random

    from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate, find_top_duplicate, get_n_grams

    from llmbook.pipeline.repetition import NGrams, duplicated_ngram_chars, top_ngram_chars

    rng = random.Random(0)
    vocab = ["a", "b", "ab", "ba", "c", "bc", "abc", "the", "ünï", "—"]
    for _ in range(300):
        words = [rng.choice(vocab[: rng.randint(2, len(vocab))]) for _ in range(rng.randint(0, 40))]
        grams = NGrams(words)
        for n in (2, 3, 4):
            expected = find_top_duplicate(get_n_grams(words, n)) if len(words) >= n else 0
            assert top_ngram_chars(grams, n) == expected, (words, n)
        for n in range(5, 11):
            assert duplicated_ngram_chars(grams, n) == find_all_duplicate(words, n), (words, n)
