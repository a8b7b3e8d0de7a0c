"""Batches from token arrays: the shift by one, the offsets' range, in-order coverage, and prepare_data's files."""

from __future__ import annotations

import json
import math
import multiprocessing
import os

import numpy as np
import pytest
import torch

from llmbook import data
from llmbook.bpe import Tokenizer, load_tokens
from llmbook.errors import CacheError
from llmbook.loader import (
    PreparedData,
    check_tokenizer_name,
    get_batch,
    prepare_data,
    sequential_batches,
    split_text,
    token_byte_lengths,
)
from llmbook.losses import bits_per_byte, cross_entropy

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40 + "Ĝü€ 🎭\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder, so nothing is written in ~/.cache."""
    monkeypatch.setenv(data.ENV_CACHE_DIR, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def text_file(tmp_path):
    file = tmp_path / "plays.txt"
    file.write_bytes(TEXT.encode("utf-8"))
    return file


def test_split_text_is_by_position():
    assert split_text("abcdefghij", 0.2) == ("abcdefghij"[:8], "ij")
    train, val = split_text(TEXT, 0.1)
    assert train + val == TEXT and len(train) == int(len(TEXT) * 0.9)
    assert split_text("abc", 0.0) == ("abc", "")
    with pytest.raises(ValueError, match="val_fraction"):
        split_text("abc", 1.5)


def test_get_batch_shift_dtype_and_range():
    tokens = np.arange(20, dtype=np.uint16)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        x, y = get_batch(tokens, batch_size=8, context_length=5, rng=rng)
        assert x.shape == y.shape == (8, 5) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])  # y is x shifted by one
        assert torch.equal(y[:, -1], x[:, -1] + 1)  # ... with the next token of the array at the end
        # each row is a window of consecutive tokens (the array is 0, 1, 2, ...)
        assert torch.equal(x - x[:, :1], torch.arange(5).expand(8, 5))
        seen.update(x[:, 0].tolist())
    assert seen == set(range(20 - 5))  # every offset 0 .. len - T - 1, and no other


def test_get_batch_is_reproducible_with_a_seeded_rng():
    tokens = np.random.default_rng(1).integers(0, 256, 1000).astype(np.uint16)
    a = get_batch(tokens, 4, 16, rng=np.random.default_rng([1337, 7, 0]))
    b = get_batch(tokens, 4, 16, rng=np.random.default_rng([1337, 7, 0]))
    c = get_batch(tokens, 4, 16, rng=np.random.default_rng([1337, 8, 0]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    np.random.seed(3)
    d = get_batch(tokens, 4, 16)
    np.random.seed(3)
    assert torch.equal(d[0], get_batch(tokens, 4, 16)[0])  # rng=None: NumPy's global generator


def test_get_batch_too_short_is_a_clear_error():
    get_batch(np.arange(6), 2, 5)  # exactly one window and its target fit
    with pytest.raises(ValueError, match="too few"):
        get_batch(np.arange(5), 2, 5)
    with pytest.raises(ValueError, match="positive"):
        get_batch(np.arange(50), 0, 5)


def test_get_batch_reads_a_memmap(tmp_path):
    tokens = np.arange(3000, dtype=np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    mm = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r")
    x, y = get_batch(mm, 3, 64, rng=np.random.default_rng(0))
    assert torch.equal(y[:, :-1], x[:, 1:]) and x.dtype == torch.int64 and int(x.max()) < 3000


@pytest.mark.parametrize("n, T, B", [(10, 3, 2), (13, 4, 3), (5, 4, 8), (101, 10, 4)])
def test_sequential_batches_cover_the_array_once(n, T, B):
    tokens = np.arange(n, dtype=np.uint16)
    batches = list(sequential_batches(tokens, B, T))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    n_windows = (n - 1) // T
    assert xs.shape == ys.shape == (n_windows, T) and xs.dtype == torch.int64
    assert all(len(x) == B for x, _ in batches[:-1]) and 1 <= len(batches[-1][0]) <= B
    assert torch.equal(xs.flatten(), torch.arange(n_windows * T))  # in order, without overlap
    assert torch.equal(ys.flatten(), torch.arange(1, n_windows * T + 1))  # every target once
    assert n - 1 - n_windows * T < T  # only a tail shorter than one window is dropped


def test_sequential_batches_max_batches_and_errors():
    tokens = np.arange(100)
    assert len(list(sequential_batches(tokens, 2, 5, max_batches=3))) == 3
    assert len(list(sequential_batches(tokens, 2, 5))) == 10
    with pytest.raises(ValueError, match="too few"):
        list(sequential_batches(np.arange(5), 2, 5))


def test_token_byte_lengths():
    tok = Tokenizer(
        {**{i: bytes([i]) for i in range(256)}, 256: b"he", 257: b"hel", 300: b"<|endoftext|>"},
        [(b"h", b"e"), (b"he", b"l")],
        special_tokens={"<|endoftext|>": 300},
    )
    lengths = token_byte_lengths(tok)
    assert lengths.dtype == np.int64 and lengths.shape == (301,)
    assert (lengths[:256] == 1).all() and lengths[256] == 2 and lengths[257] == 3
    assert lengths[258:].sum() == 0  # ids missing from the vocab, and the special token, are no text
    ids = tok.encode("hello there")
    assert lengths[ids].sum() == len(b"hello there")


def test_uniform_model_bits_per_byte_is_log2_vocab_over_bytes_per_token(cache, text_file):
    prepared = prepare_data(str(text_file), "bpe-300")
    V = prepared.tokenizer.vocab_size
    val = torch.from_numpy(prepared.val.astype(np.int64))
    targets = val[1:]  # every token but the first is predicted once
    total = cross_entropy(torch.zeros(len(targets), V), targets, reduction="sum").item()
    n_bytes = int(token_byte_lengths(prepared.tokenizer)[targets.numpy()].sum())
    assert math.isclose(total / len(targets), math.log(V), rel_tol=1e-6)
    assert math.isclose(bits_per_byte(total, n_bytes), math.log2(V) * len(targets) / n_bytes, rel_tol=1e-6)
    assert math.isclose(bits_per_byte(total, prepared.val_bytes), math.log2(V) / prepared.bytes_per_token, rel_tol=0.05)


def test_prepare_data_bytes_from_a_text_file(cache, text_file):
    prepared = prepare_data(str(text_file), "bytes")
    assert isinstance(prepared, PreparedData)
    assert prepared.dir.parent == cache / "tokens" and prepared.dir.name.startswith("plays-bytes-")
    assert len(prepared.dir.name.rsplit("-", 1)[1]) == 8
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (prepared.dir / name).is_file()
    train_text, val_text = split_text(TEXT, 0.1)
    assert isinstance(prepared.train, np.memmap) and isinstance(prepared.val, np.memmap)
    assert prepared.train.tolist() == list(train_text.encode("utf-8"))
    assert prepared.val.tolist() == list(val_text.encode("utf-8"))
    assert prepared.train_bytes == len(train_text.encode("utf-8")) == len(prepared.train)
    assert prepared.val_bytes == len(val_text.encode("utf-8"))
    assert prepared.bytes_per_token == 1.0 and prepared.tokenizer.vocab_size == 256
    assert prepared.tokenizer.decode(prepared.val.tolist()) == val_text


def test_prepare_data_bpe_is_trained_on_the_train_split_only(cache, tmp_path):
    file = tmp_path / "leak.txt"
    file.write_text("abab " * 200 + "zqzqzq " * 30, encoding="utf-8")  # the last 20% holds all the "zq"
    prepared = prepare_data(str(file), "bpe-270", val_fraction=0.2)
    tok = prepared.tokenizer
    assert tok.name == "bpe-270" and tok.vocab_size <= 270
    assert b"zq" not in tok.vocab.values() and b"ab" in tok.vocab.values()
    train_text, val_text = split_text(file.read_text(encoding="utf-8"), 0.2)
    assert prepared.train.tolist() == tok.encode(train_text) and prepared.val.tolist() == tok.encode(val_text)
    assert prepared.bytes_per_token > 1


def test_prepare_data_reuses_its_files_and_rehashes_on_change(cache, text_file):
    first = prepare_data(str(text_file), "bytes")
    stamp = (first.dir / "train.bin").stat().st_mtime_ns
    again = prepare_data(str(text_file), "bytes")
    assert again.dir == first.dir and (again.dir / "train.bin").stat().st_mtime_ns == stamp
    assert prepare_data(str(text_file), "bytes", val_fraction=0.2).dir != first.dir
    assert prepare_data(str(text_file), "bpe-260").dir != first.dir
    text_file.write_text(TEXT + "more\n", encoding="utf-8")
    assert prepare_data(str(text_file), "bytes").dir != first.dir


def test_prepare_data_root_and_registry_name(tmp_path, cache):
    prepared = prepare_data("tinystories_sample", "bytes", root=tmp_path / "here")
    assert prepared.dir == tmp_path / "here" and not cache.exists()
    text = data.read_text("tinystories_sample")
    assert prepared.train_bytes + prepared.val_bytes == len(text.encode("utf-8"))
    meta = json.loads((tmp_path / "here" / "val.json").read_text())
    assert meta["count"] == len(prepared.val) == len(load_tokens(tmp_path / "here" / "val.bin"))


def test_prepare_data_gpt2_matches_tiktoken(cache, text_file):
    prepared = prepare_data(str(text_file), "gpt2")
    enc = data.tiktoken_encoding("gpt2")
    train_text, val_text = split_text(TEXT, 0.1)
    assert prepared.tokenizer.vocab_size == 50257
    assert prepared.train.tolist() == enc.encode_ordinary(train_text)
    assert prepared.val.tolist() == enc.encode_ordinary(val_text)


def test_prepare_data_errors(cache, tmp_path, text_file):
    with pytest.raises(data.DataNotFoundError, match="neither a name in the registry"):
        prepare_data(str(tmp_path / "missing.txt"), "bytes")
    for bad in ("words", "bpe-", "bpe-100", "gpt4"):
        with pytest.raises(ValueError, match="tokenizer|bpe"):
            prepare_data(str(text_file), bad)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_data(str(text_file), "bytes", val_fraction=0.0)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        prepare_data(str(latin1), "bytes")
    check_tokenizer_name("bpe-1024")



def _prepare_in_child(text_file: str, out: str) -> None:
    try:
        prepared = prepare_data(text_file, "bpe-300")
        with open(out, "w") as f:
            f.write(json.dumps([prepared.tokenizer.vocab_size, len(prepared.train), int(prepared.train.sum())]))
        os._exit(0)
    except BaseException as exc:  # what failed, for the assertion message
        with open(out, "w") as f:
            f.write(repr(exc))
        os._exit(1)


def test_prepare_data_in_two_processes_at_once(cache, text_file, tmp_path):
    """Three processes tokenizing the same data: one builds under the lock, the others wait and load it."""
    children = [multiprocessing.get_context("fork").Process(target=_prepare_in_child,
                                                            args=(str(text_file), str(tmp_path / f"{i}.json")))
                for i in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    results = [(tmp_path / f"{i}.json").read_text() for i in range(3)]
    assert [child.exitcode for child in children] == [0, 0, 0], results
    assert len(set(results)) == 1 and json.loads(results[0])[0] == 300
    folder = prepare_data(str(text_file), "bpe-300").dir
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "train.bin", "train.json", "val.bin",
                                                        "val.json"]  # no temporary files left


def test_prepare_data_names_a_damaged_cache(cache, text_file):
    prepared = prepare_data(str(text_file), "bytes")
    (prepared.dir / "train.bin").write_bytes(b"\0" * 3)
    with pytest.raises(CacheError, match=f"the cached {prepared.dir / 'train.bin'} is damaged.*delete the folder"):
        prepare_data(str(text_file), "bytes")
