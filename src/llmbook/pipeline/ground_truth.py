"""Score a pipeline's decisions against the dirty corpus's planted labels: what each stage caught, what it broke.

A real crawl has no labels, so a pipeline's authors look at samples and
guess. The dirty corpus knows the answer for every page, which turns "does
this filter work" into two numbers per planted problem:

- **recall**: the share of pages carrying a problem that the pipeline removed
  (for problems that make a page unusable), or the share of planted lines and
  strings gone from the pages it kept (for problems a stage repairs in place:
  boilerplate lines, PII, HTML markup);
- **false removals**: the share of pages with nothing wrong, or with only a
  repairable problem, that some stage removed anyway.

Which stage removed a page is kept, so the chapter can say who caught what.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from llmbook.pipeline.document import Document

# problems that make a page worthless for training: the page should go
REMOVE = ("exact_dup", "near_dup", "spam", "gibberish", "short", "foreign", "lorem", "offensive", "repeated_chars")
# problems a stage repairs in place: the page should stay, without the planted lines
REPAIR = ("boilerplate", "pii", "html")


def should_remove(doc: Document, near_dup_threshold: float = 0.0) -> bool:
    """True when a page carries a problem that makes it worthless (a near duplicate only above the threshold)."""
    planted = doc.metadata.get("planted", [])
    for label in planted:
        if label == "near_dup":
            if (doc.metadata.get("jaccard") or 0.0) >= near_dup_threshold:
                return True
        elif label in REMOVE:
            return True
    return False


def planted_strings(doc: Document, label: str) -> list[str]:
    """The exact strings a repair stage should take out of the page for ``label`` (empty for other labels)."""
    meta = doc.metadata
    if label == "boilerplate":
        return list(meta.get("boilerplate") or [])
    if label == "pii":
        return list(meta.get("pii") or [])
    if label == "html":
        return list(meta.get("html_boilerplate") or [])
    return []


@dataclass
class LabelScore:
    """How the pipeline treated the pages carrying one label."""

    label: str
    pages: int = 0
    removed: int = 0
    by_stage: Counter = field(default_factory=Counter)  # stage name -> pages of this label it removed
    strings: int = 0  # planted strings in pages that were kept (repair labels)
    strings_left: int = 0  # ... still present in the kept page's final text

    @property
    def removed_share(self) -> float:
        return self.removed / self.pages if self.pages else 0.0

    @property
    def repaired_share(self) -> float:
        """Share of planted strings gone from the kept pages (1.0 when there were none to repair)."""
        return 1.0 - self.strings_left / self.strings if self.strings else 1.0


def score(
    docs: Iterable[Document],
    removed: Mapping[str, str],
    final_text: Mapping[str, str],
    near_dup_threshold: float = 0.0,
) -> dict[str, LabelScore]:
    """Score a run: ``removed`` maps a removed page's id to its ``"stage:rule"`` reason, ``final_text`` a kept one's.

    Returns a ``LabelScore`` per label in ``REMOVE + REPAIR``, plus ``"clean"``
    (pages with no label: every removal is a mistake) and ``"should_stay"``
    (clean pages and pages with only repairable problems). A page with
    several labels counts under each.
    """
    labels = ("clean", "should_stay", *REMOVE, *REPAIR)
    scores = {label: LabelScore(label) for label in labels}
    for doc in docs:
        planted = doc.metadata.get("planted", [])
        groups = [p for p in planted if p in scores]
        if not planted:
            groups.append("clean")
        if not should_remove(doc, near_dup_threshold):
            groups.append("should_stay")
        reason = removed.get(doc.id)
        for label in groups:
            s = scores[label]
            s.pages += 1
            if reason is not None:
                s.removed += 1
                s.by_stage[reason.split(":", 1)[0]] += 1
            elif label in REPAIR:
                text = final_text.get(doc.id, "")
                wanted = planted_strings(doc, label)
                s.strings += len(wanted)
                s.strings_left += sum(1 for w in wanted if w in text)
    return scores


def precision(docs: Iterable[Document], removed: Mapping[str, str], near_dup_threshold: float = 0.0) -> float:
    """Of the pages the pipeline removed, the share that should have gone (1.0 when it removed none)."""
    docs = list(docs)
    gone = [d for d in docs if d.id in removed]
    if not gone:
        return 1.0
    return sum(should_remove(d, near_dup_threshold) for d in gone) / len(gone)
