"""What every exercise-check test needs: a starter, a check's one-line verdict, and the three-way proof.

An exercise check (``llmbook.exercises``) must pass the solution, report the
starter as "not attempted yet", and name each typical mistake in one line.
The per-chapter tests (``test_exercises_chNN.py``) write the solution out
again with a mistake switched on by name and use these three helpers.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def starter(*args, **kwargs):
    """A reader's function before they wrote it: what the starter notebook's stub does."""
    raise NotImplementedError("your solution goes here")


def one_line_error(check, *solutions) -> str:
    """The message ``check.strict`` fails with on ``solutions``; the test fails unless it fails, in one line."""
    with pytest.raises(AssertionError) as info:
        check.strict(*solutions)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def passes_and_starter_not_attempted(capsys, check, number: str, solutions: tuple, starters: tuple) -> None:
    """The friendly check says "all checks passed" on the solution and "not attempted yet" on the starter."""
    check(*solutions)
    check(*starters)
    out = capsys.readouterr().out
    assert f"Exercise {number}: all checks passed" in out and f"Exercise {number}: not attempted yet" in out
    with pytest.raises(NotImplementedError):
        check.strict(*starters)


ROOT = Path(__file__).resolve().parent.parent


def fresh_starter(stem: str) -> str:
    """``exercises/<stem>.md``, asserted to be what ``make starters`` makes of ``solutions/<stem>.md``."""
    import build_pdf

    solution = ROOT / "solutions" / f"{stem}.md"
    starter = (ROOT / "exercises" / f"{stem}.md").read_text()
    assert starter == build_pdf.make_starter(solution.read_text(), solution.name), "run build_pdf.py --starters"
    assert "BEGIN SOLUTION" not in starter
    return starter


def solution_lines(stem: str, heading: str) -> list[str]:
    """The reader's own code in one exercise of ``solutions/<stem>.md``: lines between the solution markers.

    From the exercise's heading (``"## Exercise 4.10"``) to the next ``## ``
    heading; blank lines and comments do not count. An "assemble it yourself"
    exercise asks for at least 30 (book/AUTHORING.md).
    """
    text = (ROOT / "solutions" / f"{stem}.md").read_text()
    section = text[text.index(heading) + len(heading):]
    section = section[: section.find("\n## ")] if "\n## " in section else section
    lines, inside = [], False
    for line in section.splitlines():
        stripped = line.strip()
        if stripped == "# BEGIN SOLUTION":
            inside = True
        elif stripped == "# END SOLUTION":
            inside = False
        elif inside and stripped and not stripped.startswith("#"):
            lines.append(line)
    return lines
