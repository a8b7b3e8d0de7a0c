"""One evaluation table for every model the book trained: bits per byte, the multiple-choice task, the verifiable task.

    >>> rows = evaluate_book_models()          # doctest: +SKIP
    >>> print(format_table(rows))              # doctest: +SKIP

Three measurements, each with a 95% interval, because each answers a
different question:

- **bits per byte** on held-out Shakespeare and Austen (``perplexity.bits_per_byte``, a bootstrap over
  documents): how well the model predicts text, in a unit that does not depend on its tokenizer;
- **the book's multiple-choice task** (``book_tasks``, scored by ``multiple_choice.score_items``, which lm-eval
  reproduces exactly: ``harness_agreement``): can it tell the real next line from three corrupted copies
  (``EvalSizes.mc_kind``), acc and acc_norm with bootstrap intervals over items;
- **the verifiable task** (Chapter 9's instructions with checkable answers, ``posttrain.measure.score_task``,
  greedy, ChatML): does it follow instructions; exact-success rate with a Wilson interval.

A base model is asked the task too: the English base model gets the ChatML
prompt it never learned; the reference model's tokenizer has no ChatML
tokens at all, so it gets the instruction as plain text (``plain_task_score``).
They score what they score, which is the point of the table.

The sizes (``EvalSizes``) are chosen so that the five book models take well
under 90 s on two cores: measured 24 s for all five (4.4-5.5 s each; 26 s
with the imports) with ``threads=1`` on a 2-core machine shared with other
work, so an idle one is not slower. The interval widths they buy are printed
with the numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmbook.bpe.tokenizer import Tokenizer
from llmbook.evaluation import book_tasks
from llmbook.evaluation.harness import prefix_id, run_task
from llmbook.evaluation.multiple_choice import MCItem, MCScore, accuracy, score_items
from llmbook.evaluation.perplexity import bits_per_byte
from llmbook.generate import generate
from llmbook.model import GPT

BOOK_MODELS = ("shakespeare", "english", "sft-full", "dpo-task", "grpo")
Loader = Callable[[str], tuple[GPT, Tokenizer]]


@dataclass(frozen=True)
class EvalSizes:
    """How much of each measurement the table runs: more items, narrower intervals, longer runs.

    Defaults: 40 documents of ~1,000 characters per book (~80 KB of held-out
    text, about +-0.03 bits per byte), 100 multiple-choice items per book
    (200 in all, about +-7 points of accuracy) and 100 verifiable-task prompts
    (about +-10 points; 25 per family) with 48 new tokens each.
    """

    bpb_docs: int = 40  # held-out documents per book
    doc_chars: int = 1000  # characters per document (cut at a line end)
    mc_items: int = 100  # multiple-choice items per book
    task_items: int = 100  # verifiable-task test prompts
    max_new_tokens: int = 48  # for the verifiable task, as score_task's default
    seed: int = 0
    # the distractors (book_tasks.KINDS). "swapped" (two neighbouring words of the real line exchanged) because it
    # tells the book's models apart; with other lines as distractors ("lines") the reference and English base
    # models measured 28% and 26% (chance 25%), with fully shuffled words ("shuffled") 98% and 99%: a task at its
    # floor or at its ceiling ranks nothing
    mc_kind: str = "swapped"


def load_book_model(name: str) -> tuple[GPT, Tokenizer]:
    """A book model by name, in eval mode, with its tokenizer (trained first if it is not cached).

    "shakespeare" and "english" are ``pretrained.load``; "sft-*", "dpo-*" and
    "grpo*" the post-training loaders (Chapters 9-10). All return a
    ``Pretrained``, of which we use the model and tokenizer.
    """
    if name.startswith("sft"):
        from llmbook.posttrain import sft as module
    elif name.startswith("dpo"):
        from llmbook.posttrain import dpo as module
    elif name.startswith("grpo"):
        from llmbook.posttrain import grpo as module
    else:
        from llmbook import pretrained as module
    loaded = module.load(name, progress=False)
    return loaded.model.eval(), loaded.tokenizer


def held_out_documents(source: str, n_docs: int, doc_chars: int = 1000) -> list[str]:
    """``n_docs`` consecutive pieces of a book's held-out text, each ~``doc_chars`` long and ending at a line end.

    The interval of bits per byte is a bootstrap over these documents, so
    they should be many; consecutive pieces keep each one natural text.
    """
    if n_docs < 1 or doc_chars < 1:
        raise ValueError(f"need n_docs >= 1 and doc_chars >= 1, got {n_docs} and {doc_chars}")
    text = book_tasks.held_out_text(source)
    docs, start = [], 0
    while len(docs) < n_docs and start < len(text):
        end = text.find("\n", start + doc_chars)
        end = len(text) if end < 0 else end + 1
        docs.append(text[start:end])
        start = end
    if len(docs) < n_docs:
        raise ValueError(f"the held-out {source} text makes only {len(docs)} documents of {doc_chars} characters")
    return docs


def plain_task_score(model: GPT, tokenizer: Tokenizer, items: Sequence, max_new_tokens: int = 48,
                     batch_size: int = 32):
    """The verifiable task for a model without chat tokens: the prompt as plain text, the reply up to a blank line.

    Greedy and batched (``llmbook.generate``, left padding), as ``score_task``;
    a prompt too long for the context keeps its end.
    """
    from llmbook.posttrain.tasks import score_responses

    keep = model.cfg.context_length - max_new_tokens
    prompts = [tokenizer.encode_ordinary(item.prompt + "\n\n")[-keep:] for item in items]
    replies = []
    for start in range(0, len(prompts), batch_size):
        new = generate(model, prompts[start:start + batch_size], max_new_tokens, temperature=0.0,
                       vocab_size=tokenizer.vocab_size)
        replies += [tokenizer.decode(ids).split("\n\n", 1)[0] for ids in new]
    return score_responses(items, replies), replies


def task_score(model: GPT, tokenizer: Tokenizer, items: Sequence, max_new_tokens: int = 48):
    """``(TaskScore, replies)``: ChatML and ``measure.score_task`` if the tokenizer has ChatML's tokens, else plain."""
    from llmbook.posttrain.measure import score_task

    if {"<|im_start|>", "<|im_end|>"} <= set(tokenizer.special_tokens):
        return score_task(model, tokenizer, items, "chatml", max_new_tokens)
    return plain_task_score(model, tokenizer, items, max_new_tokens)


@dataclass(frozen=True)
class BookEval:
    """What every model is evaluated on, built once: held-out documents, multiple-choice items, task prompts."""

    documents: dict[str, list[str]]  # per book
    items: dict[str, list[MCItem]]  # per book
    task_items: list

    @classmethod
    def build(cls, sizes: EvalSizes = EvalSizes()) -> BookEval:
        from llmbook.posttrain.tasks import make_task_split

        sources = tuple(book_tasks.SOURCES)
        documents = {s: held_out_documents(s, sizes.bpb_docs, sizes.doc_chars) for s in sources}
        items = {s: book_tasks.continuation_items(s, sizes.mc_items, seed=sizes.seed, kind=sizes.mc_kind)
                 for s in sources}
        # the book's test split (seed 0, 400 prompts), of which the first task_items: the same for every model
        test = make_task_split(0).test[:sizes.task_items] if sizes.task_items else []
        return cls(documents, items, test)


def _interval(prefix: str, value: float, low: float, high: float) -> dict[str, float]:
    return {prefix: value, f"{prefix}_low": low, f"{prefix}_high": high}


def evaluate_model(model: GPT, tokenizer: Tokenizer, book: BookEval, sizes: EvalSizes = EvalSizes()) -> dict:
    """One row of the table: bits per byte (per book), MC acc and acc_norm (both books pooled), the task rate."""
    row: dict = {"params": sum(p.numel() for p in model.parameters())}
    start = time.perf_counter()
    prefix = prefix_id(tokenizer)
    with torch.inference_mode():
        for source, docs in book.documents.items():
            result = bits_per_byte(model, tokenizer, docs, prefix_id=prefix)
            row |= _interval(f"bpb_{source}", result.bpb, *result.interval(seed=sizes.seed))
            row[f"bytes_{source}"] = sum(result.bytes)
        row["seconds_bpb"] = time.perf_counter() - start
        start = time.perf_counter()
        scores: list[MCScore] = []
        for source, items in book.items.items():
            mine = score_items(model, tokenizer, items, delimiter=book_tasks.DELIMITERS[source], prefix_id=prefix)
            row[f"acc_{source}"] = accuracy(mine, seed=sizes.seed)["acc"][0]
            scores += mine
        acc = accuracy(scores, seed=sizes.seed)
        row |= _interval("acc", *acc["acc"]) | _interval("acc_norm", *acc["acc_norm"])
        row["mc_items"] = len(scores)
        row["seconds_mc"] = time.perf_counter() - start
    start = time.perf_counter()
    if book.task_items:
        score, _ = task_score(model, tokenizer, book.task_items, sizes.max_new_tokens)
        row |= _interval("task", score.rate, score.low, score.high)
        row["task_items"] = score.n
    row["seconds_task"] = time.perf_counter() - start
    return row


def evaluate_book_models(names: Sequence[str] = BOOK_MODELS, sizes: EvalSizes = EvalSizes(),
                         load: Loader = load_book_model, book: BookEval | None = None,
                         threads: int | None = None) -> list[dict]:
    """The evaluation table: one dict per model, in ``names``' order (see ``evaluate_model`` for the keys).

    ``load`` turns a name into ``(model, tokenizer)``; tests inject tiny
    models. ``seconds`` is each model's wall time, loading included.
    ``threads`` sets torch's thread count for the run (restored after): on a
    machine whose cores are busy with other work, 1 thread is several times
    faster than 2 for models this small, which wait on each other's spinning.
    """
    if not names:
        raise ValueError("no models to evaluate: give at least one name, e.g. BOOK_MODELS")
    book = BookEval.build(sizes) if book is None else book
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    try:
        for name in names:
            start = time.perf_counter()
            model, tokenizer = load(name)
            row = {"name": name} | evaluate_model(model, tokenizer, book, sizes)
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
    finally:
        torch.set_num_threads(previous)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """The table as text: value [low, high] for every measurement."""
    def cell(row: dict, key: str, pct: bool) -> str:
        if key not in row:
            return "-"
        f = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.3f}")
        return f"{f(row[key])} [{f(row[key + '_low'])}, {f(row[key + '_high'])}]"

    columns = [("bpb Shakespeare", "bpb_shakespeare", False), ("bpb Austen", "bpb_austen", False),
               ("MC acc", "acc", True), ("MC acc_norm", "acc_norm", True), ("task", "task", True)]
    header = f"{'model':<12}" + "".join(f"{title:>22}" for title, _, _ in columns) + f"{'s':>6}"
    lines = [header]
    for row in rows:
        lines.append(f"{row['name']:<12}" + "".join(f"{cell(row, key, pct):>22}" for _, key, pct in columns)
                     + f"{row.get('seconds', 0):>6.1f}")
    return "\n".join(lines)


def harness_agreement(model: GPT, tokenizer: Tokenizer, items: Sequence[MCItem], folder: str | Path,
                      name: str = "book_task", delimiter: str = " ") -> dict:
    """Run ``items`` through lm-eval and through ``score_items``; how far apart they are (0.0 is the claim).

    Returns ``identical`` (every per-item log-likelihood bit-identical and
    the same acc and acc_norm per item), ``max_abs_diff`` (nats), and both
    accuracies.
    """
    book_tasks.write_task(items, folder, name, delimiter=delimiter)
    per_item, metrics = run_task(model, tokenizer, folder, name)
    ours = score_items(model, tokenizer, items, delimiter=delimiter, prefix_id=prefix_id(tokenizer))
    diffs = [abs(a - b) for p, s in zip(per_item, ours, strict=True) for a, b in zip(p["loglikelihoods"], s.logprobs,
                                                                                      strict=True)]
    same_scores = all((p["acc"], p["acc_norm"]) == (s.acc, s.acc_norm) for p, s in zip(per_item, ours, strict=True))
    mine = accuracy(ours)
    return {"identical": max(diffs) == 0.0 and same_scores, "max_abs_diff": max(diffs), "items": len(ours),
            "acc_lm_eval": metrics["acc"], "acc_ours": mine["acc"][0],
            "acc_norm_lm_eval": metrics["acc_norm"], "acc_norm_ours": mine["acc_norm"][0]}
