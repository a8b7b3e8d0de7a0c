"""The ZeRO paper's per-rank memory formulas, and the same bytes measured on 2 and 4 ranks for DDP, ZeRO-1/2, FSDP."""

from __future__ import annotations

import pytest

from llmbook.distributed.sharding_memory import (
    MEASURE_CONFIG,
    STRATEGIES,
    measure_strategies,
    memory_table,
    per_rank_memory,
)
from llmbook.model import GPT
from llmbook.planning import PRESETS, count_params


def test_zero_paper_figure_1():
    # Rajbhandari et al. 2020, Figure 1: Ψ = 7.5B, N_d = 64, K = 12 (mixed precision): 120, 31.4, 16.6, 1.9 GB
    quoted = {"ddp": 120.0, "zero1": 31.4, "zero2": 16.6, "fsdp": 1.9}
    for strategy, gb in quoted.items():
        assert round(per_rank_memory(7.5e9, 64, strategy, precision="mixed").states / 1e9, 1) == gb
    # the formulas themselves: 2Ψ + 2Ψ + KΨ/N, 2Ψ + (2 + K)Ψ/N, (2 + 2 + K)Ψ/N with K = 12
    psi, n = 1e9, 8
    assert per_rank_memory(psi, n, "zero1", "mixed").states == pytest.approx(4 * psi + 12 * psi / n)
    assert per_rank_memory(psi, n, "zero2", "mixed").states == pytest.approx(2 * psi + 14 * psi / n)
    assert per_rank_memory(psi, n, "fsdp", "mixed").states == pytest.approx(16 * psi / n)
    # fp32: 4 + 4 + 8 bytes; one rank is one process whatever the strategy
    fp32 = per_rank_memory(psi, 4, "zero2", "fp32")
    assert (fp32.weights, fp32.grads, fp32.optimizer, fp32.master) == (4 * psi, psi, 2 * psi, 0)
    assert {per_rank_memory(psi, 1, s).states for s in STRATEGIES} == {16 * psi}


def test_memory_table_uses_the_planners_llama_shapes():
    rows = memory_table(("7B", "70B"), world_size=8, precision="mixed")
    assert [(r["model"], r["strategy"]) for r in rows] == [(m, s) for m in ("llama2-7B", "llama2-70B")
                                                           for s in STRATEGIES]
    n7 = count_params(PRESETS["llama2-7B"]).total
    assert rows[0]["params"] == n7 and round(n7 / 1e9, 2) == 6.74  # Llama 2 7B's published 6.7B
    ddp, fsdp = rows[0]["total"], rows[3]["total"]
    assert ddp == pytest.approx(16 * n7) and fsdp == pytest.approx(ddp / 8)
    assert rows[4]["total"] > 1e12 > rows[7]["total"]  # 70B: over a terabyte per GPU with DDP, 138 GB with FSDP
    assert all(r["weights"] + r["grads"] + r["optimizer"] == pytest.approx(r["total"]) for r in rows)


def test_bad_input_is_one_clear_line():
    with pytest.raises(ValueError, match="strategy must be one of"):
        per_rank_memory(1e9, 8, "zero3")
    with pytest.raises(ValueError, match="unknown precision"):
        per_rank_memory(1e9, 8, "fsdp", precision="fp8")
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        per_rank_memory(1e9, 0, "fsdp")
    with pytest.raises(ValueError, match="unknown model"):
        memory_table(("8B",))
    with pytest.raises(ValueError, match="unknown strategies"):
        measure_strategies(2, ("zero3",))


@pytest.mark.parametrize("world_size", [2, 4])
def test_measured_bytes_match_the_formulas(world_size):
    n = GPT(MEASURE_CONFIG).num_params()
    measured = measure_strategies(world_size, ("single", *STRATEGIES))  # one spawn; "single" is unwrapped
    single = measured["single"][0]
    assert single["total"] == pytest.approx(per_rank_memory(n, 1, "ddp").states, rel=1e-3)  # + step counters
    for strategy in STRATEGIES:
        formula = per_rank_memory(n, world_size, strategy)
        for r in measured[strategy]:
            assert r["params"] == pytest.approx(formula.weights, rel=2e-3)  # + padding to a multiple of p
            assert r["grads"] == pytest.approx(formula.grads, rel=2e-3)
            assert r["optimizer"] == pytest.approx(formula.optimizer + formula.master, rel=2e-3)
            assert r["total"] == pytest.approx(formula.states, rel=2e-3)
    if world_size == 2:  # the target: FSDP on 2 ranks holds at most 0.55x what one process holds
        assert max(r["total"] for r in measured["fsdp"]) <= 0.55 * single["total"]
