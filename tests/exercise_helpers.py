"""What every exercise-check test needs: a starter, a check's one-line verdict, and the three-way proof.

An exercise check (``llmbook.exercises``) must pass the solution, report the
starter as "not attempted yet", and name each typical mistake in one line.
The per-chapter tests (``test_exercises_chNN.py``) write the solution out
again with a mistake switched on by name and use these three helpers.
"""

from __future__ import annotations

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
