"""A corpus as a flat file of token ids, the form training reads it in.

Training samples random windows of a few hundred tokens from the whole corpus,
millions of times. Tokenizing on the fly would repeat the same work every
epoch, so we tokenize once and write the ids as raw unsigned integers:

    train.bin    [  464  3797  3332 ...]   uint16, 2 bytes a token
    train.json   {"dtype": "uint16", "count": 338025, "vocab_size": 50257, ...}

``np.memmap`` then maps the file into memory without reading it, and slicing
a window costs nothing. Two bytes a token suffice while every id is below
2**16 = 65,536, which covers GPT-2's 50,257 tokens; bigger vocabularies
(cl100k's 100,277) need four. The JSON sidecar records what the raw bytes
cannot say about themselves: their dtype, how many there are, which tokenizer
made them and from which source (its SHA-256), so a stale file is noticed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from llmbook.bpe.tokenizer import Tokenizer


def default_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer that holds every id: ``uint16`` up to 65,536 tokens, else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def sidecar(path: Path) -> Path:
    """Where the metadata of a token file lives: ``train.bin -> train.json``."""
    return Path(path).with_suffix(".json")


def _blocks(source: str | Path, chunk_lines: int, digest) -> Iterator[tuple[str, int]]:
    """Blocks of ``chunk_lines`` lines of a file (or of a text), with their size in bytes.

    The file is read with its line endings as they are (``newline=""``) and its
    bytes feed the SHA-256 ``digest`` on the way.
    """
    if not isinstance(source, Path):
        data = source.encode("utf-8")
        digest.update(data)
        yield source, len(data)
        return
    with open(source, encoding="utf-8", newline="") as f:
        while True:
            lines = [line for _, line in zip(range(chunk_lines), f, strict=False)]
            if not lines:
                return
            block = "".join(lines)
            data = block.encode("utf-8")
            digest.update(data)
            yield block, len(data)


def encode_to_array(
    tokenizer: Tokenizer,
    source: str | Path,
    out: Path,
    dtype: np.dtype | str | None = None,
    chunk_lines: int = 10_000,
) -> Path:
    """Tokenize ``source`` (a text, or a file when it is a ``Path``) into the raw file ``out``.

    Special tokens in the source (``<|endoftext|>`` between documents) are
    encoded as special tokens: a corpus file is trusted text. Memory stays
    bounded: ``chunk_lines`` lines are tokenized and appended at a time. Both
    ``out`` and its JSON sidecar are written to temporary files first and
    renamed at the end, so an interrupted run never leaves a truncated corpus
    that looks complete. The temporary names are unique, so two processes
    writing the same corpus at once each finish (the last rename wins).
    """
    out = Path(out)
    dtype = default_dtype(tokenizer.vocab_size) if dtype is None else np.dtype(dtype)
    if tokenizer.vocab_size - 1 > np.iinfo(dtype).max:
        raise ValueError(f"{dtype} cannot hold ids up to {tokenizer.vocab_size - 1}; use dtype=None to choose one")
    out.parent.mkdir(parents=True, exist_ok=True)
    total = source.stat().st_size if isinstance(source, Path) else len(source.encode("utf-8"))
    digest = hashlib.sha256()

    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")  # unique to this writer
    count = 0
    try:
        with open(fd, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=f"encode {out.name}") as bar:
            blocks = _blocks(source, chunk_lines, digest)

            def texts() -> Iterator[str]:
                for block, size in blocks:
                    yield block
                    bar.update(size)

            # encode_iterable carries pre-tokens that span two blocks over to the next one
            batch: list[int] = []
            for token_id in tokenizer.encode_iterable(texts(), allowed_special="all"):
                batch.append(token_id)
                if len(batch) >= 1 << 20:
                    f.write(np.asarray(batch, dtype=dtype).tobytes())
                    count, batch = count + len(batch), []
            f.write(np.asarray(batch, dtype=dtype).tobytes())
            count += len(batch)

        meta = {
            "dtype": dtype.name,
            "count": count,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer": tokenizer.name,
            "source": str(source) if isinstance(source, Path) else "<text>",
            "source_sha256": digest.hexdigest(),
        }
        meta_tmp = _temp_text(out.parent, json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out)
        os.replace(meta_tmp, sidecar(out))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _temp_text(folder: Path, text: str) -> str:
    """A new temporary file in ``folder`` holding ``text``, under a name no other process uses."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".sidecar.", suffix=".tmp")
    with open(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return tmp


def load_tokens(path: Path) -> np.ndarray:
    """The ids written by ``encode_to_array``, memory-mapped read-only (nothing is read yet).

    An empty corpus comes back as an empty array: there is nothing to map.
    """
    path = Path(path)
    meta = json.loads(sidecar(path).read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"])
    size = path.stat().st_size
    if size != meta["count"] * dtype.itemsize:
        raise ValueError(
            f"{path} holds {size} bytes, but its sidecar says {meta['count']} tokens of {dtype} "
            f"({meta['count'] * dtype.itemsize} bytes): the files do not belong together; re-run encode_to_array"
        )
    if meta["count"] == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(meta["count"],))
