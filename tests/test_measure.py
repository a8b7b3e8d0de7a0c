"""The format task's split and the measurements of Chapter 9: format adherence, task scoring, batched replies."""

from __future__ import annotations

import random

import pytest
import torch

from llmbook import data
from llmbook.bpe.tokenizer import Tokenizer
from llmbook.model import GPT
from llmbook.posttrain import instructions, measure, tasks
from llmbook.posttrain.templates import CHATML_SPECIAL_TOKENS, ENDOFTEXT, Message
from llmbook.posttrain.vocab import add_special_tokens


def _has(name: str) -> bool:
    try:
        return data.local_copy(name) is not None
    except data.ChecksumError:
        return False


@pytest.mark.skipif(not _has("instruction-data"), reason="instruction-data.json not available")
def test_instruction_split_is_fixed_disjoint_and_complete():
    train, val, test = instructions.instruction_split()
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    again = instructions.instruction_split()
    assert (train, val, test) == again  # the same seed, the same split
    key = lambda r: (r["instruction"], r["input"], r["output"])  # noqa: E731
    assert len({key(r) for r in train + val + test}) == len({key(r) for r in instructions.load_records()})
    assert not {key(r) for r in test} & {key(r) for r in train}
    assert instructions.instruction_split(seed=1)[2] != test
    messages = instructions.prompt_messages(test[0])
    assert messages and all(m.role == "user" for m in messages)


def test_format_report_counts_stops_and_runaways():
    responses = [("Paris.", True), ("Paris.\n\n### Instruction:\nMore", True), ("and so on and on", False),
                 ("<|im_start|>user", False)]
    report = measure.format_report(responses)
    assert (report.n, report.stopped, report.runaway, report.adherent) == (4, 2, 2, 1)
    assert report.rate("adherent") == 0.25 and report.interval("adherent") == tasks.wilson_interval(1, 4)
    assert "adherent 25%" in str(report)
    with pytest.raises(ValueError, match="at least one response"):
        measure.format_report([])


def _tiny_chat_model():
    torch.manual_seed(0)
    tok = add_special_tokens(Tokenizer({i: bytes([i]) for i in range(256)}, [], [ENDOFTEXT], name="bytes"),
                             CHATML_SPECIAL_TOKENS)
    model = GPT.from_preset("gpt-tiny", vocab_size=320, context_length=128, dropout=0.0).eval()
    return model, tok


def test_generate_responses_batches_like_one_at_a_time_and_reports_stops():
    model, tok = _tiny_chat_model()
    convs = [[Message("user", text)] for text in ("hi", "a longer message here", "x")]
    batched = measure.generate_responses(model, tok, convs, "chatml", max_new_tokens=12, batch_size=2)
    alone = [measure.generate_responses(model, tok, [c], "chatml", max_new_tokens=12)[0] for c in convs]
    assert batched == alone  # greedy: padding and batching change nothing
    end = tok.special_tokens["<|im_end|>"]
    bias = torch.zeros(model.cfg.vocab_size)
    bias[end] = 1e4  # the end token wins at every position: every reply stops at once, and is empty
    hook = model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        assert measure.generate_responses(model, tok, convs, "chatml", max_new_tokens=12) == [("", True)] * 3
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="does not fit the context"):
        measure.generate_responses(model, tok, [[Message("user", "y" * 120)]], "chatml", max_new_tokens=12)


def test_score_task_grades_the_replies():
    model, tok = _tiny_chat_model()
    line = "Before we proceed any further, hear me speak."
    items = [tasks.make_item(f, line, "shakespeare", random.Random(0)) for f in tasks.FAMILIES]
    score, replies = measure.score_task(model, tok, items, "chatml", max_new_tokens=8)
    assert len(replies) == 4 and score.n == 4
    assert score == tasks.score_responses(items, replies)


def test_sampled_score_grades_every_sample_and_is_seeded():
    model, tok = _tiny_chat_model()
    line = "Before we proceed any further, hear me speak."
    items = [tasks.make_item(f, line, "shakespeare", random.Random(0)) for f in tasks.FAMILIES]
    a = measure.sampled_score(model, tok, items, samples=3, max_new_tokens=8, seed=1)
    b = measure.sampled_score(model, tok, items, samples=3, max_new_tokens=8, seed=1)
    assert a == b and len(a.texts) == 4 and all(len(group) == 3 for group in a.texts)
    want = [sum(item.passed(t) for t in group) / 3 for item, group in zip(items, a.texts, strict=True)]
    assert list(a.per_prompt) == want and a.rate == pytest.approx(sum(want) / 4)
    assert a.low <= a.rate <= a.high
    with pytest.raises(ValueError, match="greedy is score_task"):
        measure.sampled_score(model, tok, items, temperature=0)


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_prompts():
    values = [1.0, 0.0] * 50
    low, high = measure.bootstrap_interval(values)
    assert low < 0.5 < high
    low4, high4 = measure.bootstrap_interval(values * 4)
    assert high4 - low4 < high - low
    assert measure.bootstrap_interval([0.3] * 10) == pytest.approx((0.3, 0.3))
