"""posttrain.pairs and posttrain.logprobs: preference pairs split and tokenized, response log-probs masked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmbook.bpe import Tokenizer
from llmbook.model import GPT
from llmbook.posttrain.collate import collate
from llmbook.posttrain.logprobs import response_lengths, sequence_logprobs, token_logprobs
from llmbook.posttrain.masking import IGNORE_INDEX
from llmbook.posttrain.pairs import (
    PreferencePair,
    collate_pairs,
    load_polite_records,
    pair_from_record,
    polite_split,
    tokenize_pair,
    tokenize_pairs,
)
from llmbook.posttrain.templates import CHATML, CHATML_SPECIAL_TOKENS, ENDOFTEXT, Message
from llmbook.posttrain.vocab import add_special_tokens

HI = (Message("user", "Say hi."),)


def chat_tokenizer() -> Tokenizer:
    return add_special_tokens(Tokenizer({i: bytes([i]) for i in range(256)}, [], [ENDOFTEXT], name="bytes"),
                              CHATML_SPECIAL_TOKENS)


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT.from_preset("llama-tiny", vocab_size=320, context_length=128, dropout=0.0).eval()


def test_polite_split_is_fixed_disjoint_and_complete():
    train, val, test = polite_split()
    records = load_polite_records()
    same = sum(r["chosen"].strip() == r["rejected"].strip() for r in records)
    assert (len(records), same) == (1100, 6)  # the records with nothing to prefer are dropped
    assert (len(train), len(val), len(test)) == (929, 54, 111)
    assert polite_split()[2] == test  # the same seed gives the same split
    keys = [{(p.prompt, p.chosen) for p in part} for part in (train, val, test)]
    assert not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert all(p.chosen.strip() != p.rejected.strip() for p in train + val + test)


@pytest.mark.parametrize("chosen, rejected, match", [
    ("", "no", "empty chosen"), ("yes", "   ", "empty rejected"), ("same", "same ", "same chosen and rejected")])
def test_bad_pairs_are_one_clear_line(chosen, rejected, match):
    with pytest.raises(ValueError, match=match):
        PreferencePair(HI, chosen, rejected)
    with pytest.raises(ValueError, match="user messages"):
        PreferencePair((), "a", "b")
    with pytest.raises(ValueError, match="instruction, chosen and rejected"):
        pair_from_record({"instruction": "x", "chosen": "a"})


def test_a_pair_tokenizes_to_two_examples_with_one_prompt():
    tok = chat_tokenizer()
    pair = PreferencePair(HI, "Hello, friend.", "What do you want?")
    tp = tokenize_pair(tok, pair, CHATML, 128)
    n_prompt = next(i for i, label in enumerate(tp.chosen.labels) if label != IGNORE_INDEX)
    assert tp.chosen.input_ids[:n_prompt] == tp.rejected.input_ids[:n_prompt]
    response = [i for i, lab in zip(tp.chosen.input_ids, tp.chosen.labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(response) \
        == "Hello, friend.<|im_end|>"
    kept, dropped = tokenize_pairs(tok, [pair, PreferencePair(HI, "x" * 200, "y")], CHATML, 64)
    assert (len(kept), dropped) == (1, 1)


def test_sequence_logprobs_sum_only_response_tokens_and_ignore_padding():
    tok, model = chat_tokenizer(), tiny_model()
    pairs = [tokenize_pair(tok, PreferencePair(HI, c, r), CHATML, 128)
             for c, r in [("Hello.", "Go away, you fool."), ("Good day to you!", "No.")]]
    batch = collate_pairs(pairs, pad_id=256)
    with torch.no_grad():
        got = sequence_logprobs(model, batch)
        mean = sequence_logprobs(model, batch, average=True)
    examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    for row, ex in enumerate(examples):  # each example scored alone, by hand
        x = torch.tensor([ex.input_ids])
        with torch.no_grad():
            logp = F.log_softmax(model(x)[0][0].float(), dim=-1)
        want = sum(logp[t, ex.labels[t + 1]].item() for t in range(len(ex) - 1) if ex.labels[t + 1] != IGNORE_INDEX)
        assert got[row].item() == pytest.approx(want, abs=1e-4)
        assert mean[row].item() == pytest.approx(want / response_lengths(batch)[row].item(), abs=1e-5)
    chosen, rejected = got.chunk(2)
    assert chosen.shape == rejected.shape == (2,)


def test_token_logprobs_zero_on_masked_positions_and_gradients_flow():
    model = tiny_model()
    batch = collate([[1, 2, 3, 4]], pad_id=0)
    out = sequence_logprobs(model, batch)
    out.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    logits = torch.randn(1, 3, 5)
    assert token_logprobs(logits, torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX]]))[0, 0] == 0
    with pytest.raises(ValueError, match="no response token"):
        sequence_logprobs(model, collate([[1]], pad_id=0))
