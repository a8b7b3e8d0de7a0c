"""The record every stage passes on, and JSONL in and out without holding a corpus in memory.

A web corpus does not fit in memory, so every reader here is a generator: a
stage sees one document at a time and a pipeline's memory does not grow with
the corpus. JSON Lines (one JSON object per line) is the format datatrove,
Dolma and FineWeb ship: appendable, splittable at any newline, readable by
``head``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Document:
    """One document: a stable ``id``, its ``text``, and ``metadata`` (source, planted labels, stage notes)."""

    id: str
    text: str
    metadata: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "text": self.text, "metadata": self.metadata}, ensure_ascii=False)

    @classmethod
    def from_dict(cls, record: dict) -> Document:
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError("a document record is a JSON object with a 'text' field (and 'id', 'metadata')")
        text = record["text"]
        if not isinstance(text, str):
            raise ValueError(f"a document's 'text' must be a string, got {type(text).__name__}")
        metadata = record.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ValueError(f"a document's 'metadata' must be an object, got {type(metadata).__name__}")
        return cls(id=str(record.get("id", "")), text=text, metadata=dict(metadata))


@dataclass
class ReadStats:
    """What reading a file met: documents read, lines with invalid UTF-8 (repaired), lines that were not JSON."""

    documents: int = 0
    invalid_utf8: int = 0
    bad_lines: int = 0


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_jsonl(path: str | Path, stats: ReadStats | None = None, strict: bool = False) -> Iterator[Document]:
    """Yield the documents of a JSONL file (``.jsonl`` or ``.jsonl.gz``), one at a time.

    Crawled text is often not valid UTF-8. A line that does not decode is
    decoded with U+FFFD replacement characters and counted in
    ``stats.invalid_utf8``, never a crash. A line that is not a JSON document
    is skipped and counted in ``stats.bad_lines`` (``strict=True`` raises a
    ``ValueError`` naming the file and line instead). Empty lines are skipped.
    A document without an ``id`` gets ``<file stem>:<line number>``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such JSONL file")
    stats = stats if stats is not None else ReadStats()
    stem = path.name.split(".")[0]
    with _open_bytes(path) as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                stats.invalid_utf8 += 1
            try:
                doc = Document.from_dict(json.loads(line))
            except (json.JSONDecodeError, ValueError) as exc:
                if strict:
                    raise ValueError(f"{path}:{number}: not a JSON document ({exc})") from None
                stats.bad_lines += 1
                continue
            if not doc.id:
                doc.id = f"{stem}:{number}"
            stats.documents += 1
            yield doc


def write_jsonl(docs: Iterable[Document], path: str | Path) -> int:
    """Write documents to ``path`` atomically (a temporary file, then a rename); return how many were written.

    A reader who interrupts a stage never finds a half-written file under the
    final name, which is what lets the runner trust a file that exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(tmp, "wb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="\n") as f:
            for doc in docs:
                f.write(doc.to_json())
                f.write("\n")
                n += 1
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n
