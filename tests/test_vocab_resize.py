"""Adding special tokens: tokenizer ids appended, model rows kept bit for bit, new rows the mean (Hewitt 2021)."""

from __future__ import annotations

import math

import pytest
import torch

from llmbook.bpe import Tokenizer
from llmbook.model import GPT
from llmbook.posttrain.templates import CHATML_SPECIAL_TOKENS, ENDOFTEXT
from llmbook.posttrain.vocab import add_special_tokens, padded_vocab_size, resize_token_embeddings


def tiny_tokenizer() -> Tokenizer:
    """Bytes, three merges and <|endoftext|>: 260 ids."""
    vocab = {i: bytes([i]) for i in range(256)}
    merges = [(b"t", b"h"), (b"th", b"e"), (b"\n", b"\n")]
    vocab.update({256: b"th", 257: b"the", 258: b"\n\n"})
    return Tokenizer(vocab, merges, [ENDOFTEXT], name="tiny")


def test_add_special_tokens_appends_ids_and_follows_tiktokens_contract():
    tok = tiny_tokenizer()
    assert tok.vocab_size == 260 and tok.special_tokens == {ENDOFTEXT: 259}
    chat = add_special_tokens(tok, CHATML_SPECIAL_TOKENS)
    assert chat.special_tokens == {ENDOFTEXT: 259, "<|im_start|>": 260, "<|im_end|>": 261}
    assert chat.vocab_size == 262 and tok.vocab_size == 260  # a copy; the original is unchanged
    assert add_special_tokens(chat, ["<|im_end|>"]).special_tokens == chat.special_tokens  # idempotent
    text = "<|im_start|>user\nthe<|im_end|>"
    assert chat.encode(text, allowed_special="all") == [260, *b"user\n", 257, 261]
    assert chat.encode_ordinary("the") == tok.encode("the") == [257]  # ordinary text is encoded as before
    with pytest.raises(ValueError, match="disallowed"):
        chat.encode(text)  # special-token text without allowed_special raises, as in tiktoken
    assert chat.decode(chat.encode(text, allowed_special="all")) == text
    with pytest.raises(ValueError, match="non-empty strings"):
        add_special_tokens(tok, [""])


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])  # tied head (GPT-2) and its own head (Llama)
@pytest.mark.parametrize("rows", [260, 320])  # the tokenizer's size, or padded to a multiple of 64
def test_resize_keeps_old_rows_bit_for_bit_and_fills_new_ones_with_the_mean(seed_and_one_thread, preset, rows):
    model = GPT.from_preset(preset, vocab_size=rows, context_length=16)
    n_used = 260
    emb, head = model.tok_emb.weight.detach().clone(), model.lm_head.weight.detach().clone()
    resize_token_embeddings(model, 262, n_used=n_used)
    new_rows = 262 if rows == 260 else 320  # padding follows the model's: 320 is a multiple of 64, 260 is not
    assert model.cfg.vocab_size == new_rows == model.tok_emb.weight.shape[0] == model.lm_head.weight.shape[0]
    assert model.lm_head.out_features == new_rows
    assert (model.lm_head.weight is model.tok_emb.weight) == model.cfg.tied_embeddings
    for old, new in ((emb, model.tok_emb.weight), (head, model.lm_head.weight)):
        assert torch.equal(new[:n_used], old[:n_used])
        assert torch.equal(new[n_used:262], old[:n_used].mean(0).expand(2, -1))  # the two new tokens
        assert torch.equal(new[262:], old[262:])  # padding rows stay as pretraining left them

    # the new ids work: a training step reaches their rows
    idx = torch.tensor([[260, 5, 261, 257]])
    _, loss = model(idx, targets=torch.tensor([[5, 261, 257, 259]]))
    loss.backward()
    assert model.tok_emb.weight.grad[260].abs().sum() > 0 and model.lm_head.weight.grad[261].abs().sum() > 0


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_mean_init_barely_changes_the_model_on_old_text(seed_and_one_thread, preset):
    """Hewitt's bound: each old token's log-probability drops by at most log(1 + k/V) for k new tokens."""
    model = GPT.from_preset(preset, vocab_size=260, context_length=16)
    idx = torch.randint(0, 259, (2, 16))
    logits = model(idx)[0]
    resize_token_embeddings(model, 262)
    after = model(idx)[0]
    assert torch.allclose(after[..., :260], logits, atol=1e-5)  # old tokens' logits: unchanged
    drop = logits.log_softmax(-1) - after.log_softmax(-1)[..., :260]
    # an untrained model's logits are nearly equal, so it comes close to the bound (a trained one stays far below)
    assert drop.min() >= -1e-5 and 0.5 * math.log(1 + 2 / 260) < drop.max() <= math.log(1 + 2 / 260) + 1e-5
    assert after.softmax(-1)[..., 260:].sum(-1).max() <= 2 / 260 + 1e-6  # the new tokens share <= k/V of the mass


def test_resize_errors_and_padding():
    assert padded_vocab_size(50257, 64) == 50304 and padded_vocab_size(64, 64) == 64
    model = GPT.from_preset("gpt-tiny")  # 256 rows, a multiple of 64
    emb = model.tok_emb.weight.detach().clone()
    assert resize_token_embeddings(model, 258).cfg.vocab_size == 320
    assert torch.equal(model.tok_emb.weight[:256], emb)
    assert torch.equal(model.tok_emb.weight[256:], emb.mean(0).expand(64, -1))  # new rows, padding too
    padded = GPT.from_preset("gpt-tiny", vocab_size=320)  # a 256-token tokenizer, padded to 320 rows
    emb = padded.tok_emb.weight.detach().clone()
    assert resize_token_embeddings(padded, 300, init="normal", n_used=256).cfg.vocab_size == 320  # fits
    new = padded.tok_emb.weight
    assert torch.equal(new[:256], emb[:256]) and torch.equal(new[300:], emb[300:])
    assert not torch.equal(new[256:300], emb[256:300]) and 0.015 < new[256:300].std() < 0.025
    assert resize_token_embeddings(model, 321, pad_to_multiple_of=1).cfg.vocab_size == 321
    for kwargs, match in (
        (dict(new_vocab_size=300), "never drops trained ones"),
        (dict(new_vocab_size=400, n_used=0), "n_used must be in"),
        (dict(new_vocab_size=400, init="zeros"), "init must be"),
    ):
        with pytest.raises(ValueError, match=match):
            resize_token_embeddings(model, **kwargs)
