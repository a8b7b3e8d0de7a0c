"""llmbook.posttrain.tasks: a reproducible, leak-free verifiable task whose checkers grade exactly."""

from __future__ import annotations

import doctest
import hashlib
import math
import os
import random
import subprocess
import sys

import pytest

from llmbook import data
from llmbook.posttrain import tasks
from llmbook.posttrain.tasks import TaskItem


def _has_books() -> bool:
    try:
        return all(data.local_copy(n) is not None for n in ("tinyshakespeare", "pride_and_prejudice"))
    except data.ChecksumError:
        return False


needs_books = pytest.mark.skipif(not _has_books(), reason="Tiny Shakespeare or Pride and Prejudice not available")


@pytest.fixture(scope="module")
def split():
    if not _has_books():
        pytest.skip("Tiny Shakespeare or Pride and Prejudice not available")
    return tasks.make_task_split(0)


def _digest(items: list[TaskItem]) -> str:
    return hashlib.sha256(repr(items).encode()).hexdigest()


def _item(family: str, line: str, seed: int = 0) -> TaskItem:
    return tasks.make_item(family, line, "shakespeare", random.Random(seed))


# --- the split: sizes, determinism, no leakage ---------------------------------------------------------------


def test_split_sizes_and_balance(split):
    assert (len(split.train), len(split.val), len(split.test)) == (2000, 200, 400)
    for items in (split.train, split.val, split.test):
        counts = {f: sum(i.family == f for i in items) for f in tasks.FAMILIES}
        assert set(counts.values()) == {len(items) // 4}, counts  # families in turn
        assert {i.source for i in items} == {"shakespeare", "austen"}
    assert sum(i.source == "austen" for i in split.test) >= 150  # both books well represented in the test set


def test_split_is_deterministic_across_processes(split):
    again = tasks.make_task_split(0)
    assert again == split
    code = ("import hashlib; from llmbook.posttrain import tasks; "
            "print(hashlib.sha256(repr(tasks.make_task_split(0).test).encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # set and str hashing differ from this process's
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == _digest(split.test)
    assert _digest(tasks.make_task_split(1, 40, 8, 40).test) != _digest(split.test[:40])


def test_splits_share_no_source_line(split):
    lines = {name: {i.line.lower() for i in getattr(split, name)} for name in ("train", "val", "test")}
    assert not lines["train"] & lines["test"]
    assert not lines["train"] & lines["val"]
    assert not lines["val"] & lines["test"]
    for name, items in (("train", split.train), ("test", split.test)):
        assert len(lines[name]) == len(items)  # each line makes one item
        assert all(tasks.split_of(i.line, 0) == name for i in items)
    # nor does a test line hide inside a training prompt or answer
    train_text = "\n".join(i.prompt + "\n" + i.reference for i in split.train).lower()
    assert sum(i.line.lower() in train_text for i in split.test) <= 4  # only a few short lines such as "Go to, go to."


def test_test_set_does_not_depend_on_the_training_size(split):
    small = tasks.make_task_split(0, n_train=100, n_val=10, n_test=400)
    assert small.test == split.test


def test_held_out_prompts_are_enough():
    assert tasks.make_task_split.__defaults__[2] >= 200  # n_test: the issue asks for >= 200 held-out prompts


# --- checkers ---------------------------------------------------------------------------------------------------


def test_every_reference_passes_its_own_checker(split):
    for item in split.train + split.val + split.test:
        assert item.check(item.reference) == 1.0, item
        assert item.passed(item.reference)


def test_trivial_answers_fail(split):
    other = split.test[1:] + split.test[:1]
    for item, wrong in zip(split.test, other, strict=True):
        assert item.check("") == 0.0
        assert not item.passed(item.input or item.instruction)  # echoing the prompt
        assert not item.passed(item.prompt)
        if item.family == "capitals":
            assert not item.passed(item.line)  # a book line, not in capitals
            assert not item.passed(item.reference.lower())
        if item.family in ("short_line", "capitals"):
            continue  # any answer of the kind passes, another item's too: these families measure a habit
        if wrong.family == item.family == "word_in_limit" and item.word.lower() in wrong.reference.lower():
            continue  # another line may happen to use the word
        assert not item.passed(wrong.reference), (item, wrong.reference)


def test_echo_baseline_scores_are_low(split):
    echo = [i.input or i.instruction for i in split.test]
    score = tasks.score_responses(split.test, echo)
    assert score.successes == 0
    means = {f: s.mean_score for f, s in score.per_family.items()}
    assert means["capitals"] < 0.1 and means["last_word"] < 0.2 and means["short_line"] < 0.9
    assert means["word_in_limit"] == 0.5  # uses the word, but the instruction is longer than the limit


@pytest.mark.parametrize("wrap", [
    "{}", "  {}  ", "\n{}\n", "{}<|im_end|>", "{}<|im_end|>\n<|im_start|>user\nmore", "{}<|endoftext|>### Instruction:",
    " {} \n<|endoftext|><|endoftext|>",
])
def test_whitespace_and_end_tokens_do_not_matter(wrap):
    for family in tasks.FAMILIES:
        item = _item(family, "Before we proceed any further, hear me speak.")
        assert item.check(wrap.format(item.reference)) == 1.0, (family, wrap)


def test_runaway_text_after_the_answer_costs():
    item = _item("last_word", "You are all resolved rather to die than to famish?")
    assert item.reference == "famish"
    # "###" is all punctuation, so no word: famish, Instruction, Write -> 1 of 3 words right
    assert item.check("famish\n\n### Instruction:\nWrite") == pytest.approx(1 / 3)
    assert item.check("The last word is famish.") == pytest.approx(1 / 5)
    assert item.check("famish.") == 1.0 and item.check("Famish") == 0.0  # punctuation is ignored, case is not


def test_partial_scores_of_the_habit_families():
    short = _item("short_line", "Before we proceed any further, hear me speak.")
    n = short.count
    assert tasks.MIN_WORDS <= n <= tasks.MAX_SHORT and short.instruction == f"Write a line of no more than {n} words."
    assert short.check("One two three") == 1.0 and short.check("One two") == pytest.approx(2 / 3)
    assert short.check(" ".join(["word"] * (2 * n))) == pytest.approx(0.5)  # twice too long: half
    caps = _item("capitals", "Before we proceed any further, hear me speak.")
    assert caps.input == "" and caps.reference == "BEFORE WE PROCEED ANY FURTHER, HEAR ME SPEAK."
    assert caps.check("BEFORE WE PROCEED any FURTHER, HEAR ME SPEAK.") == pytest.approx(7 / 8)
    assert caps.check("O ROMEO, ROMEO") == 1.0  # any line in capitals, commas ignored
    assert caps.check("ROMEO") == pytest.approx(1 / 3)  # too short: 3 words at least
    assert caps.check("THE THE THE") == 1.0  # the documented loophole
    with pytest.raises(ValueError, match="cannot make a short_line item"):
        _item("short_line", "You are all resolved rather to die than to famish?")


def test_word_in_limit_grades_both_constraints():
    item = _item("word_in_limit", "It is a truth universally acknowledged")
    n, w = item.count, item.word
    assert 6 <= n <= tasks.MAX_LIMIT and w.lower() in {"truth", "universally", "acknowledged"}
    assert item.check(f"Sweet {w.upper()} is mine.") == 1.0  # any casing of the word
    assert item.check(f"{w} " + "and so " * n) == 0.5  # uses the word, too long
    assert item.check(w) == 0.5  # uses the word, too short (at least 3 words)
    assert item.check("a line without it") == 0.5  # right length, no word
    assert item.check(f"{w}s are fine here") == 0.5  # a whole word: "truths" is not "truth"
    assert item.check("") == 0.0
    assert item.check(f"{w} {w} {w}") == 1.0  # the documented loophole: only the two constraints are checked


def test_make_item_and_make_items_errors():
    with pytest.raises(ValueError, match="unknown task family"):
        _item("poetry", "Before we proceed any further, hear me speak.")
    pool = {"shakespeare": ["Before we proceed any further, hear me speak."], "austen": []}
    with pytest.raises(ValueError, match="ran out of lines"):
        tasks.make_items(pool, 2, random.Random(0))
    with pytest.raises(ValueError, match="sizes must be"):
        tasks.make_task_split(0, n_train=-1)


def test_messages_match_the_alpaca_record_shape():
    from llmbook.posttrain.templates import ALPACA, CHATML, to_alpaca

    item = _item("last_word", "Before we proceed any further, hear me speak.")
    record = to_alpaca(item.messages())
    assert record == {"instruction": item.instruction, "input": item.input, "output": item.reference}
    assert "### Input:\nBefore we proceed" in ALPACA.apply_template(item.messages())
    assert CHATML.apply_template(item.messages(with_reference=False), add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n")
    limit = _item("word_in_limit", "It is a truth universally acknowledged")
    assert limit.input == "" and limit.prompt == limit.instruction and len(limit.messages()) == 2


# --- source lines ------------------------------------------------------------------------------------------------


def test_shakespeare_lines_skip_speaker_names():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\nThus:\n"
    assert tasks.shakespeare_lines(text) == ["Before we proceed any further, hear me speak.", "Speak, speak.", "Thus:"]


def test_usable_lines():
    assert tasks.usable("Before we proceed any further, hear me speak.")
    assert tasks.usable("He was a tall, heavy-looking young man of five-and-twenty.")
    assert not tasks.usable("Speak, speak.")  # too short
    assert not tasks.usable("Thank you--but I always mend my own.")  # a dash glues two words
    assert not tasks.usable("GOD SAVE KING HENRY, UNKING'D RICHARD SAYS")  # already in capitals
    assert not tasks.usable("Hunsford, near Westerham, Kent, 15th October.")  # digits


@needs_books
def test_source_lines_come_from_both_books():
    lines = tasks.source_lines()
    assert len(lines["shakespeare"]) > 20_000 and len(lines["austen"]) > 2_000
    assert "It is a truth universally acknowledged" not in lines["austen"]  # too long (23 words): not usable
    assert "Mr. Bennet made no answer." in lines["austen"]
    assert not any("gutenberg" in x.lower() for x in lines["austen"])


def test_docstring_examples():
    assert doctest.testmod(tasks).failed == 0


# --- success rate with a Wilson interval -------------------------------------------------------------------------


def test_wilson_interval_hand_computed():
    # 8 of 10, z = 1.96: center = (0.8 + 1.96^2/20) / (1 + 1.96^2/10) = 0.71674,
    # half = 1.96 / 1.38415 * sqrt(0.016 + 1.96^2/400) = 0.22658  ->  (0.4902, 0.9433)
    low, high = tasks.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    low, high = tasks.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)  # not a zero-width interval at 0%
    assert tasks.wilson_interval(0, 400)[1] == pytest.approx(0.0095, abs=1e-4)
    for k in (0, 3, 17, 40):  # symmetric: k successes and k failures mirror each other
        low, high = tasks.wilson_interval(k, 40)
        mirror_low, mirror_high = tasks.wilson_interval(40 - k, 40)
        assert (low, high) == pytest.approx((1 - mirror_high, 1 - mirror_low))
        assert low <= k / 40 <= high
    # for large n it approaches the normal interval p +- z sqrt(p (1-p) / n)
    low, high = tasks.wilson_interval(50_000, 100_000)
    assert high - 0.5 == pytest.approx(1.959964 * math.sqrt(0.25 / 100_000), rel=1e-4)


def test_wilson_interval_matches_statsmodels():
    proportion = pytest.importorskip("statsmodels.stats.proportion")
    for k, n in ((0, 10), (8, 10), (37, 200), (200, 200)):
        assert tasks.wilson_interval(k, n) == pytest.approx(proportion.proportion_confint(k, n, method="wilson"))


@pytest.mark.parametrize("k,n", [(1, 0), (-1, 10), (11, 10)])
def test_wilson_interval_bad_input(k, n):
    with pytest.raises(ValueError, match="successes <= n"):
        tasks.wilson_interval(k, n)


def test_score_responses_counts_and_families():
    items = [_item(f, "Before we proceed any further, hear me speak.") for f in tasks.FAMILIES]
    responses = [items[0].reference, "wrong", items[2].reference, "no"]
    score = tasks.score_responses(items, responses)
    assert (score.n, score.successes, score.rate) == (4, 2, 0.5)
    assert (score.low, score.high) == tasks.wilson_interval(2, 4)
    assert score.per_family["short_line"].successes == 1 and score.per_family["capitals"].successes == 0
    assert score.mean_score == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert "50.0% [" in str(score)
    with pytest.raises(ValueError, match="one response per item"):
        tasks.score_responses(items, responses[:3])
    with pytest.raises(ValueError, match="one response per item"):
        tasks.score_responses([], [])
