"""Number formatting for tables and prose: decimal prefixes, three significant digits."""

from __future__ import annotations

import pytest

from llmbook import units


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (124_439_808, "124M"),
        (10_770_816, "10.8M"),
        (6.7e9, "6.70B"),
        (2e12, "2.00T"),
        (1_500, "1.50K"),
        (1_000, "1.00K"),
        (999, "999"),
        (42, "42.0"),
        (0.5, "0.500"),
        (0, "0"),
        (-5e6, "-5.00M"),
    ],
)
def test_count(n, text):
    assert units.count(n) == text


def test_count_digits():
    assert units.count(124_439_808, digits=5) == "124.44M"
    assert units.count(10_770_816, digits=2) == "11M"
    assert units.nbytes(1.35e10, digits=2) == "14 GB"


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (1.35e10, "13.5 GB"),
        (80e9, "80.0 GB"),
        (2**30, "1.07 GB"),  # decimal units: a GiB is 1.07 GB
        (552e9, "552 GB"),
        (1.2e12, "1.20 TB"),
        (2e15, "2.00 PB"),
        (86.2e6, "86.2 MB"),
        (4_096, "4.10 KB"),
        (512, "512 B"),
        (0, "0 B"),
    ],
)
def test_nbytes(n, text):
    assert units.nbytes(n) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [(1.1e21, "1.10e21"), (3.14e23, "3.14e23"), (6 * 124e6 * 2.5e9, "1.86e18"), (5e-3, "5.00e-3")],
)
def test_flops(n, text):
    assert units.flops(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.5, "0.500 s"),
        (30, "30.0 s"),
        (90, "1.50 min"),
        (7200, "2.00 h"),
        (3.1e5, "3.59 days"),
        (4e7, "1.27 years"),
        (365.25 * 86400 * 1e4, "10000 years"),
    ],
)
def test_duration(seconds, text):
    assert units.duration(seconds) == text


@pytest.mark.parametrize(
    ("formatted", "text"),
    [
        (lambda: units.count(999_999), "1.00M"),
        (lambda: units.nbytes(999.9e9), "1.00 TB"),
        (lambda: units.duration(59.99), "1.00 min"),
        (lambda: units.count(9.996), "10.0"),
    ],
)
def test_rounding_at_a_prefix_boundary(formatted, text):
    assert formatted() == text
