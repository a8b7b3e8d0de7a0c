"""Every coding exercise's check passes on the solution and fails on the starter.

The check cells of the executed solution and starter notebooks say so: the
friendly check prints "all checks passed" or "not attempted yet" and lets any
other failure raise, which fails the notebook. The notebooks come from
build/cache, executed once for these tests, the notebook tests and the PDFs
(``build_pdf.executed_in_build``). A check that passes on the starter could
never catch a wrong answer, so it fails this test.
"""

from __future__ import annotations

import importlib

import pytest

import build_pdf
from llmbook import exercises

BOOK = build_pdf.load_book()


def printed(nb) -> str:
    """Everything the notebook's cells printed."""
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def registered(chapter) -> list[exercises.Exercise]:
    module = importlib.import_module(f"llmbook.exercises.ch{chapter.number:02d}")
    prefix = f"{chapter.number}."
    found = [e for e in exercises.REGISTRY.values() if e.number.startswith(prefix)]
    assert module and len(found) >= 2, f"{chapter.stem} needs at least two checked exercises"
    return found


CASES = [(ch, ex) for ch in BOOK.chapters for ex in registered(ch)]
IDS = [f"{ch.stem}-{ex.number}" for ch, ex in CASES]


@pytest.fixture(scope="module")
def output():
    cache = {}

    def get(chapter, kind):
        if (chapter.stem, kind) not in cache:  # a failure is kept too: one notebook is executed once
            try:
                cache[chapter.stem, kind] = printed(build_pdf.executed_in_build(chapter.source(kind), kind)[0])
            except build_pdf.BuildError as exc:
                cache[chapter.stem, kind] = exc
        if isinstance(cache[chapter.stem, kind], Exception):
            pytest.fail(str(cache[chapter.stem, kind]), pytrace=False)
        return cache[chapter.stem, kind]

    return get


@pytest.mark.parametrize(("chapter", "ex"), CASES, ids=IDS)
def test_check_passes_on_solution(chapter, ex, output):
    assert f"Exercise {ex.number}: all checks passed" in output(chapter, "solutions"), (
        f"solutions/{chapter.stem}.md never runs the check of exercise {ex.number} on {ex.solution}")


@pytest.mark.parametrize(("chapter", "ex"), CASES, ids=IDS)
def test_check_fails_on_starter(chapter, ex, output):
    assert f"Exercise {ex.number}: not attempted yet" in output(chapter, "exercises"), (
        f"exercises/{chapter.stem}.md: the check of exercise {ex.number} does not report the stub as not attempted")


@pytest.mark.parametrize(("chapter", "ex"), CASES, ids=IDS)
def test_check_rejects_a_wrong_answer(chapter, ex):
    """A function that returns a constant must not pass any check."""
    with pytest.raises((AssertionError, TypeError, ValueError)):
        ex.check(lambda *args, **kwargs: 0)


def test_friendly_check_reports_not_attempted(capsys):
    first = CASES[0][1]
    friendly = getattr(importlib.import_module(f"llmbook.exercises.ch{CASES[0][0].number:02d}"),
                       first.check.__name__)

    def starter(*args, **kwargs):
        raise NotImplementedError

    friendly(starter)
    assert "not attempted yet" in capsys.readouterr().out
