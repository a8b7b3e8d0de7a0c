"""ground_truth.score: removal and repair counted per planted label, clean removals are mistakes, precision."""

from __future__ import annotations

from llmbook.pipeline import ground_truth
from llmbook.pipeline.document import Document


def _doc(i: int, planted: list[str], **meta) -> Document:
    return Document(f"d{i}", f"text {i}", {"planted": planted, **meta})


def test_score_counts_removals_repairs_and_mistakes():
    docs = [
        _doc(0, []),                                           # clean, kept
        _doc(1, []),                                           # clean, removed: a mistake
        _doc(2, ["spam"]),                                     # removed: caught
        _doc(3, ["spam"]),                                     # kept: missed
        _doc(4, ["pii"], pii=["a@b.com", "10.0.0.1"]),         # kept, one string masked
        _doc(5, ["near_dup"], jaccard=0.5, dup_of="d0"),       # below the threshold: should stay
        _doc(6, ["near_dup"], jaccard=0.9, dup_of="d0"),       # above: should go
    ]
    removed = {"d1": "gopher_quality:gopher_short_doc", "d2": "gopher_repetition:top_2_gram", "d6": "near_dedup:dup"}
    final = {"d0": "text 0", "d3": "text 3", "d4": "mail <EMAIL> from 10.0.0.1", "d5": "text 5"}
    scores = ground_truth.score(docs, removed, final, near_dup_threshold=0.75)
    assert (scores["clean"].pages, scores["clean"].removed) == (2, 1)
    assert scores["clean"].by_stage == {"gopher_quality": 1}
    assert (scores["spam"].pages, scores["spam"].removed, scores["spam"].removed_share) == (2, 1, 0.5)
    assert (scores["pii"].strings, scores["pii"].strings_left, scores["pii"].repaired_share) == (2, 1, 0.5)
    assert scores["near_dup"].removed == 1
    assert scores["should_stay"].pages == 4 and scores["should_stay"].removed == 1  # d0, d1, d4, d5
    # 3 removed pages, 2 of which should have gone (spam, the 0.9 copy)
    assert ground_truth.precision(docs, removed, near_dup_threshold=0.75) == 2 / 3
    assert ground_truth.precision(docs, {}, 0.75) == 1.0


def test_should_remove_follows_the_threshold():
    copy = _doc(0, ["near_dup"], jaccard=0.7)
    assert ground_truth.should_remove(copy, 0.6) and not ground_truth.should_remove(copy, 0.75)
    assert not ground_truth.should_remove(_doc(1, ["boilerplate", "html"]))
    assert ground_truth.should_remove(_doc(2, ["foreign", "pii"]))
