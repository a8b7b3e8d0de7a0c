"""Self-checking exercises: one module of checks per chapter (``ch01``, ``ch03``, ...).

A check is an ordinary function that takes the reader's solution and raises
``AssertionError`` with a helpful message when it is wrong. Decorating it with
``@exercise("1.2", solution="training_days")`` does two things:

* in a notebook, calling the check prints a verdict instead of a traceback when
  the reader has not started yet (the starter raises ``NotImplementedError``),
  so starter notebooks still execute from top to bottom under nbval;
* it registers the check, with the name of the function the reader writes, so
  the test suite can prove every check fails on the starter and passes on the
  solution (``tests/test_exercises.py``). A check that cannot fail is caught.

Use ``check.strict(fn)`` to run a check and let every failure raise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Exercise:
    """A registered coding exercise: its number, the reader's function name, its check."""

    number: str
    solution: str
    check: Callable[..., None]


REGISTRY: dict[str, Exercise] = {}


def exercise(number: str, solution: str):
    """Register ``check`` for exercise ``number``, whose answer is the notebook name ``solution``."""

    def decorate(check: Callable[..., None]):
        @functools.wraps(check)
        def friendly(*args, **kwargs) -> None:
            try:
                check(*args, **kwargs)
            except NotImplementedError:
                print(f"Exercise {number}: not attempted yet. Replace the "
                      "`raise NotImplementedError` with your code and run this cell again.")
                return
            print(f"Exercise {number}: all checks passed ✓")

        friendly.strict = check
        friendly.number = number
        if number in REGISTRY:
            raise ValueError(f"exercise {number} is registered twice")
        REGISTRY[number] = Exercise(number, solution, check)
        return friendly

    return decorate


def expect_close(actual: float, expected: float, what: str, rel: float = 1e-6) -> None:
    """Assert two numbers agree to a relative tolerance, naming the quantity when they don't."""
    if actual is None:
        raise AssertionError(f"{what}: your function returned None; did you forget `return`?")
    if abs(actual - expected) > rel * max(abs(expected), 1e-12):
        raise AssertionError(f"{what}: got {actual!r}, expected {expected!r}")
