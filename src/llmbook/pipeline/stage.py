"""The two shapes a pipeline stage takes, so the runner can chain any of them.

Most stages decide about one document at a time (a rule filter, language
identification, PII masking): a ``Filter``. Deduplication cannot: whether a
page is a copy depends on every other page. Such a stage first reads the whole
corpus once (``fit``: hash every text, build MinHash signatures and clusters),
then decides per document like a filter. datatrove splits its MinHash stage
the same way (signatures, buckets, clusters, then a filter pass), which is why
it scales out: each pass is a map over shards.

A stage's ``apply`` returns ``(document, None)`` to keep it (possibly with
changed text, e.g. masked e-mail addresses), or ``(document, reason)`` to drop
it, with ``reason`` a short ``"stage:rule"`` string the runner counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from llmbook.pipeline.document import Document

Decision = tuple[Document, str | None]


class Stage:
    """A corpus-wide stage: ``fit`` reads every document once, then ``apply`` decides for each.

    Subclasses set ``name`` and override ``apply`` (and ``fit`` when the
    decision needs the whole corpus). ``fit`` must be called before ``apply``
    for stages whose ``needs_fit`` is True.
    """

    name: str = "stage"
    needs_fit: bool = False

    def fit(self, docs: Iterable[Document]) -> None:  # noqa: B027 - a per-document stage has nothing to learn
        """Read the corpus once before any decision (nothing to do for a per-document stage)."""

    def apply(self, doc: Document) -> Decision:
        raise NotImplementedError

    def run(self, docs: Iterable[Document]) -> Iterator[Decision]:
        """Every document once, with its decision (``fit`` first when the stage needs it: the input is read twice)."""
        if self.needs_fit:
            docs = list(docs)
            self.fit(docs)
        for doc in docs:
            yield self.apply(doc)


class Filter(Stage):
    """A per-document keep/drop rule: subclasses implement ``reason(text) -> str | None`` (None keeps it)."""

    def reason(self, text: str) -> str | None:
        raise NotImplementedError

    def apply(self, doc: Document) -> Decision:
        why = self.reason(doc.text)
        return doc, (None if why is None else f"{self.name}:{why}")


def kept(decisions: Iterable[Decision]) -> Iterator[Document]:
    """The documents a stage kept."""
    for doc, reason in decisions:
        if reason is None:
            yield doc
