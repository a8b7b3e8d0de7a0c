"""The Tokenizer against tiktoken (GPT-2, GPT-4), Hugging Face tokenizers, and its own round trips."""

from __future__ import annotations

import doctest
import itertools
import json
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmbook import data
from llmbook.bpe import Tokenizer, train_bpe
from llmbook.bpe import tokenizer as tokenizer_module
from llmbook.bpe.tokenizer import bpe

ENCODINGS = ["gpt2", "cl100k_base"]
DATASETS = ["tinyshakespeare", "corpus.en"]

HARD_CASES = [
    "",
    " ",
    "   ",
    "a    b",
    "trailing spaces   ",
    "\n",
    "\n\n\n",
    "line\n\n\nline\n",
    "x  \n  y",
    "\tindented\t\ttabs\t",
    "crlf\r\nline\r\n",
    "0",
    "3.14159 and 1234567890123456789012345",
    "I'll've don't WE'RE it's",
    "'s 'S 'll",
    "😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈",  # emoji, a skin tone, ZWJ sequences
    "中文分词很难。日本語も。",
    "한국어 텍스트 처리",
    "café naïve résumé e\u0301 n\u0303",  # precomposed and combining accents
    "\u00a0non-breaking\u3000ideographic space",
    "hello<|endoftext|>world",
    "<|endoftext|><|endoftext|>",
    " <|endoftext|> ",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
]


@pytest.fixture(scope="module", params=ENCODINGS)
def pair(request):
    """(our Tokenizer, tiktoken's Encoding) for one encoding."""
    return Tokenizer.from_tiktoken(request.param), data.tiktoken_encoding(request.param)


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.from_tiktoken("gpt2")


@pytest.fixture(scope="module")
def shakespeare():
    return data.read_text("tinyshakespeare")


@pytest.fixture(scope="module")
def trained():
    """Our own tokenizer: corpus.en, 500 tokens, one special token at the end."""
    vocab, merges = train_bpe(data.path("corpus.en"), 500, special_tokens=["<|endoftext|>"])
    return Tokenizer(vocab, merges, special_tokens=["<|endoftext|>"], name="corpus-500")


# ---------------------------------------------------------------------------
# Identical ids to tiktoken
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", DATASETS)
def test_same_ids_as_tiktoken_on_whole_corpora(pair, dataset):
    tok, enc = pair
    text = data.read_text(dataset)
    expected = enc.encode_ordinary(text)
    assert tok.encode_ordinary(text) == expected
    assert tok.encode(text, allowed_special=set(), disallowed_special=()) == expected
    assert tok.decode(expected) == text


@pytest.mark.parametrize("text", HARD_CASES)
def test_same_ids_as_tiktoken_on_hard_cases(pair, text):
    tok, enc = pair
    assert tok.encode(text, allowed_special=set(), disallowed_special=()) == enc.encode_ordinary(text)
    assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    assert tok.decode(tok.encode(text, allowed_special="all")) == text
    assert tok.decode(tok.encode_ordinary(text)) == text


def test_some_special_tokens_allowed(pair):
    tok, enc = pair
    text = "a<|endoftext|>b<|fim_prefix|>c"
    allowed = {"<|endoftext|>"}
    assert tok.encode(text, allowed_special=allowed, disallowed_special=()) == enc.encode(
        text, allowed_special=allowed, disallowed_special=()
    )
    assert tok.encode(text, allowed_special=allowed, disallowed_special=())[1] == tok.special_tokens["<|endoftext|>"]


def test_disallowed_special_raises(pair):
    tok, enc = pair
    with pytest.raises(ValueError, match=r"disallowed.*allowed_special=\{'<\|endoftext\|>'\}"):
        tok.encode("a<|endoftext|>", allowed_special=set(), disallowed_special="all")
    with pytest.raises(ValueError):  # tiktoken's default, for comparison
        enc.encode("a<|endoftext|>")
    with pytest.raises(ValueError, match="disallowed"):
        list(tok.encode_iterable(["a <|endof", "text|> b"], allowed_special=set(), disallowed_special="all"))


def test_gpt2_byte_tokens_are_not_their_byte_values(gpt2):
    # GPT-2 gave its printable bytes the first ids: "!" is id 0, and byte 0 is not id 0
    assert gpt2.encode("!") == [0] and gpt2.token_bytes(0) == b"!"
    assert gpt2.encode("\x00") != [0]
    assert gpt2.vocab_size == 50257 and Tokenizer.from_tiktoken("cl100k_base").vocab_size == 100277


# ---------------------------------------------------------------------------
# Special tokens, decoding, errors
# ---------------------------------------------------------------------------


def test_overlapping_special_tokens_longest_first(trained):
    tok = Tokenizer(trained.vocab, trained.merges, special_tokens=["<|a|>", "<|a|><|a|>"])
    short, long = tok.special_tokens["<|a|>"], tok.special_tokens["<|a|><|a|>"]
    assert (short, long) == (500, 501)  # appended after the vocabulary
    ids = tok.encode("x<|a|><|a|><|a|>y", allowed_special="all")
    assert ids == tok.encode("x") + [long, short] + tok.encode("y")
    assert tok.decode(ids) == "x<|a|><|a|><|a|>y"
    assert list(tok.encode_iterable(["x<|a|><|a", "|><|a|>y"], allowed_special="all")) == ids


def test_special_tokens_of_a_trained_vocabulary(trained):
    assert trained.special_tokens == {"<|endoftext|>": 499} and trained.vocab_size == 500
    assert trained.encode("hi<|endoftext|>", allowed_special={"<|endoftext|>"}) == trained.encode("hi") + [499]
    assert 499 not in trained.encode_ordinary("<|endoftext|>")
    with pytest.raises(ValueError, match="disallowed"):
        trained.encode("hi<|endoftext|>")  # the default, as in tiktoken


def test_decode_replaces_invalid_utf8(gpt2):
    first_byte_of_e_acute = gpt2._byte_ids[0xC3]
    assert gpt2.decode_bytes([first_byte_of_e_acute]) == b"\xc3"
    assert gpt2.decode([first_byte_of_e_acute]) == "\ufffd"
    assert gpt2.decode(iter(gpt2.encode("generator input"))) == "generator input"


def test_unknown_ids_raise(gpt2):
    with pytest.raises(ValueError, match=r"^unknown token id 99999; valid ids are 0\.\.50256$"):
        gpt2.decode([31373, 99999])
    with pytest.raises(ValueError, match="unknown token id -1"):
        gpt2.decode([-1])
    with pytest.raises(ValueError, match="unknown token id 50257"):
        gpt2.token_bytes(50257)


def test_constructor_errors(trained):
    vocab = {i: bytes([i]) for i in range(256)}
    with pytest.raises(ValueError, match="missing from the vocabulary"):
        Tokenizer(vocab, [(b"a", b"b")])
    with pytest.raises(ValueError, match="all 256 single bytes"):
        Tokenizer({i: bytes([i]) for i in range(200)}, [])
    with pytest.raises(ValueError, match="'all' or a set"):
        trained.encode("x", allowed_special="<|endoftext|>")


def test_merges_rebuild_every_token(trained, gpt2):
    # why encoding may look up a whole pre-token first: merges alone give the same token
    for tok in (trained, gpt2):
        special = set(tok.special_tokens.values())
        for i, token in tok.vocab.items():
            if i not in special:
                assert bpe([tok._byte_ids[b] for b in token], tok._ranks, tok._merged) == [i]


def test_module_doctests():
    result = doctest.testmod(tokenizer_module)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------
# Round trips (property-based)
# ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_decode_encode_round_trip(trained, gpt2, text):
    for tok in (trained, gpt2):
        assert tok.decode(tok.encode(text, allowed_special="all")) == text
        assert tok.decode(tok.encode_ordinary(text)) == text


# the pieces that make streaming hard: runs of spaces, contractions, digits, halves of special tokens
FRAGMENTS = [" ", "  ", "\n", "\t", "'", "l", "ve", "7", "a", "é", "!", "<|endoftext|>", "<|", "endof", "|>", "\u00a0"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(FRAGMENTS)).map("".join)))
def test_encode_iterable_equals_encode_on_any_split(trained, gpt2, lines):
    with mock.patch.object(tokenizer_module, "STREAM_CHARS", 5):  # carry-overs at nearly every line
        for tok in (trained, gpt2):
            assert list(tok.encode_iterable(lines, allowed_special="all")) == tok.encode(
                "".join(lines), allowed_special="all"
            )
            assert list(tok.encode_iterable(lines, disallowed_special=())) == tok.encode_ordinary("".join(lines))


# ---------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------


def test_encode_iterable_on_shakespeare_lines(gpt2, shakespeare):
    lines = shakespeare.splitlines(keepends=True)
    assert list(gpt2.encode_iterable(lines)) == gpt2.encode(shakespeare)


def test_encode_iterable_is_lazy(gpt2, shakespeare):
    consumed = 0

    def lines():
        nonlocal consumed
        for line in shakespeare.splitlines(keepends=True):
            consumed += 1
            yield line

    stream = gpt2.encode_iterable(lines())
    first = list(itertools.islice(stream, 100))
    assert first == gpt2.encode(shakespeare)[:100]
    assert consumed < 10_000  # of 40,000 lines: it yields after reading a little
    # an endless stream works, so memory does not grow with the input
    endless = gpt2.encode_iterable(itertools.cycle(["To be, or not to be: that is the question.\n"]))
    assert gpt2.decode(list(itertools.islice(endless, 100_000))).startswith("To be, or not")


# ---------------------------------------------------------------------------
# Files: our JSON, tiktoken, GPT-2 / Hugging Face
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["trained", "gpt2"])
def test_save_load_round_trip(which, request, tmp_path, shakespeare):
    tok = request.getfixturevalue(which)
    path = tok.save(tmp_path / "tok.json")
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["format"] == "llmbook-bpe" and saved["version"] == 1
    loaded = Tokenizer.load(path)
    assert (loaded.vocab, loaded.merges, loaded.special_tokens) == (tok.vocab, tok.merges, tok.special_tokens)
    assert (loaded.pattern, loaded.name) == (tok.pattern, tok.name)
    sample = shakespeare[:20_000] + "<|endoftext|> 🏳️‍🌈"
    assert loaded.encode(sample, allowed_special="all") == tok.encode(sample, allowed_special="all")
    assert not list(tmp_path.glob("*.tmp"))


def test_saved_file_is_readable(trained, tmp_path):
    text = trained.save(tmp_path / "tok.json").read_text(encoding="utf-8")
    assert '"256": ' in text and '"<|endoftext|>": 499' in text
    assert "\n    [" in text  # one merge per line


def test_load_rejects_other_formats(trained, tmp_path):
    path = trained.save(tmp_path / "tok.json")
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved["version"] = 2
    path.write_text(json.dumps(saved), encoding="utf-8")
    with pytest.raises(ValueError, match="format version 2.*reads version 1"):
        Tokenizer.load(path)
    path.write_text(json.dumps({"model": "something else"}), encoding="utf-8")
    with pytest.raises(ValueError, match="not an llmbook-bpe file"):
        Tokenizer.load(path)


def test_to_tiktoken_round_trip(shakespeare):
    vocab, merges = train_bpe(shakespeare, 1000, special_tokens=["<|endoftext|>"])
    tok = Tokenizer(vocab, merges, special_tokens=["<|endoftext|>"], name="shakespeare-1000")
    enc = tok.to_tiktoken()
    assert enc.name == "shakespeare-1000" and enc.n_vocab == 1000
    assert enc.encode_ordinary(shakespeare) == tok.encode_ordinary(shakespeare)
    text = "KING.<|endoftext|>QUEEN"
    assert enc.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    back = Tokenizer.from_tiktoken(enc)  # and tiktoken's ranks give our merges back
    assert back.merges == merges and back.vocab == tok.vocab


def test_gpt2_files_round_trip(gpt2, tmp_path, shakespeare):
    vocab_json, merges_txt = gpt2.to_gpt2_files(tmp_path)
    assert merges_txt.read_text(encoding="utf-8").startswith("#version: 0.2\nĠ t\n")
    assert json.loads(vocab_json.read_text(encoding="utf-8"))["Ġthe"] == 262
    loaded = Tokenizer.from_gpt2_files(vocab_json, merges_txt)
    assert loaded.special_tokens == {"<|endoftext|>": 50256}
    assert (loaded.vocab, loaded.merges) == (gpt2.vocab, gpt2.merges)
    assert loaded.encode(shakespeare) == gpt2.encode(shakespeare)


@pytest.mark.parametrize("which", ["trained", "gpt2"])
def test_hugging_face_loads_exported_files(which, request, tmp_path, shakespeare):
    tokenizers = pytest.importorskip("tokenizers")
    tok = request.getfixturevalue(which)
    vocab_json, merges_txt = tok.to_gpt2_files(tmp_path)
    hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(vocab_json), str(merges_txt)))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = tokenizers.decoders.ByteLevel()
    paragraphs = shakespeare[:5000].split("\n\n")
    for paragraph in paragraphs + ["I'll've don't  \n\n  café 中文 😀"]:
        ids = tok.encode_ordinary(paragraph)
        assert hf.encode(paragraph).ids == ids
        assert hf.decode(ids) == paragraph
