"""A toxicity filter: our hashed n-gram classifier on lines, compared with alt-profanity-check.

An offensive comment is one line in a page of a few hundred words. A
classifier of the whole page averages its features, so the comment's words
weigh 1/300 each and the page looks clean (measured: a page-level classifier
trained on the corpus flags none of the held-out offensive pages). So this
filter scores every **line** and drops a page whose worst line is toxic.

The labels are the dirty corpus's planted lines (``metadata["offensive"]``)
against every other line. That is also the filter's limit, and the chapter's
point about classifier bias: the model learns what was planted, a few dozen
insults and curses in a "Comment by user123:" template, not what is
offensive. Its most "toxic" words (``top_words``) are "comment" and "by":
on the 10 K corpus it scores "Comment by reader: I loved this chapter."
0.985 and "Shut up, you stupid ass." 0.019, and it has never seen a slur
that was not planted. alt-profanity-check (a calibrated linear SVM over
TF-IDF word features, trained on Davidson et al.'s hate-speech tweets and
Jigsaw's toxic Wikipedia comments, per its README) knows many more words
but flags words, not intent: Shakespeare's "bloody" and "suck" trip it on a
quarter of the clean pages. Measuring both against the same planted truth
shows each one's blind spots.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from llmbook.pipeline.classifier import (
    HashedNgramClassifier,
    held_out,
    precision_recall,
    sample,
    scored_decisions,
    top_words,
)
from llmbook.pipeline.document import Document
from llmbook.pipeline.stage import Decision, Filter


def lines_of(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Every non-empty line of every text, and the index of the text it came from.

    A text without a non-empty line contributes one empty line, so every text
    gets a score. ``lines_of(["a\\n\\nb", ""]) -> (["a", "b", ""], [0, 0, 1])``.
    """
    lines: list[str] = []
    owner: list[int] = []
    for i, text in enumerate(texts):
        mine = [ln for ln in text.split("\n") if ln.strip()] or [""]
        lines.extend(mine)
        owner.extend([i] * len(mine))
    return lines, np.array(owner, dtype=np.int64)


def max_per_text(scores: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """The largest line score of each text (``owner`` as from ``lines_of``)."""
    out = np.full(n, -np.inf)
    np.maximum.at(out, owner, scores)
    return out


def _is_text(doc: Document) -> bool:
    return doc.metadata.get("format", "text") == "text"


def labelled_lines(docs: Iterable[Document], max_negative: int = 10_000, seed: int = 0) -> tuple[list[str], list[str]]:
    """Training lines: the planted offensive lines ("toxic") and a seeded sample of all other lines ("ok")."""
    toxic: list[str] = []
    others: list[str] = []
    for doc in docs:
        if not _is_text(doc):
            continue
        planted = set(doc.metadata.get("offensive") or [])
        if "offensive" in (doc.metadata.get("planted") or []) and not planted:
            raise ValueError(f"{doc.id}: an 'offensive' page without metadata['offensive'] (its planted lines)")
        for line in lines_of([doc.text])[0]:
            (toxic if line in planted else others).append(line)
    others = sample(others, max_negative, seed)
    return toxic + others, ["toxic"] * len(toxic) + ["ok"] * len(others)


def train_toxicity_classifier(
    docs: Iterable[Document],
    seed: int = 0,
    test_fraction: float = 0.2,
    threshold: float = 0.5,
    epochs: int = 5,
    max_negative: int = 10_000,
    max_test: int | None = None,
) -> tuple[HashedNgramClassifier, dict]:
    """Train on the lines of the pages outside the held-out split; measure on the held-out pages.

    The report has line-level precision/recall (planted lines vs the rest)
    and page-level precision/recall (a page is flagged when its worst line is
    above ``threshold``; truth: "offensive" in its planted labels), and the
    words the model weighs most towards "toxic" (what it learnt). Training
    reads every planted line and ``max_negative`` other lines; at most
    ``max_test`` held-out pages (a seeded sample) are measured.
    """
    docs = [d for d in docs if _is_text(d)]
    train = [d for d in docs if not held_out(d, test_fraction, seed)]
    test = sample([d for d in docs if held_out(d, test_fraction, seed)], max_test, seed)
    texts, labels = labelled_lines(train, max_negative=max_negative, seed=seed)
    if "toxic" not in labels:
        raise ValueError("no planted offensive line outside the held-out split: use a larger corpus")
    t0 = time.perf_counter()
    clf = HashedNgramClassifier().fit(texts, labels, epochs=epochs, seed=seed)
    t1 = time.perf_counter()
    test_lines, test_labels = labelled_lines(test, max_negative=10**9)
    line_pr = precision_recall(
        np.array(test_labels) == "toxic", clf.proba_of(test_lines, "toxic") > threshold, positive=True
    )
    t2 = time.perf_counter()
    page_scores = toxicity_scores(clf, [d.text for d in test])
    t3 = time.perf_counter()
    truth = [_offensive(d) for d in test]
    page_pr = precision_recall(truth, page_scores > threshold, positive=True)
    report = {
        "threshold": threshold,
        "n_train_lines": len(texts),
        "n_train_toxic_lines": labels.count("toxic"),
        "n_test_pages": len(test),
        "n_test_offensive_pages": int(sum(truth)),
        "line": line_pr.as_dict(),
        "page": page_pr.as_dict(),
        "top_toxic_words": top_words(clf, texts, "toxic"),
        "train_seconds": t1 - t0,
        "pages_per_s": len(test) / max(t3 - t2, 1e-9),
    }
    return clf, report


def _offensive(doc: Document) -> bool:
    return "offensive" in (doc.metadata.get("planted") or [])


def toxicity_scores(clf: HashedNgramClassifier, texts: Sequence[str]) -> np.ndarray:
    """P(toxic) of each text's worst line."""
    lines, owner = lines_of(texts)
    return max_per_text(clf.proba_of(lines, "toxic"), owner, len(texts))


def compare_with_profanity_check(
    docs: Iterable[Document],
    clf: HashedNgramClassifier | None = None,
    seed: int = 0,
    threshold: float = 0.5,
    n_examples: int = 5,
) -> dict:
    """Ours and alt-profanity-check on the same held-out pages, each against the planted truth.

    Both score a page by its worst line (profanity-check also on the whole
    page, as its users usually call it). Reported: each one's page precision
    and recall, how often the two agree, and examples where they disagree
    (the line each found worst, with both scores).
    """
    from profanity_check import predict_prob  # scikit-learn and two joblib files: loaded only when asked

    docs = [d for d in docs if _is_text(d)]
    if clf is None:
        clf, _ = train_toxicity_classifier(docs, seed=seed, threshold=threshold)
    test = [d for d in docs if held_out(d, seed=seed)]
    texts = [d.text for d in test]
    truth = np.array([_offensive(d) for d in test])
    lines, owner = lines_of(texts)
    t0 = time.perf_counter()
    ours_line = clf.proba_of(lines, "toxic")
    t1 = time.perf_counter()
    theirs_line = predict_prob(lines)
    t2 = time.perf_counter()
    theirs_page_whole = predict_prob(texts)
    ours = max_per_text(ours_line, owner, len(test)) > threshold
    theirs = max_per_text(theirs_line, owner, len(test)) > threshold
    examples = []
    for i in np.flatnonzero(ours != theirs)[:n_examples]:
        mine = np.flatnonzero(owner == i)
        worst_ours, worst_theirs = mine[np.argmax(ours_line[mine])], mine[np.argmax(theirs_line[mine])]
        examples.append(
            {
                "id": test[i].id,
                "planted_offensive": bool(truth[i]),
                "ours": bool(ours[i]),
                "profanity_check": bool(theirs[i]),
                "our_worst_line": lines[worst_ours][:160],
                "our_score": round(float(ours_line[worst_ours]), 3),
                "their_worst_line": lines[worst_theirs][:160],
                "their_score": round(float(theirs_line[worst_theirs]), 3),
            }
        )
    by_label = {}
    for label in sorted({lab for d in test for lab in (d.metadata.get("planted") or ["clean"])}):
        rows = [i for i, d in enumerate(test) if label in (d.metadata.get("planted") or ["clean"])]
        by_label[label] = {"n": len(rows), "ours": float(ours[rows].mean()), "theirs": float(theirs[rows].mean())}
    return {
        "n_pages": len(test),
        "n_offensive": int(truth.sum()),
        "threshold": threshold,
        "ours": precision_recall(truth, ours).as_dict(),
        "profanity_check": precision_recall(truth, theirs).as_dict(),
        "profanity_check_whole_page": precision_recall(truth, theirs_page_whole > threshold).as_dict(),
        "agreement": float((ours == theirs).mean()),
        "flag_rate_by_label": by_label,
        "lines_per_s": {"ours": len(lines) / max(t1 - t0, 1e-9), "profanity_check": len(lines) / max(t2 - t1, 1e-9)},
        "disagreements": examples,
    }


class ToxicityFilter(Filter):
    """Drop a page whose worst line has P(toxic) above ``threshold`` (reason ``"toxicity:toxic_line"``).

    Give it a trained classifier (or a saved one's path); without one, ``fit``
    trains on the planted lines of the corpus it is run on (the chapter's
    shortcut; a real pipeline trains on a separate labelled set).
    """

    name = "toxicity"

    def __init__(self, model: HashedNgramClassifier | str | Path | None = None, threshold: float = 0.5, seed: int = 0):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a probability in [0, 1], got {threshold}")
        self.clf = HashedNgramClassifier.load(model) if isinstance(model, str | Path) else model
        self.threshold, self.seed = threshold, seed
        self.needs_fit = self.clf is None
        self.report: dict | None = None

    def fit(self, docs: Iterable[Document]) -> None:
        if self.clf is None:
            self.clf, self.report = train_toxicity_classifier(
                docs, seed=self.seed, threshold=self.threshold, max_test=2000
            )

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        if self.clf is None:
            raise ValueError("the toxicity filter has no classifier: pass one (or a path), or call fit(docs)")
        return toxicity_scores(self.clf, texts)

    def reason(self, text: str) -> str | None:
        return "toxic_line" if self.scores([text])[0] > self.threshold else None

    def run(self, docs: Iterable[Document]) -> Iterator[Decision]:
        if self.clf is None:
            docs = list(docs)
            self.fit(docs)
        yield from scored_decisions(docs, self.scores, self.threshold, "toxicity:toxic_line")
