"""The field's harness: lm-eval running the book's local task on an llmbook model agrees exactly with our scorer.

The central claim of Chapter 11's evaluation part: lm-eval (its task loading, request building, tokenization
split and metrics) and ``multiple_choice.score_items`` (all from scratch) give *identical* per-item
log-likelihoods and the same acc and acc_norm on the same items. Tiny random models: seconds.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from llmbook import data
from llmbook.bpe.tokenizer import Tokenizer
from llmbook.bpe.train import train_bpe
from llmbook.evaluation import book_tasks, harness
from llmbook.evaluation.harness import LlmbookLM, run_task
from llmbook.evaluation.multiple_choice import MCItem, accuracy, score_items
from llmbook.generate import generate
from llmbook.model import GPT, ModelConfig

pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py

ENDOFTEXT = "<|endoftext|>"
TEXT = ("Good morrow, neighbour Baptista. Good morrow, neighbour Gremio. God save you, gentlemen! "
        "And you, good sir! Pray, have you not a daughter call'd Katharina, fair and virtuous? ") * 20


def _has_books() -> bool:
    try:
        return all(data.local_copy(n) is not None for n in ("tinyshakespeare", "pride_and_prejudice"))
    except data.ChecksumError:
        return False


needs_books = pytest.mark.skipif(not _has_books(), reason="Tiny Shakespeare or Pride and Prejudice not available")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    vocab, merges = train_bpe(TEXT, 300, special_tokens=[ENDOFTEXT])
    return Tokenizer(vocab, merges, [ENDOFTEXT])


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    # context 128 tokens: with this small BPE some of the book task's ~200-character passages do not fit, so
    # lm-eval's left truncation is exercised too (asserted below)
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=320, context_length=128, d_model=32, n_layers=2, n_heads=2)).eval()


def _agree(model, tokenizer, items, folder, name, delimiter):
    """Run the task through lm-eval and through score_items; assert they agree item by item."""
    book_tasks.write_task(items, folder, name, delimiter=delimiter)
    per_item, metrics = run_task(model, tokenizer, folder, name)
    ours = score_items(model, tokenizer, items, delimiter=delimiter)
    assert [p["id"] for p in per_item] == [s.id for s in ours]
    for p, s, item in zip(per_item, ours, items, strict=True):
        assert p["gold"] == item.gold
        assert tuple(p["loglikelihoods"]) == s.logprobs  # exactly equal, not approximately
        assert tuple(p["greedy"]) == s.greedy
        assert (p["acc"], p["acc_norm"]) == (s.acc, s.acc_norm)
    ours_acc = accuracy(ours)
    assert metrics["acc"] == pytest.approx(ours_acc["acc"][0], abs=1e-12)
    assert metrics["acc_norm"] == pytest.approx(ours_acc["acc_norm"][0], abs=1e-12)
    assert metrics["n"] == len(items)
    return per_item, metrics


@needs_books
@pytest.mark.parametrize("source", ["shakespeare", "austen"])
def test_lm_eval_and_our_scorer_agree_on_the_book_task(model, tokenizer, tmp_path, source):
    items = book_tasks.continuation_items(source, n=12, seed=0)
    delimiter = book_tasks.DELIMITERS[source]
    longest = max(len(tokenizer.encode_ordinary(i.context + delimiter + c)) for i in items for c in i.choices)
    assert longest > model.cfg.context_length + 1  # some requests lose the left of their context
    _agree(model, tokenizer, items, tmp_path, f"book_{source}", book_tasks.DELIMITERS[source])


def test_agreement_with_tricky_tokenization(model, tokenizer, tmp_path):
    """A context ending in spaces (lm-eval moves them into the continuation), an empty context, apostrophes
    and quotes in choices, a choice merging with the delimiter, and unequal choice lengths (acc != acc_norm)."""
    items = [
        MCItem("space", "Good morrow, neighbour ", ("Baptista.", "Gremio.", "gentlemen and you, good sir"), 1),
        MCItem("empty", "", ("Good morrow", "call'd Katharina", 'a "daughter"'), 0),
        MCItem("quote", "Pray, have you not a daughter", ("call'd Katharina?", "x", "fair and virtuous, sir?"), 0),
        MCItem("long", TEXT[:400], ("God save you", "And", "neighbour Gremio. God save you, gentlemen!"), 2),
    ]
    per_item, _ = _agree(model, tokenizer, items, tmp_path, "tricky", " ")
    assert len(per_item) == 4


def test_rolling_loglikelihood_is_the_sum_of_token_logprobs(model, tokenizer):
    lm = LlmbookLM(model, tokenizer)
    text = "Good morrow, neighbour Gremio."
    ids = tokenizer.encode_ordinary(text)
    assert len(ids) < model.cfg.context_length
    (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    with torch.no_grad():
        logits, _ = model(torch.tensor([[tokenizer.special_tokens[ENDOFTEXT], *ids[:-1]]]))
    expected = F.log_softmax(logits[0].float(), dim=-1).gather(1, torch.tensor(ids)[:, None]).sum().item()
    assert ll == pytest.approx(expected, abs=1e-4)


def test_generate_until_is_greedy_and_stops_at_the_until_string(model, tokenizer):
    lm = LlmbookLM(model, tokenizer)
    context = "Good morrow,"
    ids = tokenizer.encode_ordinary(context)
    reference = tokenizer.decode(generate(model, [ids], 12, temperature=0.0, vocab_size=tokenizer.vocab_size)[0])
    requests = [Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 12}), 0)]
    assert lm.generate_until(requests, disable_tqdm=True) == [reference]
    stop = reference[2:4] if len(reference) >= 4 else reference[:1]
    requests = [Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 12}), 0)]
    (cut,) = lm.generate_until(requests, disable_tqdm=True)
    assert cut == reference.split(stop, 1)[0] and stop not in cut


def test_registered_in_lm_evals_model_registry():
    from lm_eval.api.registry import get_model

    assert get_model("llmbook") is LlmbookLM


def test_prefix_token_without_special_tokens():
    plain = Tokenizer({i: bytes([i]) for i in range(256)}, [], name="bytes")
    assert harness.prefix_id(plain) == ord("\n")


def test_task_files_load_offline(tmp_path):
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"  # set by harness before datasets is imported
    items = [MCItem(str(i), f"Question {i}?", ("yes", "no"), i % 2) for i in range(3)]
    path = book_tasks.write_task(items, tmp_path, "offline_check")
    manager = harness._task_manager(tmp_path, "offline_check")
    task = manager.load(["offline_check"])["tasks"]["offline_check"]
    docs = list(task.test_docs())
    assert [d["id"] for d in docs] == ["0", "1", "2"]
    assert task.doc_to_choice(docs[0]) == ["yes", "no"] and task.doc_to_target(docs[1]) == 1
    assert path == tmp_path / "offline_check.yaml" and (tmp_path / "offline_check.jsonl").is_file()
    assert book_tasks.read_items(tmp_path / "offline_check.jsonl") == items


def test_bad_input_gives_one_clear_line(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="at least one item"):
        book_tasks.write_task([], tmp_path, "empty")
    with pytest.raises(ValueError, match="does not exist"):
        run_task(model, tokenizer, tmp_path / "nowhere", "book")
    book_tasks.write_task([MCItem("a", "x", ("y", "z"), 0)], tmp_path, "real")
    with pytest.raises(ValueError, match=r"no task named 'other'.*real"):
        run_task(model, tokenizer, tmp_path, "other")
    with pytest.raises(ValueError, match="task name"):
        book_tasks.write_task([MCItem("a", "x", ("y", "z"), 0)], tmp_path, "bad name")
    with pytest.raises(ValueError, match="model and its tokenizer"):
        LlmbookLM()


def test_accuracy_is_a_fraction(model, tokenizer, tmp_path):
    items = [MCItem(str(i), TEXT[i * 7:i * 7 + 60], ("good sir", "gentlemen", "Katharina"), i % 3) for i in range(6)]
    book_tasks.write_task(items, tmp_path, "frac")
    per_item, metrics = run_task(model, tokenizer, tmp_path, "frac", limit=4)
    assert len(per_item) == 4 and metrics["n"] == 4
    assert math.isclose(metrics["acc"], sum(p["acc"] for p in per_item) / 4)


# --- suite: the evaluation table's logic, with tiny models injected ----------------------------------------------


@needs_books
def test_suite_table_with_injected_tiny_models(tokenizer, tmp_path):
    from llmbook.evaluation import suite
    from llmbook.evaluation.perplexity import bits_per_byte

    chat_vocab, chat_merges = train_bpe(TEXT, 300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    chat = Tokenizer(chat_vocab, chat_merges, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    plain = Tokenizer({i: bytes([i]) for i in range(256)}, [], name="bytes")  # no chat tokens: the plain path

    def load(name):
        torch.manual_seed(len(name))
        tok = plain if name == "plain" else chat
        return GPT(ModelConfig(vocab_size=320, context_length=192, d_model=32, n_layers=1, n_heads=2)).eval(), tok

    sizes = suite.EvalSizes(bpb_docs=4, doc_chars=300, mc_items=5, task_items=6, max_new_tokens=6)
    book = suite.BookEval.build(sizes)
    assert [len(book.documents[s]) for s in ("shakespeare", "austen")] == [4, 4] and len(book.task_items) == 6
    rows = suite.evaluate_book_models(("plain", "chat"), sizes, load=load, book=book, threads=1)
    assert [r["name"] for r in rows] == ["plain", "chat"]
    for row in rows:
        model, tok = load(row["name"])
        expected = bits_per_byte(model, tok, book.documents["austen"], prefix_id=harness.prefix_id(tok)).bpb
        assert row["bpb_austen"] == pytest.approx(expected)
        assert row["bpb_austen_low"] <= row["bpb_austen"] <= row["bpb_austen_high"]
        ours = [*score_items(model, tok, book.items["shakespeare"], delimiter="\n"),
                *score_items(model, tok, book.items["austen"], delimiter=" ")]
        assert row["acc"] == pytest.approx(sum(s.acc for s in ours) / 10) and row["mc_items"] == 10
        assert 0.0 <= row["task_low"] <= row["task"] <= row["task_high"] <= 1.0 and row["task_items"] == 6
    table = suite.format_table(rows)
    assert table.splitlines()[0].startswith("model") and "plain" in table and "chat" in table
    with pytest.raises(ValueError, match="at least one name"):
        suite.evaluate_book_models((), sizes, load=load, book=book)
    agreement = suite.harness_agreement(*load("chat"), book.items["austen"], tmp_path, "agree", " ")
    assert agreement["identical"] and agreement["max_abs_diff"] == 0.0
    assert agreement["acc_lm_eval"] == agreement["acc_ours"]


@needs_books
def test_held_out_documents_are_consecutive_pieces():
    from llmbook.evaluation import suite

    docs = suite.held_out_documents("shakespeare", 5, 200)
    assert book_tasks.held_out_text("shakespeare").startswith("".join(docs))
    assert all(len(d) >= 200 and d.endswith("\n") for d in docs)
    with pytest.raises(ValueError, match="only"):
        suite.held_out_documents("austen", 10**6, 1000)
