"""Memory per rank by strategy (DDP, ZeRO-1, ZeRO-2, FSDP) on 1, 2 and 4 ranks: measured against the ZeRO formulas.

    .venv/bin/python benchmarks/bench_distributed_memory.py             # from the repository root
    .venv/bin/python benchmarks/bench_distributed_memory.py --no-peak   # skip the (slower) profiler peaks
    .venv/bin/python benchmarks/bench_distributed_memory.py --preset laptop-gpt --ranks 2

For every world size, ranks are spawned on this machine (gloo, CPU tensors),
each builds the same small GPT (``sharding_memory.MEASURE_CONFIG`` unless
``--preset``), takes two AdamW steps with the book's from-scratch
``DataParallel``, ``ZeroOptimizer`` (stage 1, 2) or ``FullyShardedModel``, and
counts the bytes of weights, gradients and optimizer states it holds after the
step (gradients still present). Each is printed next to the ZeRO paper's
formula (``sharding_memory.per_rank_memory``, fp32: 4 + 4 + 8 bytes per
parameter) and as a ratio to one process training the same model unwrapped.
With the peaks on, the CPU profiler also records the most bytes alive during
the second step (weights and states resident before it, plus everything the
step allocates: activations, full gradients, gathered buffers).

Target: FSDP on 2 ranks holds at most 0.55x of one process (issue 12); the
script exits with status 1 when it is missed. Results, with the machine, the
date and the library versions, go to benchmarks/results/distributed_memory.json,
with the formulas' table for Llama 2 7B and 70B on 8 GPUs (mixed precision).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from llmbook.distributed.sharding_memory import (
    MEASURE_CONFIG,
    STRATEGIES,
    measure_strategies,
    memory_table,
    per_rank_memory,
)
from llmbook.model import GPT, ModelConfig
from llmbook.notebook import machine_summary

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "distributed_memory.json"
TARGET_FSDP_2_RANKS = 0.55  # at most this fraction of one process's weights + gradients + optimizer states


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="world sizes to measure")
    parser.add_argument("--preset", help="a ModelConfig preset instead of the small default model")
    parser.add_argument("--no-peak", action="store_true", help="skip the profiler's peak during a step")
    args = parser.parse_args()
    cfg = MEASURE_CONFIG if args.preset is None else ModelConfig.preset(args.preset, dropout=0.0)
    n = GPT(cfg).num_params()
    peak = not args.no_peak

    single = measure_strategies(1, ("single",), cfg, peak=peak)["single"][0]
    print(f"model: {n:,} parameters; one process holds {single['total'] / 1e6:.3f} MB "
          f"(weights + gradients + AdamW states, fp32)" + (f", {single['peak_step'] / 1e6:.3f} MB at the peak "
                                                          "of a step" if peak else ""))
    header = f"{'ranks':>5} {'strategy':>8} {'params':>9} {'grads':>9} {'optim':>9} {'total MB':>9} " \
             f"{'formula':>9} {'meas/form':>9} {'vs single':>9}" + (f" {'peak MB':>8} {'vs single':>9}" if peak else "")
    print(header)
    runs = []
    for world_size in args.ranks:
        measured = measure_strategies(world_size, STRATEGIES, cfg, peak=peak)
        for strategy in STRATEGIES:
            ranks = measured[strategy]
            worst = max(ranks, key=lambda r: r["total"])  # the rank that needs the most sets the device size
            formula = per_rank_memory(n, world_size, strategy).states
            row = {"world_size": world_size, "strategy": strategy,
                   **{k: worst[k] for k in ("params", "grads", "optimizer", "total")},
                   "formula": formula, "measured_over_formula": round(worst["total"] / formula, 5),
                   "ratio_vs_single": round(worst["total"] / single["total"], 4)}
            if peak:
                row["peak_step"] = max(r["peak_step"] for r in ranks)
                row["peak_ratio_vs_single"] = round(row["peak_step"] / single["peak_step"], 4)
            runs.append(row)
            line = (f"{world_size:>5} {strategy:>8} {row['params'] / 1e6:>9.3f} {row['grads'] / 1e6:>9.3f} "
                    f"{row['optimizer'] / 1e6:>9.3f} {row['total'] / 1e6:>9.3f} {formula / 1e6:>9.3f} "
                    f"{row['measured_over_formula']:>9.4f} {row['ratio_vs_single']:>9.3f}")
            if peak:
                line += f" {row['peak_step'] / 1e6:>8.3f} {row['peak_ratio_vs_single']:>9.3f}"
            print(line)

    fsdp2 = [r for r in runs if r["strategy"] == "fsdp" and r["world_size"] == 2]
    met = bool(fsdp2) and fsdp2[0]["ratio_vs_single"] <= TARGET_FSDP_2_RANKS
    table = memory_table(("7B", "70B"), world_size=8, precision="mixed")
    print("formulas, 8 GPUs, mixed precision (2 + 2 + 12 bytes per parameter), GB per GPU:")
    for r in table:
        print(f"  {r['model']:>10} {r['strategy']:>6} {r['total'] / 1e9:8.1f}")
    if fsdp2:
        verdict = "met" if met else "MISSED"
        print(f"target: FSDP on 2 ranks <= {TARGET_FSDP_2_RANKS}x one process: {fsdp2[0]['ratio_vs_single']:.3f}x, "
              f"{verdict} -> {RESULTS}")

    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**machine_summary(), "platform": platform.platform()},
        "model": {"params": n, "config": {k: getattr(cfg, k) for k in ("vocab_size", "context_length", "d_model",
                                                                      "n_layers", "n_heads", "mlp", "norm")}},
        "precision": "fp32", "batch_per_rank": 2, "single": single, "runs": runs,
        "formula_table_8_gpus_mixed": table,
        "target": {"fsdp_2_ranks_vs_single_at_most": TARGET_FSDP_2_RANKS, "met": met},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if met or not fsdp2 else 1


if __name__ == "__main__":
    sys.exit(main())
