"""The book's datasets: where each one lives and how a chapter gets a local copy.

A chapter never opens a URL. It asks for a dataset by name and gets a path:

    >>> from llmbook import data
    >>> text = data.path("tinyshakespeare").read_text()   # doctest: +SKIP

The copy is looked up in this order, so the same chapter works on a laptop with
internet, on an offline build machine, and in CI:

1. ``$LLMBOOK_DATA_DIR/<file>``: a folder you point at (CI uses ``../shared/data``);
2. the user cache, ``$LLMBOOK_CACHE_DIR`` or ``~/.cache/llmbook``;
3. a download from the dataset's public home into the user cache, accepted only
   when its SHA-256 matches the registry (``LLMBOOK_OFFLINE=1`` forbids this step).

Whatever the step, the file is checked against the registry's SHA-256 once per
process, so a truncated or edited copy never trains a model silently.

From the shell, ``python -m llmbook.data`` lists the datasets and where each was
found, and ``python -m llmbook.data fetch`` downloads the missing ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here, so two processes must not fill the cache at once
    fcntl = None

ENV_DATA_DIR = "LLMBOOK_DATA_DIR"
ENV_CACHE_DIR = "LLMBOOK_CACHE_DIR"
ENV_OFFLINE = "LLMBOOK_OFFLINE"


@dataclass(frozen=True)
class Dataset:
    """One file the book reads, with enough provenance to fetch and verify it."""

    name: str
    filename: str
    url: str
    sha256: str
    license: str
    description: str
    gutenberg: bool = False  # a Project Gutenberg ebook: ``read_text`` returns its body without header and license


_RAW = "https://raw.githubusercontent.com"

DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in [
        Dataset(
            "tinyshakespeare",
            "tinyshakespeare.txt",
            f"{_RAW}/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            "public domain",
            "Tiny Shakespeare: 1,115,394 bytes of Shakespeare's plays (char-rnn)",
        ),
        Dataset(
            "corpus.en",
            "corpus.en",
            f"{_RAW}/stanford-cs336/assignment1-basics/main/tests/fixtures/corpus.en",
            "617f603a49eeb8a20de9d922d11a5d70e1d362327b9e91718bea2cdcdf9816ff",
            "see the Stanford CS336 assignment repository",
            "133 KB of English prose, a small BPE training corpus (CS336 fixtures)",
        ),
        Dataset(
            "tinystories_sample",
            "tinystories_sample.txt",
            f"{_RAW}/stanford-cs336/assignment1-basics/main/tests/fixtures/tinystories_sample.txt",
            "defaedb58bf28079f3e29c6142cb7f3568d331a577e0911c5d7925c465c50c43",
            "CDLA-Sharing-1.0 (TinyStories)",
            "A 3.8 KB TinyStories sample, stories separated by <|endoftext|>",
        ),
        Dataset(
            "instruction-data",
            "instruction-data.json",
            f"{_RAW}/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
            "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
            "Apache-2.0",
            "1,100 Alpaca-style instruction/input/output records",
        ),
        Dataset(
            "instruction-data-with-preference",
            "instruction-data-with-preference.json",
            f"{_RAW}/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/"
            "instruction-data-with-preference.json",
            "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
            "Apache-2.0",
            "The same 1,100 records with chosen/rejected responses (for DPO)",
        ),
        Dataset(
            "pride_and_prejudice",
            "pride_and_prejudice.txt",
            f"{_RAW}/cytora/pycon-nlp-in-10-lines/HEAD/data/pride_and_prejudice.txt",  # HEAD: the default branch
            "859c908774105fe56669e355156f2c9db0fe4ad2b6b67c068e3f8731aae55a99",
            "public domain in the US (Project Gutenberg eBook #1342)",
            "Jane Austen, Pride and Prejudice: Project Gutenberg's 2008 edition, 704,145 bytes "
            "with Gutenberg's header and license (gutenberg.org now serves other bytes)",
            gutenberg=True,
        ),
    ]
}


class DataNotFoundError(RuntimeError):
    """Raised when a dataset has no verified local copy and cannot be downloaded.

    The message is one line that says what to do; the build script and the CLI
    print it without a traceback.
    """


class ChecksumError(RuntimeError):
    """Raised when a copy of a dataset does not match the registry's SHA-256."""


_verified: set[Path] = set()


def cache_dir() -> Path:
    """The per-user cache: ``$LLMBOOK_CACHE_DIR``, else ``$XDG_CACHE_HOME/llmbook``."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "llmbook"


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the ``with`` block; wait for it if taken.

    Two processes filling the same cache entry (two notebooks, a notebook and
    the shell) take turns instead of writing over each other: the second one
    waits, then finds the entry done. The operating system drops the lock when
    its process dies, so a killed process never leaves the cache locked. A
    POSIX ``flock``; on Windows a no-op.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def data_dir() -> Path | None:
    """The folder named by ``$LLMBOOK_DATA_DIR``, if the variable is set."""
    value = os.environ.get(ENV_DATA_DIR)
    return Path(value).expanduser().resolve() if value else None


def sha256_of(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(dataset: Dataset, file: Path) -> Path:
    if file not in _verified:
        actual = sha256_of(file)
        if actual != dataset.sha256:
            raise ChecksumError(
                f"{file} does not match the registry's SHA-256 for '{dataset.name}' "
                f"(got {actual[:12]}…, want {dataset.sha256[:12]}…): delete it and run "
                f"`python -m llmbook.data fetch {dataset.name}`, or point "
                f"{ENV_DATA_DIR} at an unmodified copy."
            )
        _verified.add(file)
    return file


def _lookup(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise KeyError(f"unknown dataset '{name}'; the book's datasets are: {known}") from None


def local_copy(name: str) -> Path | None:
    """The first verified local copy of a dataset, or None. Never downloads."""
    dataset = _lookup(name)
    folders = [d for d in (data_dir(), cache_dir()) if d is not None]
    for folder in folders:
        candidate = folder / dataset.filename
        if candidate.is_file():
            return _verify(dataset, candidate)
    return None


def _download(dataset: Dataset, target: Path, timeout: float = 30.0) -> Path:
    """Fetch to a temporary file beside the target, verify, then rename atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{dataset.filename}.")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(dataset.url, timeout=timeout) as r:
            while block := r.read(1 << 20):
                out.write(block)
        actual = sha256_of(Path(tmp))
        if actual != dataset.sha256:
            raise ChecksumError(
                f"download of '{dataset.name}' from {dataset.url} has SHA-256 {actual[:12]}…, "
                f"expected {dataset.sha256[:12]}…; the public copy changed or was corrupted."
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _verified.add(target)
    return target


def path(name: str) -> Path:
    """A verified local path for a dataset, downloading it once if needed.

    Raises DataNotFoundError, with a message saying what to set or run, when no
    copy exists and the download is forbidden or fails.
    """
    dataset = _lookup(name)
    found = local_copy(name)
    if found is not None:
        return found
    where = f"{ENV_DATA_DIR}={data_dir()}" if data_dir() else f"{ENV_DATA_DIR} is not set"
    hint = (
        f"Dataset '{name}' ({dataset.filename}) not found ({where}; cache {cache_dir()}). "
        f"Set {ENV_DATA_DIR} to a folder that holds {dataset.filename}, or run "
        f"`python -m llmbook.data fetch {name}` on a machine with internet."
    )
    if os.environ.get(ENV_OFFLINE, "") not in ("", "0"):
        raise DataNotFoundError(hint + f" (downloads are off: {ENV_OFFLINE} is set)")
    try:
        return _download(dataset, cache_dir() / dataset.filename)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataNotFoundError(f"{hint} (download failed: {reason})") from None


class GutenbergFormatError(ValueError):
    """Raised when a text lacks Project Gutenberg's START/END markers, so its body cannot be cut out safely."""


# Project Gutenberg wraps every ebook between two marker lines. Their wording changed over the years:
#   2008 (our Pride and Prejudice):  *** START OF THIS PROJECT GUTENBERG EBOOK PRIDE AND PREJUDICE ***
#   today's files:                   *** START OF THE PROJECT GUTENBERG EBOOK PRIDE AND PREJUDICE ***
# so the patterns accept THIS/THE and any capitalisation of "ebook".
_GUTENBERG_START = re.compile(r"^\*{3} ?START OF (?:THIS|THE) PROJECT GUTENBERG E-?BOOK.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*{3} ?END OF (?:THIS|THE) PROJECT GUTENBERG E-?BOOK.*$", re.M | re.I)
# Inside the markers a file may still open with a transcriber's credit ("Produced by Anonymous Volunteers")
# and close with "End of the Project Gutenberg EBook of <title>, by <author>" (older files: "End of Project
# Gutenberg's <title>"). Neither is the author's text.
_GUTENBERG_CREDIT = re.compile(r"\A\s*(?:Produced by|E-?text prepared by|Transcribed from)[^\n]*(?:\n[^\n]+)*", re.I)
_GUTENBERG_LAST_LINE = re.compile(r"\n\s*End of (?:the )?Project Gutenberg'?s? E-?Book[^\n]*\s*\Z", re.I)


def gutenberg_body(text: str) -> str:
    """The author's text of a Project Gutenberg ebook: the header, the license footer and the credit line cut off.

    Everything up to the ``*** START OF ... PROJECT GUTENBERG EBOOK ... ***``
    line and from the ``*** END OF ...`` line on is Gutenberg's (title page,
    "This eBook is for the use of anyone...", 350 lines of license); a model
    pretrained on it would learn to write licenses. The body keeps its own line
    breaks and ends with one newline. Line endings are normalised to ``\\n``
    first, since Gutenberg also ships files with ``\\r\\n``.

    >>> gutenberg_body("Header\\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\\nIt is a truth.\\n"
    ...                "*** END OF THE PROJECT GUTENBERG EBOOK X ***\\nLicense")
    'It is a truth.\\n'

    A text without both markers is a ``GutenbergFormatError`` (one line): cutting
    at a guess could silently keep the license or lose the novel.
    """
    text = text.replace("\r\n", "\n")
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    if start is None or end is None or end.start() < start.end():
        missing = "START" if start is None else "END" if end is None else "END before START"
        raise GutenbergFormatError(
            f"not a Project Gutenberg ebook: no '*** {missing} OF THE PROJECT GUTENBERG EBOOK ... ***' marker line "
            f"({len(text):,} characters); pass the file as Gutenberg distributes it, or use it without stripping"
        )
    body = text[start.end():end.start()]
    body = _GUTENBERG_CREDIT.sub("", body, count=1)
    body = _GUTENBERG_LAST_LINE.sub("", body, count=1)
    return body.strip() + "\n"


def read_text(name: str) -> str:
    """The dataset as a model should read it: decoded as UTF-8, and for a Gutenberg ebook only its body.

    Project Gutenberg's header and license footer are cut off with
    ``gutenberg_body`` for datasets registered with ``gutenberg=True``; the raw,
    checksummed file is still at ``path(name)``.
    """
    dataset = _lookup(name)
    text = path(name).read_text(encoding="utf-8")
    return gutenberg_body(text) if dataset.gutenberg else text


def tiktoken_encoding(name: str = "gpt2"):
    """``tiktoken.get_encoding(name)``, offline when the data folder carries its cache.

    tiktoken downloads its BPE files on first use. When ``TIKTOKEN_CACHE_DIR`` is
    unset and ``$LLMBOOK_DATA_DIR/tiktoken_cache`` exists, we point tiktoken there,
    so the book builds with no network. tiktoken checks the files' hashes itself.
    """
    import tiktoken

    if "TIKTOKEN_CACHE_DIR" not in os.environ and data_dir() is not None:
        bundled = data_dir() / "tiktoken_cache"
        if bundled.is_dir():
            os.environ["TIKTOKEN_CACHE_DIR"] = str(bundled)
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # tiktoken raises requests/urllib errors when offline
        raise DataNotFoundError(
            f"tiktoken could not load the '{name}' encoding ({type(exc).__name__}). Set "
            f"TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache (the book's data "
            f"folder has one in tiktoken_cache/), or connect to the internet once."
        ) from None


def status() -> list[tuple[str, str]]:
    """(name, where) for every dataset, without downloading anything."""
    rows = []
    for name in DATASETS:
        try:
            found = local_copy(name)
            rows.append((name, str(found) if found else "missing"))
        except ChecksumError:
            rows.append((name, "checksum mismatch"))
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m llmbook.data [status|fetch|check] [NAME ...]``; errors are one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args else "status"
    names = args or list(DATASETS)
    try:
        if command == "status":
            for name, where in status():
                print(f"{name:34s} {where}")
            return 0
        if command in ("fetch", "check"):
            for name in names:
                found = path(name) if command == "fetch" else local_copy(name)
                if found is None:
                    path_hint = f"set {ENV_DATA_DIR} or run `python -m llmbook.data fetch {name}`"
                    raise DataNotFoundError(f"Dataset '{name}' not found: {path_hint}.")
                print(f"{name:34s} ok  {found}")
            return 0
        print(f"unknown command '{command}'; use status, fetch or check", file=sys.stderr)
        return 2
    except (DataNotFoundError, ChecksumError, KeyError) as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
