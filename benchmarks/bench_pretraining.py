"""Pretraining benchmark: the reference recipe against its target, and our AdamW against PyTorch's.

    .venv/bin/python benchmarks/bench_pretraining.py              # from the repository root
    .venv/bin/python benchmarks/bench_pretraining.py --baseline   # also train nanoGPT's recipe (minutes more)

Measures on this machine, with nothing else running:

* the book's reference recipe (``TRAIN_PRESETS["shakespeare"]``), trained from
  scratch in a temporary folder: training seconds (evaluations excluded),
  tokens per second, and the held-out bits per byte of Tiny Shakespeare.
  Target: at most 2.2 bits per byte within 5 minutes of training;
* with ``--baseline``, nanoGPT's character-level CPU recipe
  (``shakespeare-nanogpt``: 4 × 128, context 64, batch 12, 7,000 steps) for
  the same measurements;
* the time of one optimizer step of our from-scratch ``AdamW`` (a loop over the
  parameters) against ``torch.optim.AdamW`` (foreach) on the reference model's
  parameters: the ratio says what clarity costs.

The script exits with status 1 when the target is missed. Results, with the
hardware, the date and the library versions, go to
benchmarks/results/pretraining.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "pretraining.json"
TARGET_BPB = 2.2
TARGET_SECONDS = 300.0

# Offline by default: use the repository's shared data folder when none is set.
_SHARED = ROOT.parent / "shared" / "data"
if "LLMBOOK_DATA_DIR" not in os.environ and _SHARED.is_dir():
    os.environ["LLMBOOK_DATA_DIR"] = str(_SHARED)

import torch  # noqa: E402

from llmbook.model import GPT  # noqa: E402
from llmbook.notebook import machine_summary  # noqa: E402
from llmbook.optim import AdamW, param_groups  # noqa: E402
from llmbook.train import TRAIN_PRESETS, Trainer  # noqa: E402


def train_preset(name: str) -> dict:
    """Train a preset from scratch in a temporary folder; the run's summary."""
    with tempfile.TemporaryDirectory() as tmp:
        return Trainer(TRAIN_PRESETS[name], Path(tmp) / name).train()


def optimizer_step_ms(optimizer_cls, model: GPT, repeats: int = 50, **kw) -> float:
    """Median milliseconds of one ``optimizer.step()`` over the model's parameters, random gradients."""
    optimizer = optimizer_cls(param_groups(model, 0.1), lr=1e-3, **kw)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    times = []
    for _ in range(repeats + 5):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    times = sorted(times[5:])
    return 1000 * times[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", action="store_true", help="also train nanoGPT's character-level recipe")
    args = parser.parse_args()

    runs = {"shakespeare": train_preset("shakespeare")}
    if args.baseline:
        runs["shakespeare-nanogpt"] = train_preset("shakespeare-nanogpt")

    cfg = TRAIN_PRESETS["shakespeare"]
    model = GPT(cfg.model_config(1024))
    ours = optimizer_step_ms(AdamW, model)
    theirs = optimizer_step_ms(torch.optim.AdamW, model, foreach=True)

    ref = runs["shakespeare"]
    met = ref["val_bpb"] <= TARGET_BPB and ref["train_seconds"] <= TARGET_SECONDS
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**machine_summary(), "platform": platform.platform()},
        "runs": {
            name: {key: summary[key] for key in ("steps", "train_seconds", "tokens_per_s", "tokens_seen", "val_loss",
                                                  "val_bpb", "params")}
            for name, summary in runs.items()
        },
        "target": {"val_bpb_at_most": TARGET_BPB, "train_seconds_at_most": TARGET_SECONDS, "met": met},
        "adamw_step_ms": {"llmbook": round(ours, 3), "torch_foreach": round(theirs, 3),
                          "ratio": round(ours / theirs, 2)},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    for name, summary in result["runs"].items():
        print(f"{name}: {summary['steps']} steps in {summary['train_seconds']:.0f} s of training, "
              f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['val_bpb']:.3f} bits per byte")
    print(f"AdamW step: ours {ours:.2f} ms, torch (foreach) {theirs:.2f} ms, ratio {ours / theirs:.2f}x")
    verdict = "met" if met else "MISSED"
    print(f"target (<= {TARGET_BPB} bits per byte within {TARGET_SECONDS:.0f} s): {verdict} -> {RESULTS}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
