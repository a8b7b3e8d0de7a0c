"""Multiple choice: lm-eval's own tokenization split and process_results are the reference."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.task import ConfigurableTask

from llmbook.bpe.tokenizer import Tokenizer
from llmbook.evaluation.bootstrap import bootstrap_ci
from llmbook.evaluation.likelihood import loglikelihoods
from llmbook.evaluation.multiple_choice import MCItem, MCScore, accuracy, encode_pair, predictions, score_items
from llmbook.model import GPT

pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py

ENDOFTEXT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """Bytes plus a few merges, so that a leading space joins the next word as in GPT-2's BPE."""
    merges = [(b" ", b"P"), (b" P", b"a"), (b"a", b"b"), (b"ab", b"c"), (b" ", b"t"), (b" t", b"h"), (b"\n", b"\n")]
    vocab = {i: bytes([i]) for i in range(256)}
    for a, b in merges:
        vocab[len(vocab)] = a + b
    return Tokenizer(vocab, merges, [ENDOFTEXT])


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(2)
    m = GPT.from_preset("gpt-tiny", vocab_size=tokenizer.vocab_size).eval()
    with torch.no_grad():
        m.norm_f.weight.mul_(10)
    return m


class RecordingLM(TemplateLM):
    """lm-eval's TemplateLM (its tokenization of requests) with our scorer for the token-level part."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tok, self.seen = model, tokenizer, []

    @property
    def eot_token_id(self):
        return self.tok.special_tokens[ENDOFTEXT]

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tok.encode_ordinary(string)

    def _loglikelihood_tokens(self, requests, **kwargs):
        self.seen += [(ctx, cont) for _, ctx, cont in requests]
        return loglikelihoods(self.model, [(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError


def lm_eval_process_results(choices, gold, lls, greedy):
    """lm-eval's ConfigurableTask.process_results for a multiple_choice doc, called on a stand-in task."""
    task = SimpleNamespace(
        config=SimpleNamespace(process_results=None), _metric_fn_list={"acc": None, "acc_norm": None},
        OUTPUT_TYPE="multiple_choice", multiple_input=False, multiple_target=False,
        doc_to_choice=lambda doc: doc["choices"], doc_to_target=lambda doc: doc["gold"],
    )
    return ConfigurableTask.process_results(task, {"choices": list(choices), "gold": gold},
                                            list(zip(lls, greedy, strict=True)))


ITEMS = [
    MCItem("plain", "Who speaks?", ("Paris", "the king", "abc"), 0),
    MCItem("trailing-space", "Answer: ", ("Pa", "the", "abcabc"), 1),  # the space moves into the continuation
    MCItem("newline", "First Citizen:\n\n", ("Before we proceed", "Speak"), 1),
    MCItem("empty", "", ("Paris", "the", ENDOFTEXT), 2),  # conditioned on <|endoftext|>
    MCItem("long", "x" * 200 + " then", ("abc", "Pa"), 0),  # longer than the context: cut from the left
]


def test_requests_and_logprobs_equal_lm_evals(model, tokenizer):
    lm = RecordingLM(model, tokenizer)
    requests = [Instance("loglikelihood", {}, (item.context, " " + c), k) for item in ITEMS
                for k, c in enumerate(item.choices)]
    theirs = lm.loglikelihood(requests, disable_tqdm=True)
    ours = score_items(model, tokenizer, ITEMS)
    assert [ll for s in ours for ll in s.logprobs] == [ll for ll, _ in theirs]  # exactly: the same batches
    assert [g for s in ours for g in s.greedy] == [g for _, g in theirs]
    mine = [encode_pair(tokenizer, item.context, " " + c, lm.eot_token_id) for item in ITEMS for c in item.choices]
    assert mine == [(list(a), list(b)) for a, b in lm.seen]
    # the split really is lm-eval's: " Pa" is one token after "Answer:", not "Answer: " + "Pa"
    assert encode_pair(tokenizer, "Answer: ", " Pa", None) == (tokenizer.encode_ordinary("Answer:"),
                                                              tokenizer.encode_ordinary("  Pa")[-2:])
    assert encode_pair(tokenizer, "", " Pa", 300) == ([300], tokenizer.encode_ordinary(" Pa"))


def test_scores_equal_lm_eval_process_results(model, tokenizer):
    for item, score in zip(ITEMS, score_items(model, tokenizer, ITEMS, batch_size=3), strict=True):
        want = lm_eval_process_results(item.choices, item.gold, score.logprobs, score.greedy)
        assert (score.acc, score.acc_norm) == (want["acc"], want["acc_norm"])
        assert score.id == item.id and len(score.logprobs) == len(item.choices)


def test_predictions_equal_lm_evals_on_handmade_loglikelihoods():
    rng = random.Random(0)
    cases = [([-6.0, -10.0], ("no", "absolutely")), ([-3.0, -3.0, -5.0], ("a", "b", "cc")),  # a tie: the first
             ([-4.0, -4.0], ("ab", "ab")), ([-1.0, -2.0, -0.5], ("é", "ab", "abcd")),  # é: 1 character, 2 bytes
             ([-1.5, -2.0], ("é", "ab"))]
    for _ in range(200):
        k = rng.randint(2, 5)
        cases.append(([rng.choice([-1.0, -2.0, round(rng.uniform(-30, 0), 1)]) for _ in range(k)],
                      tuple("x" * rng.randint(1, 12) for _ in range(k))))
    for lls, choices in cases:
        pred, pred_norm = predictions(lls, choices)
        for gold in range(len(choices)):
            want = lm_eval_process_results(choices, gold, lls, [False] * len(lls))
            assert (float(pred == gold), float(pred_norm == gold)) == (want["acc"], want["acc_norm"])


def test_length_normalization_flips_the_prediction():
    # summed: "no" (-6) beats "absolutely" (-10); per character: -3 vs -1, so "absolutely" wins
    assert predictions([-6.0, -10.0], ("no", "absolutely")) == (0, 1)
    assert predictions([-6.0, -30.0], ("no", "absolutely")) == (0, 0)  # -3 vs -3: the tie goes to the first
    # characters, not bytes: "é" is 1 character (2 bytes); -1.5/1 < -2/2, while per byte -1.5/2 > -2/2
    assert predictions([-1.5, -2.0], ("é", "ab")) == (0, 1)


def test_accuracy():
    scores = [MCScore(str(i), (0.0, -1.0), (True, False), 0, i % 2, float(i % 3 == 0), float(i % 2 == 0))
              for i in range(30)]
    got = accuracy(scores)
    assert got["acc"] == bootstrap_ci([float(i % 3 == 0) for i in range(30)])
    assert got["acc"][0] == pytest.approx(10 / 30) and got["acc_norm"][0] == pytest.approx(0.5)
    low, high = got["acc_norm"][1:]
    assert low < 0.5 < high
    with pytest.raises(ValueError, match="accuracy needs at least one score"):
        accuracy([])


def test_bad_items(model, tokenizer):
    with pytest.raises(ValueError, match="score_items needs at least one item"):
        score_items(model, tokenizer, [])
    with pytest.raises(ValueError, match="has 1 choice.*at least 2"):
        MCItem("one", "q", ("a",), 0)
    with pytest.raises(ValueError, match="gold=2 is out of range for 2 choices"):
        MCItem("g", "q", ("a", "b"), 2)
    with pytest.raises(ValueError, match="gold=-1 is out of range"):
        MCItem("g", "q", ("a", "b"), -1)
    with pytest.raises(ValueError, match="non-empty string"):
        MCItem("e", "q", ("a", ""), 0)
    with pytest.raises(ValueError, match="only whitespace"):
        score_items(model, tokenizer, [MCItem("ws", "  \n", ("a", "b"), 0)])
    with pytest.raises(ValueError, match="'m' choice 0: the choice adds no token"):  # "ab" + "c" is one token
        score_items(model, tokenizer, [MCItem("m", "ab", ("c", "d"), 0)], delimiter="")
    with pytest.raises(ValueError, match="'long' choice 1: 66 tokens do not fit the model's context_length=64"):
        score_items(model, tokenizer, [MCItem("long", "q", ("a", "y" * 65), 0)])
