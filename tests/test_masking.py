"""Loss masking (tokenize_example) and batching (collate): only responses carry loss, padding changes nothing."""

from __future__ import annotations

import doctest
import json

import pytest
import torch
import torch.nn.functional as F

from llmbook import data
from llmbook.bpe import Tokenizer
from llmbook.model import GPT
from llmbook.posttrain import collate as collate_module
from llmbook.posttrain.collate import collate, shift_labels
from llmbook.posttrain.masking import IGNORE_INDEX, Example, encode_prompt, tokenize_example
from llmbook.posttrain.templates import ALPACA, CHATML, CHATML_SPECIAL_TOKENS, ENDOFTEXT, Message, from_alpaca
from llmbook.posttrain.vocab import add_special_tokens

U, A = "user", "assistant"
SINGLE = [Message(U, "Name the primary colours."), Message(A, "Red, yellow and blue.")]
MULTI = [Message("system", "Be terse."), Message(U, "2+2?"), Message(A, "4"), Message(U, "3+3?"), Message(A, "6.")]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """Bytes, a few merges, <|endoftext|> (259), <|im_start|> (260), <|im_end|> (261)."""
    vocab = {i: bytes([i]) for i in range(256)}
    merges = [(b"t", b"h"), (b"th", b"e"), (b"\n", b"\n")]
    vocab.update({256: b"th", 257: b"the", 258: b"\n\n"})
    return add_special_tokens(Tokenizer(vocab, merges, [ENDOFTEXT]), CHATML_SPECIAL_TOKENS)


def trained_text(tok: Tokenizer, example: Example) -> str:
    return tok.decode([label for label in example.labels if label != IGNORE_INDEX])


@pytest.mark.parametrize("template", [ALPACA, CHATML])
def test_only_the_response_and_its_end_token_carry_loss(tok, template):
    example = tokenize_example(tok, SINGLE, template, max_len=512)
    assert trained_text(tok, example) == "Red, yellow and blue." + template.end_token
    first = example.labels.index(next(label for label in example.labels if label != IGNORE_INDEX))
    assert tok.decode(example.input_ids[:first]) == template.apply_template(SINGLE[:1], add_generation_prompt=True)
    end = first + example.n_trained  # the response is one run of tokens; after it only ChatML's "\n", untrained
    assert example.labels[first:end] == example.input_ids[first:end]
    assert tok.decode(example.input_ids[end:]) == ("\n" if template is CHATML else "")
    # the prompt encodes to the same ids at inference as in training
    assert example.input_ids[:first] == encode_prompt(tok, SINGLE[:1], template)
    # and segment-wise encoding equals encoding the whole text, where no merge straddles a boundary
    assert example.input_ids == tok.encode(template.apply_template(SINGLE), allowed_special="all")


def test_every_assistant_turn_is_trained(tok):
    example = tokenize_example(tok, MULTI, CHATML, max_len=512)
    assert trained_text(tok, example) == "4<|im_end|>6.<|im_end|>"
    everything = tokenize_example(tok, MULTI, CHATML, max_len=512, train_on_prompt=True)
    assert everything.labels == everything.input_ids == example.input_ids
    assert everything.n_trained == len(everything) > example.n_trained == 5  # 4 <end> 6 . <end>


def test_instruction_data_masks_exactly_the_outputs(tok):
    records = json.loads(data.path("instruction-data").read_text())[:60]
    for record in records:
        for template in (ALPACA, CHATML):
            example = tokenize_example(tok, from_alpaca(record), template, max_len=4096)
            assert trained_text(tok, example) == record["output"] + template.end_token


def test_too_long_raises_or_truncates_on_the_right(tok):
    full = tokenize_example(tok, SINGLE, ALPACA, max_len=512)
    n = len(full)
    with pytest.raises(ValueError, match=rf"has {n} tokens, more than max_len={n - 1}: .* truncate=True") as info:
        tokenize_example(tok, SINGLE, ALPACA, max_len=n - 1)
    assert "\n" not in str(info.value)
    cut = tokenize_example(tok, SINGLE, ALPACA, max_len=n - 3, truncate=True)
    assert cut.input_ids == full.input_ids[: n - 3] and cut.labels == full.labels[: n - 3]
    assert trained_text(tok, cut) == "Red, yellow and blu"  # "e", ".", <|endoftext|> cut: no end
    with pytest.raises(ValueError, match="no response token is left"):
        tokenize_example(tok, SINGLE, ALPACA, max_len=n - 30, truncate=True)


def test_bad_input_one_line_each(tok):
    cases = [
        (dict(messages=SINGLE[:1]), "no assistant message"),
        (dict(messages=[Message("bot", "x"), Message(A, "y")]), "unknown role 'bot'"),
        (dict(messages=[Message(U, "<|im_start|>system"), Message(A, "y")]), "special_in_content='ordinary'"),
        (dict(messages=[Message(U, "a"), Message(A, "b")], tokenizer=Tokenizer({i: bytes([i]) for i in range(256)},
                                                                                  [])), "add_special_tokens"),
        (dict(messages=SINGLE, max_len=0), "max_len must be positive"),
    ]
    for kwargs, match in cases:
        kwargs = {"tokenizer": tok, "template": CHATML, "max_len": 64, **kwargs}
        with pytest.raises(ValueError, match=match) as info:
            tokenize_example(**kwargs)
        assert "\n" not in str(info.value)


def test_special_token_text_in_content_can_be_encoded_as_ordinary_text(tok):
    injected = [Message(U, "say <|im_end|>"), Message(A, "ok")]
    example = tokenize_example(tok, injected, CHATML, max_len=128, special_in_content="ordinary")
    assert example.input_ids.count(261) == 2  # the two real ends; the user's "<|im_end|>" is 10 ordinary bytes
    text = "<|im_start|>user\nsay <|im_end|><|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    assert tok.decode(example.input_ids) == text
    assert trained_text(tok, example) == "ok<|im_end|>"
    # a special token of the tokenizer that no template uses is caught too
    fim = add_special_tokens(tok, ["<|fim|>"])
    with pytest.raises(ValueError, match=r"special token '<\|fim\|>'; remove it, or pass special_in_content"):
        tokenize_example(fim, [Message(U, "a<|fim|>"), Message(A, "b")], CHATML, max_len=64)
    ordinary = tokenize_example(fim, [Message(U, "a<|fim|>"), Message(A, "b")], CHATML, max_len=64,
                                special_in_content="ordinary")
    assert fim.special_tokens["<|fim|>"] not in ordinary.input_ids


def test_collate_right_and_left():
    a, b = Example([5, 6, 7, 8], [-100, -100, 7, 8]), Example([9, 10], [-100, 10])
    x, y, mask, pos = collate([a, b], pad_id=0)
    assert x.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert y.tolist() == [[-100, 7, 8, -100], [10, -100, -100, -100]]  # y[t] is the label of x[t+1]
    assert mask.tolist() == [[True] * 4, [True, True, False, False]] and mask.dtype == torch.bool
    assert pos.tolist() == [[0, 1, 2, 3], [0, 1, 1, 1]]
    x, y, mask, pos = collate([a, b], pad_id=0, side="left", pad_to=5)
    assert x.tolist() == [[0, 5, 6, 7, 8], [0, 0, 0, 9, 10]]
    assert y.tolist() == [[-100, -100, 7, 8, -100], [-100, -100, -100, 10, -100]]  # no pad predicts anything
    assert pos.tolist() == [[0, 0, 1, 2, 3], [0, 0, 0, 0, 1]]
    assert shift_labels(torch.tensor([[-100, 7, 8]])).tolist() == [[7, 8, -100]]
    for kwargs, match in ((dict(side="middle"), "side must be"), (dict(pad_to=3), "shorter than the longest")):
        with pytest.raises(ValueError, match=match):
            collate([a, b], pad_id=0, **kwargs)


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_padding_changes_no_loss_and_no_logit(seed_and_one_thread, tok, preset):
    model = GPT.from_preset(preset, vocab_size=320, context_length=128).eval()
    examples = [tokenize_example(tok, m, CHATML, max_len=128) for m in (SINGLE, MULTI, SINGLE[:1] + [Message(A, "")])]
    x, y, mask, pos = collate(examples, pad_id=0)
    logits, loss = model(x, y, positions=pos, mask=mask)
    per_token = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T), 0 where y is -100
    alone_losses = []
    for b, example in enumerate(examples):
        xa, ya, _, _ = collate([example], pad_id=0)
        logits_a, _ = model(xa)
        alone = F.cross_entropy(logits_a.transpose(1, 2), ya, reduction="none")[0]
        assert torch.allclose(per_token[b, : len(example)], alone, atol=1e-5)
        alone_losses.append(alone[ya[0] != IGNORE_INDEX])
    assert torch.allclose(loss, torch.cat(alone_losses).mean(), atol=1e-6)  # the batch loss: mean over tokens

    # left padding for generation: every row's next-token logits are its unpadded ones
    prompts = [encode_prompt(tok, m, CHATML) for m in (SINGLE[:1], MULTI[:-1])]
    x, _, mask, pos = collate(prompts, pad_id=0, side="left")
    logits, _ = model(x, positions=pos, mask=mask)
    for b, prompt in enumerate(prompts):
        alone, _ = model(torch.tensor([prompt]))
        assert torch.allclose(logits[b, -1], alone[0, -1], atol=1e-5)


def test_collate_doctests():
    assert doctest.testmod(collate_module).failed == 0


def test_segment_wise_ids_equal_whole_text_ids_with_gpt2_on_instruction_data():
    """With GPT-2's tokenizer no merge straddles a template boundary on these records: the ids are the usual ones."""
    try:
        gpt2 = add_special_tokens(Tokenizer.from_tiktoken("gpt2"), CHATML_SPECIAL_TOKENS)
    except data.DataNotFoundError as error:
        pytest.skip(str(error))
    assert gpt2.special_tokens == {ENDOFTEXT: 50256, "<|im_start|>": 50257, "<|im_end|>": 50258}
    for record in json.loads(data.path("instruction-data").read_text())[::5]:
        messages = from_alpaca(record)
        for template in (ALPACA, CHATML):
            ids = tokenize_example(gpt2, messages, template, max_len=1024).input_ids
            assert ids == gpt2.encode(template.apply_template(messages), allowed_special="all")
