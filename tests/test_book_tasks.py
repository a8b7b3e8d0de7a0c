"""The book's multiple-choice task: held-out text only, the gold is the real continuation, seeded, lm-eval's format."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from llmbook import data, loader
from llmbook.evaluation import book_tasks
from llmbook.evaluation.book_tasks import continuation_items, held_out_text, write_task
from llmbook.evaluation.multiple_choice import MCItem


def _has_books() -> bool:
    try:
        return all(data.local_copy(n) is not None for n in ("tinyshakespeare", "pride_and_prejudice"))
    except data.ChecksumError:
        return False


needs_books = pytest.mark.skipif(not _has_books(), reason="Tiny Shakespeare or Pride and Prejudice not available")


def _squash(text: str) -> str:
    return " ".join(text.split())


@needs_books
@pytest.mark.parametrize("source, name", [("shakespeare", "tinyshakespeare"), ("austen", "pride_and_prejudice")])
def test_held_out_text_is_after_every_models_training_split(source, name):
    text = data.read_text(name)
    held = held_out_text(source)
    assert held and text.endswith(held)
    start = len(text) - len(held)
    raw_train, _ = loader.split_text(text, 0.1)  # "shakespeare": prepare_data on the file
    assert start > len(raw_train)
    mixture_train, _ = loader.mixture_split("english")  # "english": every source stripped, then split
    stripped_train = loader.split_text(text.strip("\n"), 0.1)[0]
    assert mixture_train.count(stripped_train) == 1 and held not in mixture_train
    assert start >= len(text) - len(text.lstrip("\n")) + len(stripped_train)
    assert text[start - 1] == "\n"  # starts at a whole line


@needs_books
@pytest.mark.parametrize("source", ["shakespeare", "austen"])
def test_items_are_real_continuations_with_matched_distractors(source):
    items = continuation_items(source, n=60, seed=3)
    held = held_out_text(source)
    delimiter = book_tasks.DELIMITERS[source]
    assert len(items) == 60 and len({i.id for i in items}) == 60
    for item in items:
        gold = item.choices[item.gold]
        if source == "shakespeare":
            assert item.context + delimiter + gold + "\n" in held  # the passage and its true next line
        else:
            assert _squash(item.context + delimiter + gold) in _squash(held)
        assert 0 < len(item.context) <= 200 + 80
        assert len(set(c.lower() for c in item.choices)) == 4
        for choice in item.choices:
            assert abs(len(choice) - len(gold)) <= max(5, len(gold) // 5)
            assert _squash(choice) in _squash(held)  # distractors are held-out text too
    assert max(Counter(i.gold for i in items).values()) < 30  # the answer's position is drawn, not fixed


@needs_books
def test_items_are_deterministic_and_seeded():
    a = continuation_items("shakespeare", n=20, seed=0)
    assert a == continuation_items("shakespeare", n=20, seed=0)
    assert a != continuation_items("shakespeare", n=20, seed=1)
    assert all(isinstance(i, MCItem) for i in a)


@needs_books
def test_bad_requests_give_clear_errors():
    with pytest.raises(ValueError, match="unknown source 'hamlet'"):
        continuation_items("hamlet", n=5)
    with pytest.raises(ValueError, match="ask for fewer"):
        continuation_items("shakespeare", n=10**6)
    with pytest.raises(ValueError, match="positive"):
        continuation_items("austen", n=0)


def test_write_task_is_lm_evals_yaml_and_a_jsonl(tmp_path):
    items = [MCItem("a", "It is a truth", ("universally acknowledged.", "red."), 0),
             MCItem("b", "O Romeo, Romeo,", ("wherefore art thou Romeo?", "it's a \"quote\""), 1)]
    path = write_task(items, tmp_path / "tasks", "book_test", delimiter="\n")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    jsonl = tmp_path / "tasks" / "book_test.jsonl"
    assert config == {
        "task": "book_test", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(jsonl.resolve())}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
        "doc_to_target": "gold", "target_delimiter": "\n",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    assert book_tasks.read_items(jsonl) == items
    with pytest.raises(ValueError, match="at least one item"):
        write_task([], tmp_path, "empty")


@needs_books
def test_swapped_and_shuffled_distractors_are_the_golds_words():
    for kind in ("swapped", "shuffled"):
        for item in continuation_items("austen", n=20, seed=1, kind=kind):
            gold = item.choices[item.gold].split()
            for k, choice in enumerate(item.choices):
                assert sorted(choice.split()) == sorted(gold)  # the same words: only their order differs
                if k != item.gold:
                    differ = [i for i, (a, b) in enumerate(zip(choice.split(), gold, strict=True)) if a != b]
                    assert differ and (kind == "shuffled" or (len(differ) == 2 and differ[1] == differ[0] + 1))
            assert len(set(item.choices)) == 4
    with pytest.raises(ValueError, match="unknown kind"):
        continuation_items("austen", n=2, kind="random")


@needs_books
def test_speaker_items_differ_only_in_the_name():
    items = book_tasks.speaker_items(n=30, seed=0)
    held = held_out_text("shakespeare")
    assert items == book_tasks.speaker_items(n=30, seed=0)
    for item in items:
        assert item.context + book_tasks.SPEAKER_DELIMITER + item.choices[item.gold] + "\n" in held
        names = [c.split(":\n", 1)[0] for c in item.choices]
        lines = {c.split(":\n", 1)[1] for c in item.choices}
        assert len(set(names)) == 4 and len(lines) == 1
        assert all(f"\n\n{name}:\n" in held for name in names)  # every name heads a held-out speech
