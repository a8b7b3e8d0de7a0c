"""Pre-tokenization: cut text into the pieces that BPE merges inside of.

BPE never merges across a pre-token boundary. Without this step the most
frequent pairs of a corpus would glue words to the punctuation after them
("dog." "dog!" "dog?" as three tokens) and the vocabulary would fill with
near-duplicates. GPT-2 cuts text with a regular expression into runs of letters,
runs of digits, runs of punctuation and runs of whitespace, each optionally led
by one space, so that " the" is one pre-token and "the" another:

    >>> pretokenize("Hello world, it's 2024!")
    ['Hello', ' world', ',', ' it', "'s", ' 2024', '!']

Special tokens such as ``<|endoftext|>`` are cut out before that, so that no
merge ever reaches into them:

    >>> split_on_special("a<|endoftext|>b", ["<|endoftext|>"])
    ['a', '<|endoftext|>', 'b']

Training only needs how often each pre-token occurs (``count_pretokens``), and
that count is easy to share out: a large file is cut into chunks at places where
cutting cannot change the pre-tokens, and worker processes count the chunks.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import regex

# The exact regular expressions tiktoken uses (``enc._pat_str``). GPT-2's cuts
# "'s", "'t", ... off words, and keeps a leading space with the word after it.
# The possessive ``++`` only makes matching faster; it matches the same pieces
# as GPT-2's original ``+``. ``\s+(?!\S)`` leaves the last space of a run of
# spaces to start the next word: "a   b" -> ['a', '  ', ' b'].
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# GPT-4's (cl100k_base): case-insensitive contractions, numbers in groups of at
# most three digits, newlines kept with the punctuation before them.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)

PATTERNS: dict[str, str] = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN}

# Files smaller than this (4 MiB) are counted in-process: starting worker processes
# costs more than a few megabytes of regex matching saves.
PARALLEL_MIN_BYTES = 4 << 20


def resolve_pattern(pattern: str) -> str:
    """A pattern's name ("gpt2", "cl100k") or a regex of your own -> the regex."""
    return PATTERNS.get(pattern, pattern)


@lru_cache(maxsize=32)
def compiled(pattern: str) -> regex.Pattern:
    return regex.compile(resolve_pattern(pattern))


@lru_cache(maxsize=64)
def special_regex(special_tokens: tuple[str, ...]) -> regex.Pattern | None:
    """One alternation of the special tokens, longest first.

    The regex engine takes the first alternative that matches at a position, so
    listing the longest first makes "<|a|><|a|>" win over "<|a|>" where both are
    special. The capture group makes ``split`` keep the tokens it cuts on.
    """
    if not special_tokens:
        return None
    ordered = sorted(set(special_tokens), key=lambda s: (-len(s), s))
    return regex.compile("(" + "|".join(regex.escape(s) for s in ordered) + ")")


def split_on_special(text: str, special_tokens: Sequence[str]) -> list[str]:
    """Cut ``text`` at special tokens, keeping each special token as its own piece.

    Empty pieces are dropped, so every piece is either a special token or
    non-empty ordinary text:

    >>> split_on_special("<|a|><|a|>b", ["<|a|>", "<|a|><|a|>"])
    ['<|a|><|a|>', 'b']
    """
    pattern = special_regex(tuple(special_tokens))
    if pattern is None:
        return [text] if text else []
    return [piece for piece in pattern.split(text) if piece]


def pretokenize(text: str, pattern: str = GPT2_PATTERN) -> list[str]:
    """The pre-tokens of ``text``; joined together they give ``text`` back.

    >>> pretokenize("a   b\\n\\n")
    ['a', '  ', ' b', '\\n\\n']
    """
    return compiled(pattern).findall(text)


def _count_text(text: str, pattern: str, special_tokens: tuple[str, ...]) -> Counter[bytes]:
    """Count the pre-tokens of the ordinary pieces of ``text``; special tokens are skipped."""
    specials = set(special_tokens)
    counts: Counter[str] = Counter()
    findall = compiled(pattern).findall
    for piece in split_on_special(text, special_tokens):
        if piece not in specials:
            counts.update(findall(piece))
    return Counter({token.encode("utf-8"): n for token, n in counts.items()})


def _count_chunk(path: str, start: int, end: int, pattern: str, special_tokens: tuple[str, ...]) -> Counter[bytes]:
    """A worker's job: count the pre-tokens of bytes ``start:end`` of a file.

    A module-level function, so a worker process can import it by name: this
    is what makes multiprocessing work from a Jupyter kernel and with "spawn".
    """
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read(end - start).decode("utf-8")
    return _count_text(text, pattern, special_tokens)


def _is_plain(byte: int) -> bool:
    """Printable ASCII other than space: certainly a non-whitespace character."""
    return 0x21 <= byte <= 0x7E


def _find_safe_cut(window: bytes, start: int, specials: Sequence[bytes]) -> int:
    """The first position ``i >= start`` in ``window`` where cutting the text is harmless, or -1.

    Best is the start of a special token: the text is split there before
    pre-tokenization anyway. Failing that, just after a single newline between
    two non-space characters, as in "be:\\nthat": both GPT-2's and GPT-4's
    patterns end a pre-token with such a newline and start a new one after
    it, whatever follows. Next to a run of whitespace a cut is *not* harmless:
    "x  \\ny" gives ['x', '  ', '\\n', 'y'], but "x  \\n" alone ends in the
    single pre-token '  \\n'. ``window[:start]`` is context, so that we never
    cut through a special token that began before ``start``.
    """

    def inside_special(i: int) -> bool:  # does a special token start before i and end after it?
        return any(window.find(s, max(i - len(s) + 1, 0), i + len(s) - 1) >= 0 for s in specials)

    found = sorted(i for s in specials if (i := window.find(s, start)) >= 0)
    for i in found:
        if not inside_special(i):
            return i
    i = window.find(b"\n", max(start - 1, 1))
    while 0 < i < len(window) - 1:
        if _is_plain(window[i - 1]) and _is_plain(window[i + 1]) and not inside_special(i + 1):
            return i + 1
        i = window.find(b"\n", i + 1)
    return -1


def chunk_boundaries(path: Path, n_chunks: int, special_tokens: Sequence[str] = (), window: int = 1 << 16) -> list[int]:
    """Byte offsets that cut a file into about ``n_chunks`` independent chunks.

    We aim at equal sizes and move each cut forward to the next safe place,
    reading the file a window at a time, so chunks may come out fewer or
    unequal (a file with no safe place is one chunk). The result starts with 0,
    ends with the file size and is strictly increasing.
    """
    specials = [s.encode("utf-8") for s in special_tokens]
    context = max([2] + [len(s) for s in specials])  # bytes kept on each side of a window
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        for k in range(1, n_chunks):
            pos = max(k * size // n_chunks, bounds[-1] + 1)
            while pos < size:
                before = min(pos, context)
                f.seek(pos - before)
                i = _find_safe_cut(f.read(before + window + context), before, specials)
                if i >= 0:
                    bounds.append(pos - before + i)
                    break
                pos += window
            if pos >= size:
                break
    bounds.append(size)
    return bounds


def count_pretokens(
    source: str | Path,
    pattern: str = "gpt2",
    special_tokens: Sequence[str] = (),
    workers: int | None = None,
) -> Counter[bytes]:
    """How often each pre-token occurs, keyed by its UTF-8 bytes. Special tokens are not counted.

    ``source`` is text, or a file when it is a ``Path`` (read as UTF-8 bytes,
    line endings kept as they are). A file of at least ``PARALLEL_MIN_BYTES``
    is cut into chunks that ``workers`` processes count (None: one per CPU);
    the result is the same for every number of workers.

    >>> counts = count_pretokens("the cat and the hat and the bat")
    >>> counts[b" the"], counts[b" and"], counts[b"the"]
    (2, 2, 1)
    """
    special_tokens = tuple(special_tokens)
    if not isinstance(source, Path):
        return _count_text(source, pattern, special_tokens)

    workers = (os.cpu_count() or 1) if workers is None else workers
    size = source.stat().st_size
    if workers <= 1 or size < PARALLEL_MIN_BYTES:
        return _count_chunk(str(source), 0, size, pattern, special_tokens)

    # Several chunks per worker, so one slow chunk does not leave the others idle.
    bounds = chunk_boundaries(source, 4 * workers, special_tokens)
    jobs = [(str(source), a, b, pattern, special_tokens) for a, b in zip(bounds, bounds[1:], strict=False)]
    if len(jobs) == 1:
        return _count_chunk(*jobs[0])
    counts: Counter[bytes] = Counter()
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        for part in pool.map(_count_chunk, *zip(*jobs, strict=True)):
            counts.update(part)
    return counts
