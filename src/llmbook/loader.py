"""Batches from token arrays: what the training loop eats.

A language model learns to predict every next token, so one training example
is a window of ``T + 1`` consecutive tokens, split into the input and the same
window shifted by one:

    tokens   [5, 9, 2, 7, 3, 8, ...]
    x        [5, 9, 2, 7]          the model reads these
    y        [9, 2, 7, 3]          and is scored on these: y[t] is the token after x[t]

One window teaches T predictions at once, each seeing a different amount of
context, which is what the causal mask makes possible. Training draws windows
at random offsets (``get_batch``); evaluation walks the split once in order
(``sequential_batches``) so every token is scored exactly once.

``prepare_data`` turns a text into these arrays once: split it, train or load
a tokenizer, write ``train.bin`` and ``val.bin`` (Chapter 3's
``encode_to_array``), and memory-map them on every later call.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from llmbook import data
from llmbook.bpe.arrays import encode_to_array, load_tokens
from llmbook.bpe.tokenizer import Tokenizer
from llmbook.bpe.train import train_bpe
from llmbook.errors import CacheError

TOKENIZER_HELP = ("'bytes' (256 byte tokens), 'bpe-<V>' (our BPE with V tokens, e.g. 'bpe-1024'), 'bpe-<V>+chat' "
                  "(the same with the chat special tokens among the V) or 'gpt2' (tiktoken's)")

# The special tokens a "+chat" tokenizer reserves from the start (Chapter 9's templates use them): the end of a
# document, and ChatML's turn markers. A base model trained with them never sees them in its text (its rows stay
# near their initialization), but its tokenizer and output layer need no resizing to fine-tune into a chat model.
CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Datasets made of several registered texts: each is split on its own (its last val_fraction validates), and
# the splits are joined, so every source is represented in both. "english" is the post-training base model's
# text (Chapter 9): Shakespeare's plays, Austen's novel (its Gutenberg header and license removed) and CS336's
# English prose, about 1.9 MB. No instruction or preference data: what a base model knows, it learned from text.
MIXTURES: dict[str, tuple[str, ...]] = {
    "english": ("tinyshakespeare", "pride_and_prejudice", "corpus.en"),
}


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Cut a text by position: the first ``1 - val_fraction`` of its characters train, the rest validate.

    >>> split_text("abcdefghij", 0.2)
    ('abcdefgh', 'ij')

    Why by position and not by shuffled lines: neighbouring lines of a play
    share names, phrases and rhymes, so with a random split the model would be
    scored on lines whose neighbours it trained on, and the validation loss
    would flatter it. Cutting once keeps a whole stretch of text unseen (for
    Tiny Shakespeare, the end of the collection), and it is nanoGPT's split,
    so our numbers compare with its.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    n_train = int(len(text) * (1.0 - val_fraction))
    return text[:n_train], text[n_train:]


def _to_device(x: np.ndarray, device: torch.device | str) -> Tensor:
    """An int64 tensor on ``device``; via pinned memory to CUDA so the copy runs alongside the GPU's work."""
    t = torch.from_numpy(x)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _windows(tokens: np.ndarray, starts: np.ndarray, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y, each (len(starts), T) int64, read window by window (a memmap reads only those pages)."""
    rows = np.stack([np.asarray(tokens[i : i + context_length + 1]) for i in starts]).astype(np.int64)
    return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    device: torch.device | str = "cpu",
    rng: np.random.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``batch_size`` windows at random offsets: ``x, y`` int64 ``(B, T)`` with ``y`` = ``x`` shifted by one.

    Offsets are uniform in ``0 .. len(tokens) - T - 1``, the last offset whose
    window still has a target for its last token. ``rng`` makes the draw
    reproducible (the trainer seeds one per step); without it NumPy's global
    generator is used, which ``llmbook.seeding.seed_everything`` seeds.
    """
    if batch_size <= 0 or context_length <= 0:
        raise ValueError(f"batch_size and context_length must be positive, got {batch_size}, {context_length}")
    high = len(tokens) - context_length  # exclusive bound on the offset
    if high <= 0:
        raise ValueError(
            f"the token array holds {len(tokens)} tokens, too few for one window of context_length="
            f"{context_length} plus its target: use a smaller context_length or more text"
        )
    starts = rng.integers(0, high, size=batch_size) if rng is not None else np.random.randint(0, high, size=batch_size)
    x, y = _windows(tokens, starts, context_length)
    return _to_device(x, device), _to_device(y, device)


def sequential_batches(
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Non-overlapping windows in order, ``batch_size`` at a time: every target token is scored once.

    Window k reads ``tokens[k·T : k·T + T]`` and predicts ``tokens[k·T + 1 : k·T + T + 1]``,
    so the targets tile the array from its second token on; the tail too
    short for a whole window is dropped, and the last batch may hold fewer rows.
    With 10 tokens, T=3 and B=2: windows at 0, 3, 6 -> batches of 2 and 1.
    """
    if batch_size <= 0 or context_length <= 0:
        raise ValueError(f"batch_size and context_length must be positive, got {batch_size}, {context_length}")
    n_windows = (len(tokens) - 1) // context_length
    if n_windows <= 0:
        raise ValueError(
            f"the token array holds {len(tokens)} tokens, too few for one window of context_length="
            f"{context_length} plus its target: use a smaller context_length or a larger validation split"
        )
    starts = np.arange(n_windows) * context_length
    for b, first in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        x, y = _windows(tokens, starts[first : first + batch_size], context_length)
        yield _to_device(x, device), _to_device(y, device)


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """How many bytes of text each token id stands for: int64, one entry per id up to ``vocab_size``.

    Ids missing from the vocabulary and special tokens get 0: they stand for
    no text. Summing the entries of the target tokens gives the bytes a loss
    was measured over, which turns nats per token into bits per byte.
    """
    special = set(tokenizer.special_tokens.values())
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i, token in tokenizer.vocab.items():
        if i not in special:
            lengths[i] = len(token)
    return lengths


def check_tokenizer_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is one ``prepare_data`` understands (see ``TOKENIZER_HELP``)."""
    if name in ("bytes", "gpt2"):
        return
    match = re.fullmatch(r"bpe-(\d+)(\+chat)?", name)
    if match is None:
        raise ValueError(f"unknown tokenizer {name!r}; use {TOKENIZER_HELP}")
    if int(match.group(1)) <= 256:
        raise ValueError(f"{name!r}: a BPE vocabulary needs more than the 256 byte tokens, e.g. 'bpe-1024'")


def make_tokenizer(name: str, train_text: str) -> Tokenizer:
    """The tokenizer called ``name``; a BPE is trained on ``train_text`` only, never on validation text."""
    check_tokenizer_name(name)
    if name == "bytes":
        return Tokenizer({i: bytes([i]) for i in range(256)}, [], name="bytes")
    if name == "gpt2":
        return Tokenizer.from_tiktoken("gpt2")
    size, chat = name.removeprefix("bpe-").removesuffix("+chat"), name.endswith("+chat")
    specials = CHAT_SPECIAL_TOKENS if chat else ()
    vocab, merges = train_bpe(train_text, int(size), special_tokens=specials)
    return Tokenizer(vocab, merges, list(specials), name=name)


@dataclass
class PreparedData:
    """A tokenized dataset on disk, memory-mapped: everything the trainer needs to draw batches and score them."""

    dir: Path
    tokenizer: Tokenizer
    train: np.ndarray  # token ids, a read-only np.memmap
    val: np.ndarray
    train_bytes: int  # UTF-8 bytes of the text behind each split
    val_bytes: int

    @property
    def bytes_per_token(self) -> float:
        """Validation bytes per validation token: how much text one token carries (1.0 for 'bytes')."""
        return self.val_bytes / len(self.val)


def mixture_split(name: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """The train and validation text of a ``MIXTURES`` dataset: each source split by ``split_text``, then joined.

    Sources are read with ``data.read_text`` (a Gutenberg ebook without its
    header and license) and joined by a blank line.
    """
    parts = [split_text(data.read_text(source).strip("\n"), val_fraction) for source in MIXTURES[name]]
    return "\n\n".join(train for train, _ in parts), "\n\n".join(val for _, val in parts)


def _source(dataset: str) -> tuple[str, Path]:
    """(stem, file) for a registry name or a path to a UTF-8 text file."""
    if dataset in data.DATASETS:
        return dataset, data.path(dataset)
    file = Path(dataset).expanduser()
    if not file.is_file():
        raise data.DataNotFoundError(
            f"dataset {dataset!r} is neither a name in the registry ({', '.join(sorted(data.DATASETS))}) "
            "nor an existing text file: give one of those names, the path to a UTF-8 .txt file, or a folder of "
            "token shards (Chapter 2's pipeline writes one, with a manifest.json)"
        )
    return file.stem, file


def prepare_data(dataset: str, tokenizer: str, val_fraction: float = 0.1, root: Path | None = None) -> PreparedData:
    """Tokenize a dataset once into ``train.bin``, ``val.bin`` and ``tokenizer.json``; memory-map them.

    ``dataset`` may also be a folder of token shards written by Chapter 2's
    pipeline (``llmbook.pipeline.shards``, a ``manifest.json`` inside): its
    shards are used as they are, with their own tokenizer and split.

    The folder's name ends in a hash of the source bytes, the split and the
    tokenizer, so editing the text or changing either setting makes a new
    folder instead of silently reusing stale tokens. Building it holds a lock
    file beside the folder, so two processes never build it at once: the
    second waits and then loads what the first built.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1 (both splits need text), got {val_fraction}")
    shard_dir = Path(dataset).expanduser()
    if dataset not in data.DATASETS and (shard_dir / "manifest.json").is_file():
        return _from_shards(shard_dir, tokenizer)
    check_tokenizer_name(tokenizer)
    if dataset in MIXTURES:
        stem = dataset
        train_text, val_text = mixture_split(dataset, val_fraction)
        raw = f"{train_text}\0{val_text}".encode()
    else:
        stem, file = _source(dataset)
        raw = file.read_bytes()
        try:
            train_text, val_text = split_text(raw.decode("utf-8"), val_fraction)
        except UnicodeDecodeError as exc:
            raise ValueError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    sha8 = hashlib.sha256(raw + f"|{val_fraction!r}|{tokenizer}".encode()).hexdigest()[:8]
    folder = Path(root) if root is not None else data.cache_dir() / "tokens" / f"{stem}-{tokenizer}-{sha8}"

    train_bin, val_bin, tok_json = folder / "train.bin", folder / "val.bin", folder / "tokenizer.json"
    # tokenizer.json is written last: its presence says the two arrays are complete
    if not tok_json.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with data.file_lock(folder.with_name(f".{folder.name}.lock")):
            if not tok_json.is_file():  # another process may have built it while we waited
                tok = make_tokenizer(tokenizer, train_text)
                encode_to_array(tok, train_text, train_bin)
                encode_to_array(tok, val_text, val_bin)
                tok.save(tok_json)  # atomic, through a unique temporary name; written last: the cache's "done" mark
    try:
        return PreparedData(
            dir=folder,
            tokenizer=_cached(Tokenizer.load, tok_json),
            train=_cached(load_tokens, train_bin),
            val=_cached(load_tokens, val_bin),
            train_bytes=len(train_text.encode("utf-8")),
            val_bytes=len(val_text.encode("utf-8")),
        )
    except CacheError as exc:
        raise CacheError(f"{exc.args[0]}: delete the folder {folder} (a cache; the next run rebuilds it)") from None


def _from_shards(folder: Path, tokenizer: str) -> PreparedData:
    """A folder of Chapter 2's token shards: its tokens, its split and its tokenizer (the ``tokenizer`` setting yields).

    The shards were tokenized once, by the pipeline, so they decide the tokenizer
    and the validation split; a different ``tokenizer`` setting is ignored, with
    a warning that names both.
    """
    import warnings

    from llmbook.pipeline.shards import to_prepared

    prepared = to_prepared(folder)
    if tokenizer != prepared.tokenizer.name:
        warnings.warn(f"{folder} was tokenized with {prepared.tokenizer.name!r}; the tokenizer setting "
                      f"{tokenizer!r} is ignored (the shards' tokenizer and validation split are used)", stacklevel=3)
    return prepared


def _cached(load, file: Path):
    """``load(file)`` for a file of the token cache; CacheError naming the file if it is damaged."""
    try:
        return load(file)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CacheError(f"the cached {file} is damaged ({type(exc).__name__}: {reason[:160]})") from None
