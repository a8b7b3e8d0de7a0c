"""benchmarks/bench_pipeline.py --quick: ours, datasketch and the results file, on a tiny corpus (seconds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_writes_comparable_results(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "benchmarks" / "bench_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "pipeline.json"
    assert bench.main(["--quick", "--skip-datatrove", "--skip-end-to-end", "--workers", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["docs"] == 1_500 and result["machine"]["cores"] >= 1
    full = result["full"]
    ours, theirs = full["ours_1_worker"], full["datasketch"]
    assert ours["documents"] == theirs["documents"] == 1_500
    # the same banding: both find every close pair; below the S-curve's step each finds a random few (a tiny
    # corpus has about 60 planted pairs there, so their shares differ by sampling noise)
    assert ours["recall_jaccard_ge_0.9"] == theirs["recall_jaccard_ge_0.9"] == 1.0
    assert abs(ours["recall_all"] - theirs["recall_all"]) < 0.2
