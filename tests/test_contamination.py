"""Contamination: planted overlaps are found, clean items score 0, chunked streaming changes nothing."""

from __future__ import annotations

import random

import pytest

from llmbook import data
from llmbook.evaluation import book_tasks
from llmbook.evaluation.contamination import (
    check_contamination,
    finetuning_text,
    ngram_hash,
    ngrams,
    training_ngrams_in,
    training_text,
    words,
)
from llmbook.evaluation.multiple_choice import MCItem

rng = random.Random(0)
VOCAB = [f"w{i}" for i in range(500)]
TRAIN = " ".join(rng.choice(VOCAB) for _ in range(5000))
TRAIN_WORDS = TRAIN.split()


def _fresh(n_words: int, seed: int) -> str:
    """Words the training text never uses: no n-gram of it can be there."""
    r = random.Random(seed)
    return " ".join(r.choice(["alpha", "beta", "gamma", "delta", "kappa"]) for _ in range(n_words))


def test_words_ignore_case_punctuation_and_line_breaks():
    assert words("Good morrow,\nNeighbour GREMIO!  I'll go.") == ["good", "morrow", "neighbour", "gremio", "i'll", "go"]
    assert ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")] and ngrams(["a"], 2) == []
    assert ngram_hash(("a", "b")) == ngram_hash(["a", "b"]) != ngram_hash(("b", "a"))


def test_planted_overlaps_are_found_and_clean_items_score_zero():
    copied = " ".join(TRAIN_WORDS[1000:1040])  # 40 training words: 28 13-grams, all in training
    half = " ".join(TRAIN_WORDS[2000:2020]) + " " + _fresh(20, 1)  # the first 20 words copied
    reformatted = "\n".join(w.upper() + "," for w in TRAIN_WORDS[3000:3030])  # the same words, other typography
    items = [("copied", copied), ("clean", _fresh(40, 2)), ("half", half), ("reformatted", reformatted),
             ("short", "w1 w2 w3")]
    report = check_contamination(items, TRAIN, n=13, threshold=0.5)
    by_id = {r.id: r for r in report.items}
    assert (by_id["copied"].ngrams, by_id["copied"].overlapping, by_id["copied"].fraction) == (28, 28, 1.0)
    assert by_id["copied"].contaminated and by_id["reformatted"].contaminated
    assert by_id["clean"].overlapping == 0 and by_id["clean"].fraction == 0.0 and not by_id["clean"].contaminated
    assert by_id["half"].overlapping == 8 and by_id["half"].ngrams == 28 and not by_id["half"].contaminated
    assert by_id["short"].ngrams == 0 and not by_id["short"].contaminated  # shorter than n: nothing to check
    assert by_id["copied"].examples[0] in " ".join(TRAIN_WORDS)
    assert report.contaminated == ["copied", "reformatted"] and report.any_overlap == 3
    assert report.rate == pytest.approx(2 / 5) and report.training_words == 5000
    assert "2 of 5 items contaminated" in str(report) and "CONTAMINATED" in str(by_id["copied"])
    # a lower threshold flags the half-copied item too (GPT-3's rule, "any shared 13-gram", is threshold ~0)
    assert "half" in check_contamination(items, TRAIN, n=13, threshold=0.01).contaminated


def test_streaming_in_any_chunks_gives_the_same_answer(tmp_path):
    wanted = {ngram_hash(g) for g in ngrams(TRAIN_WORDS[100:200], 8)} | {ngram_hash(("no",) * 8)}
    whole = training_ngrams_in(wanted, TRAIN, 8)
    r = random.Random(1)
    cuts = sorted(r.sample(range(1, len(TRAIN)), 300))
    chunks = [TRAIN[a:b] for a, b in zip([0, *cuts], [*cuts, len(TRAIN)], strict=True)]  # words cut in two
    assert training_ngrams_in(wanted, iter(chunks), 8) == whole
    file = tmp_path / "train.txt"
    file.write_text(TRAIN.replace(" ", "\n", 50), encoding="utf-8")
    assert training_ngrams_in(wanted, file, 8) == whole
    assert len(whole[0]) == len(wanted) - 1 and whole[1] == 5000


def test_multiple_choice_items_are_checked_as_context_plus_gold():
    context = " ".join(TRAIN_WORDS[:10])
    gold = " ".join(TRAIN_WORDS[10:20])
    item = MCItem("mc", context, ("zeta zeta", gold), 1)
    assert check_contamination([item], TRAIN, n=13).items[0].fraction == 1.0
    wrong_gold = MCItem("mc2", context, ("zeta zeta", gold), 0)
    assert check_contamination([wrong_gold], TRAIN, n=13).items[0].overlapping == 0


def test_bad_input_gives_one_clear_line():
    with pytest.raises(ValueError, match="at least one evaluation item"):
        check_contamination([], TRAIN)
    with pytest.raises(ValueError, match="positive number of words"):
        check_contamination([("a", "b")], TRAIN, n=0)
    with pytest.raises(ValueError, match="threshold"):
        check_contamination([("a", "b")], TRAIN, threshold=0.0)
    with pytest.raises(ValueError, match="unknown model"):
        training_text("gpt4")
    with pytest.raises(ValueError, match="unknown SFT model 'sft-huge'"):
        finetuning_text("sft-huge")


def _has_books() -> bool:
    try:
        return all(data.local_copy(n) is not None for n in ("tinyshakespeare", "pride_and_prejudice"))
    except data.ChecksumError:
        return False


@pytest.mark.skipif(not _has_books(), reason="Tiny Shakespeare or Pride and Prejudice not available")
def test_the_book_task_is_clean_and_a_copied_item_is_flagged():
    train = training_text("shakespeare")
    items = book_tasks.continuation_items("shakespeare", n=50)
    passage = train[200_000:200_300]
    copied = MCItem("copied-from-training", passage, ("First Citizen:", "Second Citizen:"), 0)
    report = check_contamination([*items, copied], train, n=13, delimiter="\n")
    assert report.contaminated == ["copied-from-training"]
    assert report.any_overlap == 1  # the held-out items share not even one 13-gram with the training text
