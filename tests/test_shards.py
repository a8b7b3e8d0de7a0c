"""Token shards: round trip, llm.c's header, one clear line for a damaged shard, identical output for any number of
workers, streaming batches across shard boundaries, and the Chapter 7 trainer training from a shard folder."""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from itertools import islice

import numpy as np
import pytest

from llmbook import loader
from llmbook.bpe.tokenizer import Tokenizer
from llmbook.pipeline import shards
from llmbook.pipeline.document import Document
from llmbook.pipeline.shards import EOT, ShardDataset, ShardError, read_shard, write_shard, write_shards

WORDS = "the king queen lord good night day love death sword crown thou art my heart speak".split()


def make_docs(n: int = 120, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))).capitalize() + "."
        docs.append(Document(f"doc-{i}", text))
    return docs


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    """256 byte tokens plus <|endoftext|> (id 256), a BPE with no merges: fast, and every text encodes."""
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], [EOT], name="bpe-257")


# ---------------------------------------------------------------------- one shard


@pytest.mark.parametrize(("dtype", "magic", "version"), [(np.uint16, 20240520, 1), (np.uint32, 20240801, 7)])
def test_shard_round_trip_and_llm_c_header(tmp_path, dtype, magic, version):
    tokens = np.array([0, 1, 50256, np.iinfo(dtype).max], dtype=dtype)
    sha = write_shard(tmp_path / "s.bin", tokens)
    raw = (tmp_path / "s.bin").read_bytes()
    assert sha == hashlib.sha256(raw).hexdigest()
    assert len(raw) == 1024 + 4 * np.dtype(dtype).itemsize
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:4].tolist() == [magic, version, 4, np.dtype(dtype).itemsize] and not header[4:].any()
    back = read_shard(tmp_path / "s.bin")
    assert isinstance(back, np.memmap) and back.dtype == dtype and back.tolist() == tokens.tolist()
    write_shard(tmp_path / "empty.bin", np.zeros(0, np.uint16))
    assert len(read_shard(tmp_path / "empty.bin")) == 0


def test_shard_rejects_signed_or_wide_tokens(tmp_path):
    with pytest.raises(ValueError, match="uint16 or uint32"):
        write_shard(tmp_path / "s.bin", np.array([1, 2], dtype=np.int64))


@pytest.mark.parametrize("damage", ["truncated", "header-only-part", "magic", "version", "extra"])
def test_damaged_shard_is_one_clear_line_naming_the_file(tmp_path, damage):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        raw = raw[:-7]
    elif damage == "header-only-part":
        raw = raw[:500]
    elif damage == "magic":
        raw[:4] = np.array([12345], "<i4").tobytes()
    elif damage == "version":
        raw[4:8] = np.array([9], "<i4").tobytes()
    else:
        raw += b"\0\0"
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError) as info:
        read_shard(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert isinstance(info.value, ValueError)
    expected = {"truncated": "truncated", "header-only-part": "header", "magic": "not a token shard",
                "version": "version 9", "extra": "damaged"}[damage]
    assert expected in message


# ---------------------------------------------------------------------- a shard folder


def test_write_shards_content_split_and_manifest(tmp_path, byte_tokenizer):
    docs = make_docs(120)
    stats = write_shards(docs, tmp_path / "s", byte_tokenizer, shard_tokens=1000, val_fraction=0.2)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["tokenizer"] == {"name": "bpe-257", "vocab_size": 257, "eot": 256, "file": "tokenizer.json"}
    assert manifest["dtype"] == "uint16"
    val_ids = [d for d in docs if shards.is_val(d.id, 0.2)]
    assert 0 < len(val_ids) < len(docs)
    for split in ("train", "val"):
        expected = [d for d in docs if shards.is_val(d.id, 0.2) == (split == "val")]
        files = shards.shard_paths(tmp_path / "s", split)
        tokens = np.concatenate([read_shard(p) for p in files])
        # every document: <|endoftext|> first, then its bytes; documents in order; nothing lost
        stream = b"".join(b"\xff" + d.text.encode() for d in expected)
        assert tokens.tolist() == [256 if b == 0xFF else b for b in stream]
        counts = [read_shard(p).size for p in files]
        assert all(c == 1000 for c in counts[:-1]) and 0 < counts[-1] <= 1000  # fixed size, the last shorter
        assert stats.tokens[split] == len(tokens) == manifest["totals"][split]["tokens"]
        assert stats.documents[split] == len(expected) == manifest["totals"][split]["documents"]
        assert stats.bytes[split] == sum(len(d.text.encode()) for d in expected)
    assert shards.verify(tmp_path / "s") == stats.shards == len(manifest["shards"])


def test_special_token_text_in_a_document_stays_ordinary(tmp_path, byte_tokenizer):
    docs = [Document("a", "before <|endoftext|> after"), Document("b", "second")]
    write_shards(docs, tmp_path / "s", byte_tokenizer, val_fraction=0.0)
    tokens = read_shard(tmp_path / "s" / "train_000000.bin").tolist()
    assert tokens.count(256) == 2  # only the two separators: the page cannot forge the special token
    assert byte_tokenizer.decode(tokens) == "<|endoftext|>before <|endoftext|> after<|endoftext|>second"


def test_same_shards_for_any_number_of_workers(tmp_path, byte_tokenizer):
    docs = make_docs(300, seed=1)
    for workers in (1, 2):
        write_shards(docs, tmp_path / f"w{workers}", byte_tokenizer, shard_tokens=2000, workers=workers,
                     chunk_docs=7)
    files = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "w2").iterdir()) and len(files) > 4
    for name in files:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_refuses_to_overwrite_and_bad_settings(tmp_path, byte_tokenizer):
    write_shards(make_docs(20), tmp_path / "s", byte_tokenizer)
    with pytest.raises(ValueError, match="already holds shards"):
        write_shards(make_docs(20), tmp_path / "s", byte_tokenizer)
    write_shards(make_docs(10), tmp_path / "s", byte_tokenizer, overwrite=True, shard_tokens=50)
    assert shards.verify(tmp_path / "s") > 2
    with pytest.raises(ValueError, match="shard_tokens"):
        write_shards(make_docs(5), tmp_path / "t", byte_tokenizer, shard_tokens=0)
    no_eot = Tokenizer({i: bytes([i]) for i in range(256)}, [], name="bytes")
    with pytest.raises(ValueError, match="no <|endoftext|> special token"):
        write_shards(make_docs(5), tmp_path / "u", no_eot)
    with pytest.raises(ShardError, match="not a shard folder"):
        shards.read_manifest(tmp_path / "nowhere")


def test_bpe_trained_on_the_documents(tmp_path):
    stats = write_shards(make_docs(200), tmp_path / "s", "bpe-300", shard_tokens=5000)
    tok = Tokenizer.load(tmp_path / "s" / "tokenizer.json")
    assert tok.vocab_size == 300 and tok.special_tokens[EOT] in range(300)
    assert stats.tokens["train"] < stats.bytes["train"]  # the merges compress


def test_gpt2_tokenizer_offline(tmp_path):
    """The chapter's default tokenizer; ids as tiktoken's own encoder gives them."""
    tok = shards.resolve_tokenizer("gpt2")
    docs = make_docs(10)
    write_shards(docs, tmp_path / "s", tok, val_fraction=0.0)
    enc = tok.to_tiktoken()
    expected = [i for d in docs for i in [50256, *enc.encode_ordinary(d.text)]]
    assert read_shard(tmp_path / "s" / "train_000000.bin").tolist() == expected
    # tiktoken's engine with the same vocabulary writes the same files
    write_shards(docs, tmp_path / "t", tok, val_fraction=0.0, engine="tiktoken", workers=2, chunk_docs=3)
    for name in ("train_000000.bin", "manifest.json", "tokenizer.json"):
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "t" / name).read_bytes()


def test_tiktoken_engine_equals_book_engine_on_a_trained_bpe(tmp_path):
    docs = make_docs(150, seed=3)
    write_shards(docs, tmp_path / "book", "bpe-400", shard_tokens=3000)
    tok = tmp_path / "book" / "tokenizer.json"
    write_shards(docs, tmp_path / "tt", tok, shard_tokens=3000, engine="tiktoken")
    names = sorted(p.name for p in (tmp_path / "book").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "tt").iterdir())
    for name in names:
        assert (tmp_path / "book" / name).read_bytes() == (tmp_path / "tt" / name).read_bytes(), name
    with pytest.raises(ValueError, match="engine is one of"):
        write_shards(docs, tmp_path / "x", tok, engine="rust")


# ---------------------------------------------------------------------- reading it back


def test_concat_tokens_slices_like_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 100, size=n).astype(np.uint16) for n in (5, 1, 17, 9)]
    whole = np.concatenate(parts)
    concat = shards.ConcatTokens(parts)
    assert len(concat) == len(whole)
    for _ in range(200):
        i, j = sorted(rng.integers(0, len(whole) + 1, size=2).tolist())
        assert concat[i:j].tolist() == whole[i:j].tolist()
    assert concat[::3].tolist() == whole[::3].tolist() and concat[-1] == whole[-1] and concat[5] == whole[5]
    assert np.asarray(concat).tolist() == whole.tolist()


def test_shard_dataset_streams_every_token_across_boundaries(tmp_path, byte_tokenizer):
    write_shards(make_docs(80), tmp_path / "s", byte_tokenizer, shard_tokens=700, val_fraction=0.0)
    whole = np.concatenate([read_shard(p) for p in shards.shard_paths(tmp_path / "s")]).astype(np.int64)
    B, T = 3, 16
    ds = ShardDataset(tmp_path / "s", B, T, shuffle=False)
    n = ds.batches_per_epoch
    assert n == (len(whole) - 1) // (B * T) and n > 10
    batches = list(islice(ds, n + 1))
    assert batches[n][0].flatten().tolist() == whole[: B * T].tolist()  # the next epoch starts over
    batches = batches[:n]
    for k, (x, y) in enumerate(batches):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype
        window = whole[k * B * T : k * B * T + B * T + 1]
        assert x.flatten().tolist() == window[:-1].tolist() and y.flatten().tolist() == window[1:].tolist()
    # shuffled shard order: deterministic by seed, different seeds differ, and a new epoch follows
    a = [x.tolist() for x, _ in islice(ShardDataset(tmp_path / "s", B, T, seed=1), n + 3)]
    b = [x.tolist() for x, _ in islice(ShardDataset(tmp_path / "s", B, T, seed=1), n + 3)]
    c = [x.tolist() for x, _ in islice(ShardDataset(tmp_path / "s", B, T, seed=2), n + 3)]
    assert a == b and a != c
    with pytest.raises(ValueError, match="fewer than one batch"):
        ShardDataset(tmp_path / "s", 1000, 1000)


def test_to_prepared_and_prepare_data_on_a_shard_folder(tmp_path, byte_tokenizer):
    docs = make_docs(150)
    write_shards(docs, tmp_path / "s", byte_tokenizer, shard_tokens=800, val_fraction=0.2)
    data = shards.to_prepared(tmp_path / "s")
    assert isinstance(data.train, shards.ConcatTokens) and len(data.val) > 0
    assert data.tokenizer.special_tokens == {EOT: 256}
    assert data.train_bytes == sum(len(d.text) for d in docs if not shards.is_val(d.id, 0.2))
    x, y = loader.get_batch(data.train, 4, 32, rng=np.random.default_rng(0))
    assert x.shape == (4, 32) and (x[:, 1:] == y[:, :-1]).all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        same = loader.prepare_data(str(tmp_path / "s"), "bpe-257")
        assert not caught
        loader.prepare_data(str(tmp_path / "s"), "bytes")
    assert "tokenized with 'bpe-257'" in str(caught[0].message) and "ignored" in str(caught[0].message)
    assert np.asarray(same.train).tolist() == np.asarray(data.train).tolist()


def test_trainer_trains_from_a_shard_folder(tmp_path, byte_tokenizer, seed_and_one_thread, monkeypatch):
    """``python -m llmbook.train --set dataset=<shard folder>``: a tiny model, a few steps."""
    from llmbook.train import main

    monkeypatch.setenv("LLMBOOK_CACHE_DIR", str(tmp_path / "cache"))
    write_shards(make_docs(200), tmp_path / "s", byte_tokenizer, shard_tokens=3000, val_fraction=0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["--config", "tiny", "--out", str(tmp_path / "runs"), "--no-progress", "--set",
                     f"dataset={json.dumps(str(tmp_path / 's'))}", 'tokenizer="bpe-257"', "max_steps=4",
                     "eval_interval=2", "sample_tokens=0", 'device="cpu"'])
    assert code == 0
    assert not [w for w in caught if "ignored" in str(w.message)]  # the setting names the shards' tokenizer
    run = tmp_path / "runs" / "tiny"
    assert Tokenizer.load(run / "tokenizer.json").special_tokens == {EOT: 256}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4
    assert 0 < summary["val_loss"] < np.log(257) + 0.5  # a finite loss near or below a uniform guess
