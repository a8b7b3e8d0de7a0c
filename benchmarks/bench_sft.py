"""Chapter 9's SFT ablations: response-only loss vs every token, packed vs padded batches, LoRA vs full fine-tuning.

    .venv/bin/python benchmarks/bench_sft.py                    # from the repository root: all three comparisons
    .venv/bin/python benchmarks/bench_sft.py --only lora        # one comparison: masking, packing or lora
    .venv/bin/python benchmarks/bench_sft.py --threads 1        # on a machine shared with other work (see below)
    .venv/bin/python benchmarks/bench_sft.py --steps 20 --out /tmp/sft.json   # a smoke run (not a result)

Every variant is fine-tuned with ``SFTTrainer`` from the same base model
(``llmbook.pretrained.ensure("english")``: trained once, then read from the
cache under ``$LLMBOOK_CACHE_DIR``), with the same seed and data order, into a
temporary folder (never the cache). The reference run is the book's
``SFT_PRESETS["sft-full"]`` recipe (loss on response tokens only, packed rows,
every weight trained); each variant changes one thing of it:

* **masking**: ``train_on_prompt=True`` (every token carries loss), the same
  steps. Measured for both, and for the base model untouched: the validation
  loss on response tokens, the verifiable task's success rate with its 95%
  Wilson interval on the 400 held-out prompts (``make_task_split(0).test``),
  overall and per family, and format adherence (stopped at the end token,
  no template markup) on the instruction test split;
* **packing**: ``packing=False`` (one example per row, padded to the batch's
  longest). A padded row holds one example and a packed row several, so the
  padded run's ``max_steps`` is set to see as many examples as the packed run
  saw: the packed run's examples seen (counted from its rows, step by step)
  divided by the batch size, rounded. Measured: real tokens (padding not
  counted) per second of training, training seconds, the slots the model
  computed (real tokens + padding) and the response validation loss;
* **lora**: ``SFT_PRESETS["sft-lora"]`` (rank 8 on attention and MLP, the
  base frozen) against ``sft-full``: trainable parameters, the bytes of
  AdamW's state tensors after training (``trainer.optimizer.state``, next to
  the 8 bytes per trainable parameter that two fp32 moments take), seconds
  per optimizer step, response validation loss and task success.

Timings are measured, never asserted: the machine may be shared, so the load
average is recorded before and after every run and at the start and end.
When another process holds a core, run with ``--threads 1``: measured on 2
cores beside one busy training process, a packed ``sft-full`` step (forward,
backward, AdamW) took about 6 s with two torch threads and 1 s with one (the
AdamW step alone 1.2 s against 0.01 s), as the two threads wait on each other.
Training seconds exclude evaluation (``Trainer.train_seconds``); the runs
evaluate once, at the end (``eval_interval=0``, no samples), which does not
change what they train. Results, with the machine, the date and the library
versions, go to benchmarks/results/sft.json (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "sft.json"
COMPARISONS = ("masking", "packing", "lora")
FORMAT_TOKENS = 64  # new tokens a format-adherence reply may take (measure.generate_responses' default)

# Offline by default: use the repository's shared data folder when none is set.
_SHARED = ROOT.parent / "shared" / "data"
if "LLMBOOK_DATA_DIR" not in os.environ and _SHARED.is_dir():
    os.environ["LLMBOOK_DATA_DIR"] = str(_SHARED)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llmbook import pretrained  # noqa: E402
from llmbook.notebook import machine_summary  # noqa: E402
from llmbook.posttrain.instructions import instruction_split, prompt_messages  # noqa: E402
from llmbook.posttrain.masking import encode_prompt  # noqa: E402
from llmbook.posttrain.measure import format_report, generate_responses, score_task  # noqa: E402
from llmbook.posttrain.sft import SFT_PRESETS, SFTConfig, SFTTrainer, response_loss  # noqa: E402
from llmbook.posttrain.tasks import TaskScore, make_task_split  # noqa: E402
from llmbook.posttrain.templates import get_template  # noqa: E402
from llmbook.train import load_model, read_jsonl  # noqa: E402


def say(text: str) -> None:
    print(text, flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------- one fine-tuning run


def variant(preset: str, steps: int | None, **changes) -> SFTConfig:
    """A preset with ``changes``, evaluated only at the end; ``steps`` (if given) replaces its ``max_steps``.

    Warmup is capped at ``max_steps`` so that a short smoke run stays a valid schedule.
    """
    cfg = SFT_PRESETS[preset]
    max_steps = changes.pop("max_steps", steps or cfg.max_steps)
    warmup = cfg.warmup_steps if cfg.warmup_steps is None else min(cfg.warmup_steps, max_steps)
    return dataclasses.replace(cfg, max_steps=max_steps, warmup_steps=warmup, eval_interval=0, sample_tokens=0,
                               **changes)


def rows_seen(trainer: SFTTrainer, steps: int) -> list[list[int]]:
    """The rows (each a list of example indices) that ``steps`` optimizer steps of ``trainer`` draw, in order."""
    rows = trainer.data.train_rows.rows
    return [rows[r] for s in range(steps) for m in range(trainer.cfg.accumulation_steps)
            for r in trainer._rows_of(s, m)]


def slots_computed(trainer: SFTTrainer, steps: int) -> int:
    """Token positions the model computed in ``steps``: real tokens plus padding (what the FLOPs pay for)."""
    cfg, examples = trainer.cfg, trainer.data.train_rows.examples
    seen = rows_seen(trainer, steps)
    if cfg.packing:  # every packed row is context_length wide
        return len(seen) * cfg.context_length
    total = 0
    for start in range(0, len(seen), cfg.batch_size):  # a padded micro-batch is as wide as its longest example
        batch = seen[start:start + cfg.batch_size]
        total += len(batch) * max(len(examples[row[0]]) for row in batch)
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict:
    """Bytes of every tensor in the optimizer's state, by kind (exp_avg, exp_avg_sq, step), after training."""
    by_kind: dict[str, int] = {}
    tensors = 0
    for state in optimizer.state.values():
        for kind, value in state.items():
            if torch.is_tensor(value):
                by_kind[kind] = by_kind.get(kind, 0) + value.numel() * value.element_size()
                tensors += 1
    return {"total": sum(by_kind.values()), "by_kind": by_kind, "tensors": tensors,
            "parameters_with_state": len(optimizer.state)}


def train_variant(label: str, cfg: SFTConfig, folder: Path) -> tuple[dict, SFTTrainer]:
    """Fine-tune ``cfg`` into ``folder``; what the comparisons need of the run, and the trainer."""
    say(f"[{label}] {cfg.max_steps} steps, batch {cfg.batch_size}, lr {cfg.lr:g}, packing={cfg.packing}, "
        f"train_on_prompt={cfg.train_on_prompt}, lora_r={cfg.lora_r} ...")
    load_before = load_average()
    wall, cpu = time.perf_counter(), time.process_time()
    trainer = SFTTrainer(cfg, folder, progress=False)
    setup_seconds = time.perf_counter() - wall
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's "trained ... -> <temporary folder>" line
        summary = trainer.train()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    seen = rows_seen(trainer, summary["steps"])
    losses = [r["loss"] for r in read_jsonl(folder / "metrics.jsonl") if "loss" in r]
    run = {
        "label": label, "folder_name": folder.name,
        "config": {k: getattr(cfg, k) for k in ("name", "max_steps", "batch_size", "accumulation_steps", "lr",
                                                "warmup_steps", "context_length", "data", "template",
                                                "train_on_prompt", "packing", "lora_r", "lora_alpha",
                                                "lora_dropout", "lora_targets", "seed")},
        "steps": summary["steps"], "rows": summary["rows"], "examples": summary["examples"],
        "dropped_examples": summary["dropped_examples"],
        "rows_seen": len(seen), "examples_seen": sum(len(row) for row in seen),
        "tokens_seen": summary["tokens_seen"], "slots_computed": slots_computed(trainer, summary["steps"]),
        "train_seconds": round(summary["train_seconds"], 3),
        "seconds_per_step": round(summary["train_seconds"] / summary["steps"], 5),
        "tokens_per_s": round(summary["tokens_per_s"], 1),
        "setup_seconds": round(setup_seconds, 3), "wall_seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
        "val_loss": round(summary["val_loss"], 5), "val_bpb": round(summary["val_bpb"], 5),
        "final_train_loss": round(losses[-1], 5) if losses else None,
        "trainable_params": summary["trainable_params"], "params": summary["params"],
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "load_average_before": load_before, "load_average_after": load_average(),
    }
    run["real_token_fraction"] = round(run["tokens_seen"] / run["slots_computed"], 4)
    say(f"[{label}] {run['steps']} steps in {run['train_seconds']:.1f} s of training "
        f"({run['seconds_per_step'] * 1000:.0f} ms/step, {run['tokens_per_s']:,.0f} real tokens/s), "
        f"{run['examples_seen']:,} examples seen, response val loss {run['val_loss']:.4f}")
    return run, trainer


# ---------------------------------------------------------------------- measuring a model


def score_dict(score: TaskScore) -> dict:
    out = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in
           (("n", score.n), ("successes", score.successes), ("rate", score.rate), ("low", score.low),
            ("high", score.high), ("mean_score", score.mean_score))}
    if score.per_family:
        out["per_family"] = {name: score_dict(s) for name, s in score.per_family.items()}
    return out


def format_prompts(tokenizer, context_length: int) -> tuple[list, int]:
    """The instruction test split's prompts that leave room for ``FORMAT_TOKENS`` new tokens; how many did not."""
    template = get_template("chatml")
    keep, dropped = [], 0
    for record in instruction_split()[2]:
        messages = prompt_messages(record)
        ids = encode_prompt(tokenizer, messages, template, special_in_content="ordinary")
        if len(ids) + FORMAT_TOKENS <= context_length:
            keep.append(messages)
        else:
            dropped += 1
    return keep, dropped


def measure_model(label: str, folder: Path, task: bool = True, fmt: bool = False) -> dict:
    """Greedy replies of the model in ``folder``: task success on the 400 test prompts, and format adherence."""
    model, tokenizer = load_model(folder)
    model.eval()
    out: dict = {}
    if task:
        say(f"[{label}] scoring the verifiable task ...")
        start = time.perf_counter()
        score, _ = score_task(model, tokenizer, make_task_split(0).test, "chatml")
        out["task"] = score_dict(score)
        out["task_seconds"] = round(time.perf_counter() - start, 2)
        say(f"[{label}] task success {score}")
    if fmt:
        prompts, dropped = format_prompts(tokenizer, model.cfg.context_length)
        say(f"[{label}] format adherence on {len(prompts)} instruction test prompts ...")
        report = format_report(generate_responses(model, tokenizer, prompts, "chatml", max_new_tokens=FORMAT_TOKENS))
        out["format"] = {"n": report.n, "prompts_too_long": dropped, "max_new_tokens": FORMAT_TOKENS,
                         **{what: {"count": getattr(report, what), "rate": round(report.rate(what), 5),
                                   "low": round(report.interval(what)[0], 5),
                                   "high": round(report.interval(what)[1], 5)}
                            for what in ("adherent", "stopped", "runaway")}}
        say(f"[{label}] format: {report}")
    return out


# ---------------------------------------------------------------------- printing


def pct(s: dict) -> str:
    return f"{s['rate']:6.1%} [{s['low']:.1%}, {s['high']:.1%}]"


def print_task_table(rows: dict[str, dict]) -> None:
    """Success overall and per family (95% Wilson intervals), one line per model."""
    families = next(iter(rows.values()))["task"].get("per_family", {})
    print(f"  {'task success':<16} {'overall':>22} " + " ".join(f"{f:>22}" for f in families))
    for label, m in rows.items():
        t = m["task"]
        print(f"  {label:<16} {pct(t):>22} " + " ".join(f"{pct(t['per_family'][f]):>22}" for f in families))


def print_masking(result: dict) -> None:
    print(f"\nmasking: loss on response tokens only vs on every token ({result['steps']} steps each)")
    print(f"  {'model':<16} {'resp val loss':>13} {'format adherent':>24} {'stopped':>8} {'runaway':>8}")
    for label, m in result["models"].items():
        f = m["format"]
        print(f"  {label:<16} {m['val_loss']:>13.4f} {pct(f['adherent']):>24} {f['stopped']['rate']:>8.1%} "
              f"{f['runaway']['rate']:>8.1%}")
    print_task_table(result["models"])
    print(f"  all tokens - response only: val loss {result['val_loss_difference']:+.4f} nats/token, task success "
          f"{result['task_rate_difference']:+.1%}")


def print_packing(result: dict) -> None:
    print(f"\npacking: packed rows vs one padded example per row (matched: {result['matched_by']})")
    print(f"  {'variant':<8} {'steps':>6} {'examples':>9} {'real tokens':>12} {'slots':>10} {'real %':>7} "
          f"{'train s':>8} {'tokens/s':>9} {'resp val loss':>13}")
    for label, r in result["runs"].items():
        print(f"  {label:<8} {r['steps']:>6} {r['examples_seen']:>9,} {r['tokens_seen']:>12,} "
              f"{r['slots_computed']:>10,} {r['real_token_fraction']:>7.1%} {r['train_seconds']:>8.1f} "
              f"{r['tokens_per_s']:>9,.0f} {r['val_loss']:>13.4f}")
    print(f"  packed / padded: {result['tokens_per_s_ratio']:.2f}x real tokens/s, "
          f"{result['train_seconds_ratio']:.2f}x training time")


def print_lora(result: dict) -> None:
    print("\nlora: LoRA adapters vs full fine-tuning")
    print(f"  {'variant':<8} {'trainable':>10} {'% of model':>10} {'AdamW state':>12} {'8 B/param':>10} "
          f"{'s/step':>7} {'resp val loss':>13}")
    for label, r in result["runs"].items():
        print(f"  {label:<8} {r['trainable_params']:>10,} {r['trainable_params'] / r['params']:>10.2%} "
              f"{r['optimizer_state_bytes']['total'] / 1e6:>9.3f} MB {8 * r['trainable_params'] / 1e6:>7.3f} MB "
              f"{r['seconds_per_step']:>7.3f} {r['val_loss']:>13.4f}")
    print_task_table(result["models"])
    print(f"  lora / full: {result['trainable_ratio']:.4f}x trainable parameters, "
          f"{result['optimizer_bytes_ratio']:.4f}x optimizer state, {result['seconds_per_step_ratio']:.2f}x s/step")


# ---------------------------------------------------------------------- the comparisons


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="max_steps of every variant (default: the presets')")
    parser.add_argument("--only", choices=COMPARISONS, help="run one comparison only")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default: {RESULTS})")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for everything (default: torch's)")
    args = parser.parse_args()
    for name in ("steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    todo = (args.only,) if args.only else COMPARISONS
    start_load, started = load_average(), time.perf_counter()
    say(f"SFT benchmark: {', '.join(todo)}; load average {start_load} on {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads")

    base_dir = pretrained.ensure("english", progress=True)  # trained once if it is not cached
    base_summary = json.loads((base_dir / "summary.json").read_text(encoding="utf-8"))
    say(f"base model: {base_dir}")
    result: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**machine_summary(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "shared_machine": "timings are wall-clock on a machine that may have been shared with other work: compare "
                          "them with the load averages recorded (start, end, and before/after every run)",
        "load_average_at_start": start_load,
        "base": {"preset": "english", "folder_name": base_dir.name, "params": base_summary["params"],
                 "pretraining_val_loss": base_summary["val_loss"]},
        "settings": {"steps": args.steps, "steps_note": "null: each preset's max_steps", "only": args.only,
                     "threads": torch.get_num_threads(),
                     "seed": SFT_PRESETS["sft-full"].seed, "template": "chatml", "task_test_prompts": 400,
                     "task_split_seed": 0, "greedy": True,
                     "evaluation": "once at the end of each run (eval_interval=0, no samples): response tokens of "
                                   "the validation split, each example alone"},
    }
    runs: dict[str, dict] = {}
    models: dict[str, dict] = {}

    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        tmp_path = Path(tmp)

        def full() -> dict:  # the reference run, shared by the three comparisons
            if "full" not in runs:
                runs["full"], trainer = train_variant("sft-full", variant("sft-full", args.steps), tmp_path / "full")
                runs["full"]["_trainer"] = trainer
            return runs["full"]

        def measured(label: str, folder: Path, fmt: bool = False) -> dict:
            have = models.setdefault(label, {})
            need_task, need_fmt = "task" not in have, fmt and "format" not in have
            if need_task or need_fmt:
                have.update(measure_model(label, folder, task=need_task, fmt=need_fmt))
            return have

        if "masking" in todo:
            ref = full()
            runs["all_tokens"], _ = train_variant(
                "all-tokens", variant("sft-full", args.steps, name="sft-full-all-tokens", train_on_prompt=True),
                tmp_path / "all_tokens")
            trainer = ref["_trainer"]
            base_model, _ = load_model(base_dir)
            base_loss = response_loss(base_model.to(trainer.device), trainer.data.val_examples, trainer.token_lengths,
                                      trainer.pad_id, trainer.cfg.eval_batch_size, trainer.device)["loss"]
            del base_model
            table = {
                "base (no SFT)": {"val_loss": round(base_loss, 5), **measured("base", base_dir, fmt=True)},
                "response only": {"val_loss": ref["val_loss"], **measured("full", tmp_path / "full", fmt=True)},
                "all tokens": {"val_loss": runs["all_tokens"]["val_loss"],
                               **measured("all_tokens", tmp_path / "all_tokens", fmt=True)},
            }
            result["masking"] = {
                "steps": ref["steps"], "models": table,
                "val_loss_difference": round(table["all tokens"]["val_loss"] - table["response only"]["val_loss"], 5),
                "task_rate_difference": round(table["all tokens"]["task"]["rate"]
                                              - table["response only"]["task"]["rate"], 5),
            }

        if "packing" in todo:
            ref = full()
            cfg = ref["_trainer"].cfg
            # a padded row is one example: take as many steps as it needs to see the examples the packed run saw
            padded_steps = max(1, round(ref["examples_seen"] / (cfg.batch_size * cfg.accumulation_steps)))
            runs["padded"], _ = train_variant(
                "padded", variant("sft-full", args.steps, name="sft-full-padded", packing=False,
                                  max_steps=padded_steps), tmp_path / "padded")
            packed, padded = ref, runs["padded"]
            result["packing"] = {
                "matched_by": (f"examples seen: the packed run's {packed['examples_seen']:,} examples "
                               f"({packed['rows_seen']:,} rows of {cfg.context_length} tokens) / batch "
                               f"{cfg.batch_size} = {padded_steps} padded steps"),
                "schedule": "the same recipe in steps for both: warmup_steps as the preset's, then the cosine to "
                            "each run's own max_steps",
                "runs": {"packed": _public(packed), "padded": _public(padded)},
                "tokens_per_s_ratio": round(packed["tokens_per_s"] / padded["tokens_per_s"], 4),
                "train_seconds_ratio": round(packed["train_seconds"] / padded["train_seconds"], 4),
                "val_loss_difference_padded_minus_packed": round(padded["val_loss"] - packed["val_loss"], 5),
            }

        if "lora" in todo:
            ref = full()
            runs["lora"], _ = train_variant("sft-lora", variant("sft-lora", args.steps), tmp_path / "lora")
            lora = runs["lora"]
            table = {"full": measured("full", tmp_path / "full"), "lora": measured("lora", tmp_path / "lora")}
            result["lora"] = {
                "runs": {"full": _public(ref), "lora": _public(lora)},
                "models": {"full": {"val_loss": ref["val_loss"], **table["full"]},
                           "lora": {"val_loss": lora["val_loss"], **table["lora"]}},
                "trainable_ratio": round(lora["trainable_params"] / ref["trainable_params"], 6),
                "optimizer_bytes_ratio": round(lora["optimizer_state_bytes"]["total"]
                                               / ref["optimizer_state_bytes"]["total"], 6),
                "seconds_per_step_ratio": round(lora["seconds_per_step"] / ref["seconds_per_step"], 4),
                "optimizer_bytes_formula": "8 bytes per trainable parameter (exp_avg and exp_avg_sq, fp32) plus "
                                           "one 4-byte step counter per parameter tensor",
            }

        result["runs"] = {name: _public(run) for name, run in runs.items()}
        for run in runs.values():
            run.pop("_trainer", None)

    result["load_average_at_end"] = load_average()
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    if "masking" in result:
        print_masking(result["masking"])
    if "packing" in result:
        print_packing(result["packing"])
    if "lora" in result:
        print_lora(result["lora"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.only and args.out.is_file():  # one comparison: keep the others the file already holds
        result = merge_results(json.loads(args.out.read_text(encoding="utf-8")), result, args.only)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\n{result['total_seconds']:.0f} s in all; load average {start_load} at the start, "
          f"{result['load_average_at_end']} at the end -> {args.out}")
    return 0


def merge_results(old: dict, new: dict, only: str) -> dict:
    """``old`` with comparison ``only`` (and its runs) replaced by ``new``'s; each comparison keeps its own date.

    The file can then be filled one comparison at a time (``--only masking``,
    then ``--only lora``...) without losing what an earlier run measured.
    """
    merged = dict(old)
    for comparison in COMPARISONS:  # the date, machine and load of the run that measured each comparison
        if comparison in merged and "measured" not in merged[comparison]:
            merged[comparison] = {**merged[comparison], "measured": {
                k: old.get(k) for k in ("date", "machine", "versions", "load_average_at_start", "load_average_at_end")}}
    merged[only] = {**new[only], "measured": {k: new.get(k) for k in ("date", "machine", "versions",
                                                                     "load_average_at_start", "load_average_at_end")}}
    for key, value in new.items():  # the run's own keys (date, machine, load, seconds, settings): the latest run's
        if key not in COMPARISONS and key != "runs":
            merged[key] = value
    merged["runs"] = {**old.get("runs", {}), **new.get("runs", {})}
    return merged


def _public(run: dict) -> dict:
    """A run's record without the trainer kept for the comparisons."""
    return {k: v for k, v in run.items() if not k.startswith("_")}


if __name__ == "__main__":
    sys.exit(main())
