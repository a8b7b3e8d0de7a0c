"""The last stage: tokenize the kept documents into fixed-size binary shards, and stream batches back out.

Training reads the corpus millions of times in windows of a few hundred
tokens, so it is tokenized once, in parallel, and written as raw integers.
One file per corpus would not do at web scale (FineWeb-Edu's 10 B-token
sample is a hundred files of 100 M tokens): fixed-size *shards* can be written
by many workers, copied, checksummed and read one at a time. Each shard is

    header   256 int32 (1,024 bytes): magic, version, token count, bytes per token, 0, ...
    tokens   count x uint16 (vocabulary < 65,536) or uint32

which is the layout of karpathy/llm.c's ``dev/data/data_common.py``
(``write_datafile``: magic 20240520 / version 1 for uint16 tokens, 20240801 /
version 7 for uint32, then the count; llm.c leaves the fourth value at 0 and
its loaders read only the first three), so llm.c's loaders could read these
files too. The header makes a shard self-describing: a truncated copy or a
file that is not a shard is caught by its size and magic before a single
token is trained on.

Every document starts with ``<|endoftext|>`` (as llm.c's ``fineweb.py`` does),
so a window that spans two documents shows the model where one ends, and the
document's text is encoded with ``encode_ordinary``: a web page that contains
the string "<|endoftext|>" cannot forge the special token. ``manifest.json``
lists the shards (tokens, documents, bytes, SHA-256) and the tokenizer, and is
written last: its presence says the folder is complete.

The validation split is chosen per document by a hash of its id, not by
position: a document stays on the same side when filters upstream change what
else survives, so validation losses of two pipeline versions stay comparable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmbook.pipeline.document import Document
from llmbook.pipeline.processes import pool_context

if TYPE_CHECKING:  # Chapter 3's tokenizer, Chapter 7's record and torch, imported where they are used
    from torch import Tensor

    from llmbook.bpe.tokenizer import Tokenizer
    from llmbook.loader import PreparedData

HEADER_INTS = 256  # the header is 256 int32 values, as llm.c's
HEADER_BYTES = HEADER_INTS * 4
# (magic, version) by bytes per token: llm.c's values for its GPT-2 (uint16) and Llama 3 (uint32) shards
FORMATS = {2: (20240520, 1), 4: (20240801, 7)}
EOT = "<|endoftext|>"
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
_SHARD_NAME = re.compile(r"(train|val)_\d{6}\.bin")


class ShardError(ValueError):
    """A shard file or folder that cannot be read: truncated, not a shard, an unknown version, a bad manifest."""


# ---------------------------------------------------------------------- one shard on disk


def write_shard(path: str | Path, tokens: np.ndarray) -> str:
    """Write ``tokens`` (uint16 or uint32) with its header to ``path`` atomically; return the file's SHA-256.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "train_000000.bin"
    >>> _ = write_shard(p, np.array([50256, 464, 3797], dtype=np.uint16)); read_shard(p).tolist()
    [50256, 464, 3797]
    """
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.dtype.itemsize not in FORMATS or tokens.dtype.kind != "u":
        raise ValueError(f"shard tokens must be uint16 or uint32, got {tokens.dtype}")
    if len(tokens) >= 2**31:
        raise ValueError(f"a shard holds fewer than 2**31 tokens (its count is an int32), got {len(tokens)}")
    magic, version = FORMATS[tokens.dtype.itemsize]
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = magic, version, len(tokens), tokens.dtype.itemsize
    body = header.tobytes() + tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes()
    _atomic_write(path, body)
    return hashlib.sha256(body).hexdigest()


def _atomic_write(path: Path, body: bytes) -> None:
    """``body`` to ``path`` through a unique temporary file and a rename: never half a file under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_header(path: str | Path) -> tuple[np.dtype, int]:
    """(dtype, token count) of a shard, after checking its magic, version and size; ShardError naming the file."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated shard ({size} bytes, less than the {HEADER_BYTES}-byte header)")
    with open(path, "rb") as f:
        magic, version, count, width = np.frombuffer(f.read(16), dtype="<i4").tolist()
    known = {m: (v, w) for w, (m, v) in FORMATS.items()}
    if magic not in known:
        raise ShardError(f"{path}: not a token shard (magic {magic}, expected one of {sorted(known)})")
    if version != known[magic][0]:
        raise ShardError(f"{path}: shard format version {version}, this llmbook reads version {known[magic][0]}")
    width = known[magic][1]  # llm.c leaves header[3] at 0; the magic says the width
    expected = HEADER_BYTES + count * width
    if count < 0 or size != expected:
        raise ShardError(f"{path}: truncated or damaged shard (its header says {count} tokens = {expected} bytes, "
                         f"the file holds {size}); rewrite the shards")
    return np.dtype(f"<u{width}"), count


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of a shard, memory-mapped read-only after the header is checked (nothing else is read)."""
    dtype, count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


# ---------------------------------------------------------------------- the tokenizer


def resolve_tokenizer(spec: Tokenizer | str | Path, train_text: str | None = None) -> Tokenizer:
    """The tokenizer ``spec`` names: a ``Tokenizer``, a tiktoken name ("gpt2"), "bpe-<V>" or a tokenizer.json.

    "bpe-<V>" trains Chapter 3's BPE with V tokens on ``train_text`` (the kept
    documents), reserving ``<|endoftext|>``. Every tokenizer must have that
    special token: it separates the documents.
    """
    from llmbook.bpe.tokenizer import Tokenizer  # Chapter 3

    if isinstance(spec, Tokenizer):
        tok = spec
    elif isinstance(spec, Path) or str(spec).endswith(".json"):
        tok = Tokenizer.load(spec)
    elif (match := re.fullmatch(r"bpe-(\d+)", str(spec))) is not None:
        from llmbook.bpe.train import train_bpe

        if int(match.group(1)) <= 257:
            raise ValueError(f"{spec!r}: a BPE needs more than the 256 byte tokens and <|endoftext|>, e.g. 'bpe-4096'")
        if not train_text:
            raise ValueError(f"{spec!r} is trained on the documents, and there are none")
        vocab, merges = train_bpe(train_text, int(match.group(1)), special_tokens=(EOT,))
        tok = Tokenizer(vocab, merges, [EOT], name=str(spec))
    else:
        try:
            tok = Tokenizer.from_tiktoken(str(spec))
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(f"unknown tokenizer {spec!r}: use 'gpt2' (or another tiktoken name), 'bpe-<V>' or "
                             f"the path to a tokenizer.json ({type(exc).__name__}: {str(exc)[:120]})") from None
    if EOT not in tok.special_tokens:
        raise ValueError(f"tokenizer {tok.name!r} has no {EOT} special token to separate documents; "
                         f"build it with special_tokens=['{EOT}']")
    return tok


# ---------------------------------------------------------------------- parallel tokenization

ENGINES = ("book", "tiktoken")
_worker: dict = {}  # per process: the tokenizer and the function that encodes a document


def _init_worker(tok: Tokenizer, engine: str) -> None:
    """Set up a worker: ``engine="tiktoken"`` runs the same vocabulary and merges in tiktoken's Rust BPE."""
    _worker["tok"] = tok
    _worker["encode"] = tok.to_tiktoken().encode_ordinary if engine == "tiktoken" else tok.encode_ordinary


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One chunk of documents: (every document's ids, ``<|endoftext|>`` first, concatenated; their lengths; bytes)."""
    tok, encode = _worker["tok"], _worker["encode"]
    eot = tok.special_tokens[EOT]
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    ids, lengths, sizes = [], np.empty(len(texts), np.int64), np.empty(len(texts), np.int64)
    for i, text in enumerate(texts):
        doc = encode(text)  # encode_ordinary: untrusted text, a literal "<|endoftext|>" stays ordinary text
        ids.append(eot)
        ids.extend(doc)
        lengths[i], sizes[i] = len(doc) + 1, len(text.encode("utf-8"))
    return np.asarray(ids, dtype=dtype), lengths, sizes


def is_val(doc_id: str, val_fraction: float) -> bool:
    """Whether a document validates: the first 8 bytes of SHA-256(id), as a fraction of 2**64, below val_fraction."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h < val_fraction * 2**64


class _ShardWriter:
    """Fills shards of exactly ``shard_tokens`` tokens for one split (the last one shorter) and records them."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.parts: list[np.ndarray] = []
        self.filled = self.documents = self.bytes = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray, n_bytes: int) -> None:
        """One document's tokens; a document is counted in the shard where it starts, and may run into the next."""
        self.documents += 1
        self.bytes += n_bytes
        while len(tokens):
            take = self.shard_tokens - self.filled
            self.parts.append(tokens[:take])
            self.filled += len(tokens[:take])
            tokens = tokens[take:]
            if self.filled == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.filled and not self.documents:
            return
        name = f"{self.split}_{len(self.shards):06d}.bin"
        tokens = np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
        sha = write_shard(self.folder / name, tokens.astype(self.dtype, copy=False))
        self.shards.append({"file": name, "split": self.split, "tokens": int(len(tokens)),
                            "documents": self.documents, "bytes": self.bytes, "sha256": sha})
        self.parts, self.filled, self.documents, self.bytes = [], 0, 0, 0


@dataclass
class ShardStats:
    """What ``write_shards`` wrote: documents, tokens and text bytes per split, shards, seconds."""

    folder: Path
    documents: dict[str, int]
    tokens: dict[str, int]
    bytes: dict[str, int]
    shards: int
    seconds: float

    @property
    def docs_per_s(self) -> float:
        return sum(self.documents.values()) / max(self.seconds, 1e-9)


def write_shards(
    docs: Iterable[Document],
    folder: str | Path,
    tokenizer: Tokenizer | str | Path = "gpt2",
    shard_tokens: int = 1_000_000,
    val_fraction: float = 0.1,
    workers: int = 1,
    chunk_docs: int = 256,
    bpe_train_chars: int = 2_000_000,
    engine: str = "book",
    overwrite: bool = False,
    progress: bool = False,
) -> ShardStats:
    """Tokenize ``docs`` with ``workers`` processes into ``train_*.bin`` / ``val_*.bin`` shards and a manifest.

    Documents go to the workers in chunks of ``chunk_docs`` and are written in
    the order they were sent, so the shards are byte-identical for any number of
    workers. A "bpe-<V>" tokenizer is trained on the first ``bpe_train_chars``
    characters of the training documents. ``engine="tiktoken"`` encodes with
    ``tokenizer.to_tiktoken()``, the same ids from tiktoken's Rust code
    (tests/test_shards.py compares the files), faster. The
    folder gets ``tokenizer.json`` and, last, ``manifest.json``.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    if shard_tokens <= 0 or workers <= 0 or chunk_docs <= 0:
        raise ValueError(f"shard_tokens, workers and chunk_docs must be positive, got {shard_tokens}, {workers}, "
                         f"{chunk_docs}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if engine not in ENGINES:
        raise ValueError(f"engine is one of {', '.join(ENGINES)}, got {engine!r}")
    if (folder / MANIFEST).exists() and not overwrite:
        raise ValueError(f"{folder} already holds shards (it has a {MANIFEST}); pass overwrite=True or another folder")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (folder / MANIFEST, *folder.glob("*.bin")):  # an earlier, interrupted or replaced, run's files
        if stale.name == MANIFEST or _SHARD_NAME.fullmatch(stale.name):
            stale.unlink(missing_ok=True)

    start = time.perf_counter()
    docs = iter(docs)
    head: list[Document] = []
    if isinstance(tokenizer, str) and tokenizer.startswith("bpe-"):  # train on the first training documents
        chars = 0
        for doc in docs:
            head.append(doc)
            if not is_val(doc.id or doc.text, val_fraction):
                chars += len(doc.text)
            if chars >= bpe_train_chars:
                break
        sample = EOT.join(d.text for d in head if not is_val(d.id or d.text, val_fraction))
        tok = resolve_tokenizer(tokenizer, sample[:bpe_train_chars])
    else:
        tok = resolve_tokenizer(tokenizer)
    dtype = np.dtype(np.uint16) if tok.vocab_size <= 1 << 16 else np.dtype(np.uint32)
    writers = {s: _ShardWriter(folder, s, dtype, shard_tokens) for s in ("train", "val")}

    def chunks() -> Iterator[tuple[list[str], list[str]]]:
        stream = chain(head, docs)
        while batch := list(islice(stream, chunk_docs)):
            splits = ["val" if is_val(d.id or d.text, val_fraction) else "train" for d in batch]
            yield [d.text for d in batch], splits

    def write(result: tuple[np.ndarray, np.ndarray, np.ndarray], splits: list[str]) -> None:
        ids, lengths, sizes = result
        ends = np.cumsum(lengths)
        for split, end, n, size in zip(splits, ends.tolist(), lengths.tolist(), sizes.tolist(), strict=True):
            writers[split].add(ids[end - n : end], size)
        bar.update(len(splits))

    bar = tqdm(desc="tokenize", unit="doc", disable=not progress)
    try:
        if workers == 1:
            _init_worker(tok, engine)
            for batch, splits in chunks():
                write(_encode_chunk(batch), splits)
        else:
            # at most 2 chunks per worker in flight, taken back in the order they were sent: bounded memory,
            # and the same shards for any number of workers
            # (a process pool that raises BrokenProcessPool if a worker is killed, where multiprocessing.Pool hangs)
            with ProcessPoolExecutor(workers, mp_context=pool_context(), initializer=_init_worker,
                                     initargs=(tok, engine)) as pool:
                in_flight: deque = deque()
                for batch, splits in chunks():
                    in_flight.append((pool.submit(_encode_chunk, batch), splits))
                    if len(in_flight) >= 2 * workers:
                        future, done_splits = in_flight.popleft()
                        write(future.result(), done_splits)
                while in_flight:
                    future, done_splits = in_flight.popleft()
                    write(future.result(), done_splits)
    finally:
        bar.close()
    for w in writers.values():
        w.flush()

    tok.save(folder / TOKENIZER_FILE)
    shards = writers["train"].shards + writers["val"].shards
    totals = {s: {k: sum(x[k] for x in shards if x["split"] == s) for k in ("tokens", "documents", "bytes")}
              for s in ("train", "val")}
    manifest = {
        "format": "llmbook-shards", "version": 1, "header_bytes": HEADER_BYTES, "dtype": dtype.name,
        "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size, "eot": tok.special_tokens[EOT],
                      "file": TOKENIZER_FILE},
        "eot": "before every document", "shard_tokens": shard_tokens,
        "split": {"rule": "sha256(id, or text without an id)[:8] / 2**64 < val_fraction", "val_fraction": val_fraction},
        "totals": totals, "shards": shards,
    }
    _atomic_write(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())  # last: the folder is done
    by_split = {k: {s: t[k] for s, t in totals.items()} for k in ("documents", "tokens", "bytes")}
    return ShardStats(folder, by_split["documents"], by_split["tokens"], by_split["bytes"], len(shards),
                      time.perf_counter() - start)


# ---------------------------------------------------------------------- reading a shard folder


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a shard folder; ShardError with one line if it is missing or not one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{folder} is not a shard folder (no {MANIFEST}): write it with write_shards")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != "llmbook-shards":
            raise ValueError("its 'format' is not 'llmbook-shards'")
        if manifest.get("version") != 1:
            raise ValueError(f"version {manifest.get('version')}, this llmbook reads version 1")
        manifest["shards"], manifest["tokenizer"]["vocab_size"]  # noqa: B018 - the fields every reader needs
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ShardError(f"{path} is not a shard manifest ({type(exc).__name__}: {str(exc)[:160]})") from None
    return manifest


def shard_paths(folder: str | Path, split: str = "train") -> list[Path]:
    """The shard files of one split, in the manifest's order."""
    if split not in ("train", "val"):
        raise ValueError(f"split is 'train' or 'val', got {split!r}")
    folder = Path(folder)
    return [folder / s["file"] for s in read_manifest(folder)["shards"] if s["split"] == split]


def verify(folder: str | Path) -> int:
    """Check every shard's header and SHA-256 against the manifest; return the number checked (ShardError if not)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for s in manifest["shards"]:
        path = folder / s["file"]
        if not path.is_file():
            raise ShardError(f"{path}: missing (the manifest lists it)")
        _, count = read_header(path)
        if count != s["tokens"] or hashlib.sha256(path.read_bytes()).hexdigest() != s["sha256"]:
            raise ShardError(f"{path}: does not match its manifest entry (tokens or SHA-256 differ); rewrite it")
    return len(manifest["shards"])


class ConcatTokens:
    """Several shards seen as one read-only token array: ``len`` and slices, reading only the shards a slice touches.

    What the trainer's ``loader.get_batch`` needs from ``PreparedData.train``
    (``len(tokens)`` and ``tokens[i : i + T + 1]``), without copying the shards
    into one file. ``np.asarray(concat)`` reads everything, for small corpora.
    """

    def __init__(self, parts: list[np.ndarray]):
        if not parts:
            raise ValueError("ConcatTokens needs at least one array")
        self.parts = parts
        self.dtype = parts[0].dtype
        self.starts = np.cumsum([0] + [len(p) for p in parts])  # part k holds [starts[k], starts[k+1])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return np.asarray(self)[key]
            if stop <= start:
                return np.zeros(0, self.dtype)
            first = int(np.searchsorted(self.starts, start, side="right")) - 1
            last = int(np.searchsorted(self.starts, stop, side="left")) - 1
            pieces = [self.parts[k][max(start - self.starts[k], 0) : stop - self.starts[k]]
                      for k in range(first, last + 1)]
            return np.concatenate(pieces) if len(pieces) > 1 else np.asarray(pieces[0])
        i = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"index {key} out of range for {len(self)} tokens")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k][i - self.starts[k]]

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self.parts)
        return out if dtype is None else out.astype(dtype)


def split_tokens(folder: str | Path, split: str = "train") -> np.ndarray | ConcatTokens:
    """All tokens of a split: one shard's memmap, or several joined by ``ConcatTokens`` (nothing read yet)."""
    parts = [read_shard(p) for p in shard_paths(folder, split)]
    if not parts:
        raise ShardError(f"{folder} has no {split} shards (write_shards with val_fraction > 0 makes both splits)")
    return parts[0] if len(parts) == 1 else ConcatTokens(parts)


def to_prepared(folder: str | Path) -> PreparedData:
    """A shard folder as the trainer's ``loader.PreparedData``: train and val tokens, the tokenizer, text bytes.

    This is what ``python -m llmbook.train --set dataset=<shard folder>``
    trains on (``loader.prepare_data`` calls it for a folder with a manifest).
    """
    from llmbook.bpe.tokenizer import Tokenizer  # Chapter 3
    from llmbook.loader import PreparedData  # Chapter 7's record of a tokenized dataset

    folder = Path(folder)
    manifest = read_manifest(folder)
    try:
        tok = Tokenizer.load(folder / manifest["tokenizer"]["file"])
    except (OSError, ValueError, KeyError) as exc:
        raise ShardError(f"{folder / TOKENIZER_FILE}: cannot load the shards' tokenizer ({str(exc)[:160]})") from None
    totals = manifest["totals"]
    return PreparedData(dir=folder, tokenizer=tok, train=split_tokens(folder, "train"), val=split_tokens(folder, "val"),
                        train_bytes=totals["train"]["bytes"], val_bytes=totals["val"]["bytes"])


# ---------------------------------------------------------------------- streaming batches


class ShardDataset:
    """Batches ``(x, y)``, int64 ``(B, T)``, streamed across shard boundaries, one shard in memory at a time.

    llm.c's data loader, in Python: each epoch visits the shards in an order
    drawn from ``seed`` (``shuffle=False``: the manifest's order) and reads each
    front to back; a batch takes the next ``B·T + 1`` tokens, continuing into the
    next shard when one runs out, and the next batch starts at its last token,
    so every token is a target once per epoch. The same seed gives the same
    batches, whatever else the process did.
    """

    def __init__(self, folder: str | Path, batch_size: int, context_length: int, split: str = "train",
                 seed: int = 0, shuffle: bool = True):
        if batch_size <= 0 or context_length <= 0:
            raise ValueError(f"batch_size and context_length must be positive, got {batch_size}, {context_length}")
        self.paths = shard_paths(folder, split)
        self.B, self.T, self.seed, self.shuffle = batch_size, context_length, seed, shuffle
        counts = [read_header(p)[1] for p in self.paths]
        self.tokens = sum(counts)
        if sum(counts) < batch_size * context_length + 1:
            raise ValueError(f"the {split} shards of {folder} hold {sum(counts)} tokens, fewer than one batch of "
                             f"{batch_size} x {context_length} + 1: use a smaller batch or more text")

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one pass: each takes B·T new tokens, plus one to predict at the end of the pass."""
        return (self.tokens - 1) // (self.B * self.T)

    def epoch_order(self, epoch: int) -> list[Path]:
        if not self.shuffle:
            return list(self.paths)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))
        return [self.paths[i] for i in order]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches forever, epoch after epoch (``itertools.islice`` takes as many as you need)."""
        import torch  # here, so that writing shards (the pipeline's processes) does not load torch

        need = self.B * self.T + 1
        epoch = 0
        while True:
            carry = np.zeros(0, np.int64)  # the tokens a batch still needs from the previous shard
            for path in self.epoch_order(epoch):
                tokens, pos = read_shard(path), 0
                while len(carry) + len(tokens) - pos >= need:
                    take = need - len(carry)
                    buf = np.concatenate([carry, np.asarray(tokens[pos : pos + take], dtype=np.int64)])
                    pos += take
                    carry = buf[-1:]  # the last target is the next batch's first input
                    x = torch.from_numpy(buf[:-1].reshape(self.B, self.T).copy())
                    y = torch.from_numpy(buf[1:].reshape(self.B, self.T).copy())
                    yield x, y
                carry = np.concatenate([carry, np.asarray(tokens[pos:], dtype=np.int64)])
                del tokens  # the shard's memmap closes before the next one opens
            epoch += 1
