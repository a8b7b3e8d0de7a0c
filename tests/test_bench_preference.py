"""benchmarks/bench_preference.py's helpers that need no trained model: the TRL check, records, merging."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_preference", ROOT / "benchmarks" / "bench_preference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_logps_are_seeded_and_negative(bench):
    a, b = bench.random_logps(8, seed=3), bench.random_logps(8, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(x.shape == (8,) and x.dtype == torch.float64 for x in a)
    assert (a[2] < 0).all() and (a[3] < 0).all()  # the reference's summed log-probabilities


def test_trl_comparison_agrees_and_spans_the_sigmoid(bench):
    pytest.importorskip("trl")
    out = bench.trl_comparison(n=6, betas=(0.1, 0.5))
    assert set(out) == {"0.1", "0.5"}
    for v in out.values():
        assert v["max_abs_loss_error"] < 1e-6 and v["max_abs_reward_error"] < 1e-6
        low, high = v["loss_range"]
        assert low < 0.69 < high  # not every pair at log 2: the losses are on both sides of a tie


def test_rate_dict_has_a_wilson_interval(bench):
    r = bench.rate_dict(0, 111)
    assert r["rate"] == 0 and r["low"] == 0 and 0.02 < r["high"] < 0.05
    r = bench.rate_dict(39, 111)
    assert r["low"] < r["rate"] < r["high"]


def test_merge_keeps_other_comparisons(bench):
    old = {"date": "old", "beta_sweep": {"runs": [1]}, "task": {"models": {}}}
    new = {"date": "new", "preference": {"accuracy": {}}, "total_seconds": 3.0}
    merged = bench.merge_results(old, new, "preference")
    assert merged["beta_sweep"] == {"runs": [1]} and merged["task"] == {"models": {}}
    assert merged["preference"] == {"accuracy": {}} and merged["date"] == "new"


def test_date_and_machine_are_readable_strings(bench):
    assert bench.now().endswith(" UTC") and len(bench.now()) == len("2026-12-01 03:40 UTC")
    line = bench.machine_line()
    assert isinstance(line, str) and "cores" in line and "torch" in line
