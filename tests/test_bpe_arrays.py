"""Token files: dtype choice, round trip through load_tokens, the sidecar, atomic writes."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from llmbook import data
from llmbook.bpe import Tokenizer, encode_to_array, load_tokens, train_bpe
from llmbook.bpe.arrays import default_dtype, sidecar


@pytest.fixture(scope="module")
def small():
    vocab, merges = train_bpe(data.path("corpus.en"), 400, special_tokens=["<|endoftext|>"])
    return Tokenizer(vocab, merges, special_tokens=["<|endoftext|>"], name="corpus-400")


def test_default_dtype():
    assert default_dtype(500) == np.uint16
    assert default_dtype(50257) == np.uint16
    assert default_dtype(65536) == np.uint16  # ids 0..65535 still fit
    assert default_dtype(65537) == np.uint32
    assert default_dtype(100277) == np.uint32


def test_round_trip_of_a_file(small, tmp_path):
    source = data.path("corpus.en")
    out = encode_to_array(small, source, tmp_path / "corpus.bin")
    tokens = load_tokens(out)
    expected = small.encode(source.read_bytes().decode("utf-8"))
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and not tokens.flags.writeable
    assert tokens.tolist() == expected
    assert out.stat().st_size == 2 * len(expected)

    meta = json.loads(sidecar(out).read_text(encoding="utf-8"))
    assert sidecar(out) == tmp_path / "corpus.json"
    assert meta["dtype"] == "uint16" and meta["count"] == len(expected)
    assert meta["vocab_size"] == 400 and meta["tokenizer"] == "corpus-400"
    assert meta["source_sha256"] == data.DATASETS["corpus.en"].sha256
    assert not list(tmp_path.glob("*.tmp"))


def test_chunking_does_not_change_the_ids(small, tmp_path):
    source = data.path("tinystories_sample")  # stories separated by <|endoftext|>
    a = load_tokens(encode_to_array(small, source, tmp_path / "a.bin"))
    b = load_tokens(encode_to_array(small, source, tmp_path / "b.bin", chunk_lines=3))
    assert a.tolist() == b.tolist() == small.encode(source.read_text(encoding="utf-8"), allowed_special="all")
    assert small.special_tokens["<|endoftext|>"] in a


def test_big_vocabularies_use_uint32(tmp_path):
    cl100k = Tokenizer.from_tiktoken("cl100k_base")
    text = "Tokens above 65,535 need four bytes: ☃ and 🎉<|endoftext|>"
    tokens = load_tokens(encode_to_array(cl100k, text, tmp_path / "t.bin"))
    assert tokens.dtype == np.uint32 and tokens.tolist() == cl100k.encode(text, allowed_special="all")
    assert max(tokens) > 65535  # <|endoftext|> is 100257
    assert json.loads((tmp_path / "t.json").read_text())["source"] == "<text>"


def test_errors(small, tmp_path):
    cl100k = Tokenizer.from_tiktoken("cl100k_base")
    with pytest.raises(ValueError, match="uint16 cannot hold ids up to 100276"):
        encode_to_array(cl100k, "x", tmp_path / "x.bin", dtype=np.uint16)
    out = encode_to_array(small, "some text", tmp_path / "y.bin")
    out.write_bytes(out.read_bytes()[:-2])  # truncated
    with pytest.raises(ValueError, match="do not belong together"):
        load_tokens(out)


def test_empty_source(small, tmp_path):
    tokens = load_tokens(encode_to_array(small, "", tmp_path / "empty.bin"))
    assert tokens.shape == (0,) and tokens.dtype == np.uint16


def test_writers_of_the_same_file_do_not_collide(small, tmp_path):
    """Several writers of one corpus at once (two notebooks filling a cache): unique temporary names, all finish."""
    text = data.path("corpus.en").read_text(encoding="utf-8")[:20_000]
    errors = []

    def write():
        try:
            encode_to_array(small, text, tmp_path / "same.bin", chunk_lines=20)
        except Exception as exc:  # noqa: BLE001 (collected for the assertion)
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert load_tokens(tmp_path / "same.bin").tolist() == small.encode(text, allowed_special="all")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.bin", "same.json"]
