"""Bootstrap confidence intervals: how much a metric would move on another sample of the same kind of items.

An evaluation set is a sample; its accuracy (or bits per byte) is an estimate. The percentile bootstrap
(Efron 1979) resamples the items with replacement many times, recomputes the metric on each resample, and
reads the interval off the quantiles of those values. It needs no formula for the metric's variance, so the
same code serves a mean (accuracy) and a ratio of sums (bits per byte = nats over bytes, where long texts
weigh more). With a fixed seed the interval is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmbook.posttrain.measure import bootstrap_interval


def _check(n: int, draws: int, level: float, what: str) -> None:
    if n == 0:
        raise ValueError(f"{what} needs at least one value")
    if draws < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need draws >= 1 and 0 < level < 1, got draws={draws}, level={level}")


def bootstrap_ci(values: Sequence[float], draws: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` and its percentile bootstrap interval at ``level``."""
    _check(len(values), draws, level, "bootstrap_ci")
    low, high = bootstrap_interval([float(v) for v in values], draws=draws, seed=seed, level=level)
    return sum(float(v) for v in values) / len(values), low, high


def bootstrap_ratio_ci(numerators: Sequence[float], denominators: Sequence[float], draws: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """``(ratio, low, high)`` of ``sum(numerators) / sum(denominators)``, resampling the (numerator, denominator)
    pairs together: the interval of a per-byte or per-token rate over a set of documents of unequal length."""
    if len(numerators) != len(denominators):
        raise ValueError(f"numerators and denominators must pair up, got {len(numerators)} and {len(denominators)}")
    _check(len(numerators), draws, level, "bootstrap_ratio_ci")
    num = torch.tensor([float(v) for v in numerators], dtype=torch.float64)
    den = torch.tensor([float(v) for v in denominators], dtype=torch.float64)
    if float(den.sum()) <= 0 or bool((den < 0).any()):
        raise ValueError("bootstrap_ratio_ci needs non-negative denominators with a positive sum")
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(num), (draws, len(num)), generator=g)  # (draws, n): one resample per row
    sums = den[picks].sum(dim=1)
    ratios = num[picks].sum(dim=1) / sums.clamp_min(1e-300)  # a resample of only empty texts: ratio 0
    tail = (1 - level) / 2
    return (float(num.sum() / den.sum()), float(torch.quantile(ratios, tail)),
            float(torch.quantile(ratios, 1 - tail)))
