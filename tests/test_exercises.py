"""Every coding exercise's check passes on the solution and fails on the starter.

The notebooks' code cells are executed in-process (as a reader would run them
top to bottom), then each registered check is run strictly against the
function the notebook defines. A check that passes on the starter could never
catch a wrong answer, so it fails this test.
"""

from __future__ import annotations

import contextlib
import importlib
import io

import jupytext
import matplotlib
import pytest

import build_pdf
from llmbook import exercises

matplotlib.use("Agg")
BOOK = build_pdf.load_book()


def notebook_namespace(path) -> dict:
    """Run a notebook's code cells in one namespace; cell magics are skipped."""
    namespace: dict = {"__name__": "__notebook__"}
    for cell in jupytext.read(path).cells:
        if cell.cell_type == "code":
            code = "\n".join(ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!")))
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(code, f"{path.name}", "exec"), namespace)
    return namespace


def registered(chapter) -> list[exercises.Exercise]:
    module = importlib.import_module(f"llmbook.exercises.ch{chapter.number:02d}")
    prefix = f"{chapter.number}."
    found = [e for e in exercises.REGISTRY.values() if e.number.startswith(prefix)]
    assert module and len(found) >= 2, f"{chapter.stem} needs at least two checked exercises"
    return found


CASES = [(ch, ex) for ch in BOOK.chapters for ex in registered(ch)]
IDS = [f"{ch.stem}-{ex.number}" for ch, ex in CASES]


@pytest.fixture(scope="module")
def namespaces():
    cache = {}

    def get(chapter, kind):
        if (chapter.stem, kind) not in cache:
            cache[chapter.stem, kind] = notebook_namespace(chapter.source(kind))
        return cache[chapter.stem, kind]

    return get


@pytest.mark.parametrize(("chapter", "ex"), CASES, ids=IDS)
def test_check_passes_on_solution(chapter, ex, namespaces):
    ns = namespaces(chapter, "solutions")
    assert ex.solution in ns, f"solutions/{chapter.stem}.md defines no {ex.solution}"
    ex.check(ns[ex.solution])


@pytest.mark.parametrize(("chapter", "ex"), CASES, ids=IDS)
def test_check_fails_on_starter(chapter, ex, namespaces):
    ns = namespaces(chapter, "exercises")
    assert ex.solution in ns, f"exercises/{chapter.stem}.md defines no {ex.solution}"
    with pytest.raises((NotImplementedError, AssertionError)):
        ex.check(ns[ex.solution])


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
