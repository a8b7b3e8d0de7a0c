"""Chapter 10's measurements: DPO's beta sweep, held-out preference accuracy, and the verifiable task by method.

    .venv/bin/python benchmarks/bench_preference.py                       # from the repository root: all three
    .venv/bin/python benchmarks/bench_preference.py --only beta_sweep     # one comparison: beta_sweep, preference, task
    .venv/bin/python benchmarks/bench_preference.py --threads 1           # on a machine shared with other work
    .venv/bin/python benchmarks/bench_preference.py --only beta_sweep --steps 5 --out /tmp/p.json  # smoke run

The models are the book's cached ones (``sft.load("sft-full")``, ``dpo.load``,
``reward_model.load``, ``grpo.load``: trained once, then read from
``$LLMBOOK_CACHE_DIR``); only the beta sweep trains, into a temporary folder
(never the cache). Three comparisons:

* **beta_sweep**: ``DPO_PRESETS["dpo-polite"]`` with only ``beta`` changed, at
  beta in (0.01, 0.03, 0.1, 0.3, 1.0), same seed, data order and steps.
  For each: on ``polite_split()``'s 111 test pairs (never trained on), the
  implicit-reward accuracy, mean reward margin and KL to the reference (the
  SFT model; ``dpo.implicit_reward_accuracy``, KL in nats per response token,
  on the data's contexts), the rate of impolite wording in the greedy replies
  to the test prompts (``politeness.impolite_rate``), and training seconds.
  The margin is in units of beta (rewards are beta log pi/pi_ref), so compare
  KL and accuracy across beta, not margins.
* **preference**: held-out accuracy on the same 111 pairs: the SFT model's
  implicit reward (50% by construction: every reward is 0, every pair a tie),
  the reward model ``rm-polite`` (``reward_model.held_out_accuracy``) and
  ``dpo-polite``'s implicit reward; ``dpo.dpo_loss`` against TRL's own loss
  code (``dpo.trl_dpo_loss``) on 64 random log-probability quadruples at
  beta 0.1 and 0.5 (largest absolute difference); the impolite-wording rate
  of greedy replies to the 111 test prompts, SFT vs ``dpo-polite``.
* **task**: Chapter 9's verifiable task, its 400 test prompts
  (``make_task_split(0).test``): greedy success (95% Wilson interval) and
  sampled pass@1 at temperature 1.0 (4 seeded samples per prompt, a bootstrap
  interval over prompts) for ``sft-full``, ``dpo-task`` and ``grpo``;
  best-of-8 with the reward model ``rm-task`` (8 samples of ``sft-full`` at
  temperature 1.0, seed 0, the highest reward kept, then graded: one answer
  per prompt, a Wilson interval); and ``sft-full`` sampled at temperature 0.7,
  a control for "does GRPO do more than lower the temperature?". Overall and
  per family.

Timings are measured, never asserted: the load average is recorded at the
start and end of each comparison. Results, with the machine, the date and the
library versions, go to benchmarks/results/preference.json (``--out``
elsewhere); ``--only`` replaces that comparison in the file and keeps the others.
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
RESULTS = ROOT / "benchmarks" / "results" / "preference.json"
COMPARISONS = ("beta_sweep", "preference", "task")
BETAS = (0.01, 0.03, 0.1, 0.3, 1.0)
TRL_BETAS = (0.1, 0.5)
TRL_PAIRS = 64
REPLY_TOKENS = 64  # new tokens of a greedy reply to a polite-data prompt (measure.generate_responses' default)
BEST_OF = 8
SAMPLES = 4  # sampled answers per task prompt for pass@1
TEMPERATURES = (1.0, 0.7)  # 1.0: the training temperature of GRPO and of the on-policy pairs; 0.7: the control

# Offline by default: use the repository's shared data folder when none is set.
_SHARED = ROOT.parent / "shared" / "data"
if "LLMBOOK_DATA_DIR" not in os.environ and _SHARED.is_dir():
    os.environ["LLMBOOK_DATA_DIR"] = str(_SHARED)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llmbook.notebook import machine_summary  # noqa: E402
from llmbook.posttrain import best_of_n, dpo, grpo, reward_model, sft  # noqa: E402
from llmbook.posttrain.masking import encode_prompt  # noqa: E402
from llmbook.posttrain.measure import SampledScore, generate_responses, sampled_score, score_task  # noqa: E402
from llmbook.posttrain.pairs import polite_split, tokenize_pairs  # noqa: E402
from llmbook.posttrain.politeness import impolite_rate  # noqa: E402
from llmbook.posttrain.tasks import TaskScore, make_task_split, score_responses, wilson_interval  # noqa: E402
from llmbook.posttrain.templates import get_template  # noqa: E402


def say(text: str) -> None:
    print(text, flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def now() -> str:
    """The date as a person reads it: ``2026-12-01 03:40 UTC``."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def machine_line() -> str:
    """The machine in one line: ``x86_64, 2 cores, 1 torch thread, 25.3 GB, no GPU, torch 2.13.0+cpu``."""
    m = machine_summary()
    threads = m["torch threads"]
    return (f"{m['cpu']}, {m['cores']} cores, {threads} torch thread{'s' if threads != '1' else ''}, "
            f"{m['memory']}, {'no GPU' if m['gpu'] == 'none' else m['gpu']}, torch {m['torch']}, "
            f"Python {m['python']}")


def r5(x: float) -> float:
    return round(float(x), 5)


# ---------------------------------------------------------------------- small helpers (no training)


def random_logps(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Four ``(n,)`` float64 tensors of summed log-probabilities, as a policy and a reference give them.

    Policy and reference differ by a few nats (as after some DPO steps), so
    the losses span both tails of the sigmoid, not only log 2.
    """
    g = torch.Generator().manual_seed(seed)
    ref_chosen = -torch.rand(n, generator=g, dtype=torch.float64) * 60 - 5
    ref_rejected = -torch.rand(n, generator=g, dtype=torch.float64) * 60 - 5
    policy_chosen = ref_chosen + torch.randn(n, generator=g, dtype=torch.float64) * 5
    policy_rejected = ref_rejected + torch.randn(n, generator=g, dtype=torch.float64) * 5
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


def trl_comparison(n: int = TRL_PAIRS, betas: tuple[float, ...] = TRL_BETAS, seed: int = 0) -> dict:
    """Largest absolute difference between ``dpo.dpo_loss`` and TRL's loss (and rewards) on ``n`` random pairs."""
    logps = random_logps(n, seed)
    out = {}
    for beta in betas:
        ours = dpo.dpo_loss(*logps, beta=beta)
        theirs = dpo.trl_dpo_loss(*logps, beta=beta)
        out[str(beta)] = {
            "max_abs_loss_error": float((ours[0] - theirs[0]).abs().max()),
            "max_abs_reward_error": float(max((ours[1] - theirs[1]).abs().max(), (ours[2] - theirs[2]).abs().max())),
            "loss_range": [r5(ours[0].min()), r5(ours[0].max())],
        }
    return out


def pct(rate: float, low: float, high: float) -> str:
    return f"{rate:6.1%} [{low:.1%}, {high:.1%}]"


def score_dict(score: TaskScore) -> dict:
    out = {"n": score.n, "successes": score.successes, "rate": r5(score.rate), "low": r5(score.low),
           "high": r5(score.high), "mean_score": r5(score.mean_score)}
    if score.per_family:
        out["per_family"] = {name: score_dict(s) for name, s in score.per_family.items()}
    return out


def sampled_dict(score: SampledScore, temperature: float) -> dict:
    return {"rate": r5(score.rate), "low": r5(score.low), "high": r5(score.high), "samples": score.samples,
            "prompts": len(score.per_prompt), "temperature": temperature,
            "interval": "percentile bootstrap over prompts, 2000 draws, seed 0",
            "per_family": {k: r5(v) for k, v in score.per_family.items()}}


def rate_dict(count: int, n: int) -> dict:
    low, high = wilson_interval(count, n)
    return {"count": count, "n": n, "rate": r5(count / n), "low": r5(low), "high": r5(high)}


# ---------------------------------------------------------------------- measuring


def polite_test_prompts(tokenizer, context_length: int) -> tuple[list, int]:
    """The 111 test pairs' prompts that leave room for ``REPLY_TOKENS`` new tokens; how many did not."""
    template = get_template("chatml")
    keep, dropped = [], 0
    for pair in polite_split()[2]:
        ids = encode_prompt(tokenizer, list(pair.prompt), template, special_in_content="ordinary")
        if len(ids) + REPLY_TOKENS <= context_length:
            keep.append(list(pair.prompt))
        else:
            dropped += 1
    return keep, dropped


def impoliteness(model, tokenizer) -> dict:
    """The rate of impolite wording in greedy replies to the polite data's test prompts, with a Wilson interval."""
    prompts, dropped = polite_test_prompts(tokenizer, model.cfg.context_length)
    replies = generate_responses(model, tokenizer, prompts, "chatml", max_new_tokens=REPLY_TOKENS)
    count, n = impolite_rate([text for text, _ in replies])
    return {**rate_dict(count, n), "prompts_too_long": dropped, "max_new_tokens": REPLY_TOKENS,
            "stopped": sum(s for _, s in replies)}


def held_out(policy, reference, test_tok, beta: float, pad_id: int) -> dict:
    m = dpo.implicit_reward_accuracy(policy, reference, test_tok, beta=beta, pad_id=pad_id)
    return {"accuracy": r5(m["accuracy"]), "margin": r5(m["margin"]), "kl": r5(m["kl"]), "loss": r5(m["loss"]),
            "ties": m["ties"], "n": m["n"], "logps_chosen": r5(m["logps/chosen"]),
            "logps_rejected": r5(m["logps/rejected"])}


def sft_reference():
    """sft-full (eval mode, no dropout: ``dpo.without_dropout``, as DPO's reference), its tokenizer and pad id."""
    loaded = sft.load("sft-full", progress=False)
    reference = dpo.without_dropout(loaded.model).eval()
    return reference, loaded.tokenizer, loaded.tokenizer.special_tokens.get("<|endoftext|>", 0)


def polite_test(tokenizer) -> tuple[list, int]:
    test = polite_split()[2]
    tok, dropped = tokenize_pairs(tokenizer, test, get_template("chatml"), dpo.DPO_PRESETS["dpo-polite"].context_length)
    return tok, dropped


# ---------------------------------------------------------------------- the comparisons


def beta_sweep(steps: int | None, threads: int | None) -> dict:
    preset = dpo.DPO_PRESETS["dpo-polite"]
    reference, tokenizer, pad_id = sft_reference()
    test_tok, dropped = polite_test(tokenizer)
    max_steps = steps or preset.max_steps
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_preference_") as tmp:
        for beta in BETAS:
            cfg = dataclasses.replace(preset, name=f"dpo-polite-beta{beta:g}", beta=beta, max_steps=max_steps,
                                      warmup_steps=min(preset.warmup_steps or 0, max_steps), eval_interval=0,
                                      sample_tokens=0, **({"threads": threads} if threads else {}))
            folder = Path(tmp) / f"beta{beta:g}"
            say(f"[beta {beta:g}] DPO, {cfg.max_steps} steps of {cfg.batch_size} pairs, lr {cfg.lr:g} ...")
            load_before = load_average()
            wall = time.perf_counter()
            trainer = dpo.DPOTrainer(cfg, folder, progress=False)
            with contextlib.redirect_stdout(io.StringIO()):  # "trained ... -> <temporary folder>"
                summary = trainer.train()
            wall = time.perf_counter() - wall
            policy = trainer.raw_model.eval()
            run = {"beta": beta, **held_out(policy, reference, test_tok, beta, pad_id),
                   "train_seconds": round(summary["train_seconds"], 2), "wall_seconds": round(wall, 2),
                   "steps": summary["steps"], "val_accuracy": r5(summary["val_accuracy"]),
                   "val_kl": r5(summary["val_kl"]), "impolite": impoliteness(policy, tokenizer),
                   "load_average_before": load_before, "load_average_after": load_average()}
            runs.append(run)
            say(f"[beta {beta:g}] held-out accuracy {run['accuracy']:.1%}, margin {run['margin']:.3f}, KL "
                f"{run['kl']:.4f} nats/token, impolite {run['impolite']['rate']:.1%}, "
                f"{run['train_seconds']:.1f} s of training")
            del trainer, policy
    return {"runs": runs, "preset": "dpo-polite", "changed": "beta only",
            "max_steps": max_steps, "max_steps_note": ("the preset's" if steps is None else
                                                        f"--steps {steps}: fewer than the preset's "
                                                        f"{preset.max_steps}, the same for every beta"),
            "batch_size": preset.batch_size, "lr": preset.lr, "seed": preset.seed,
            "test_pairs": len(test_tok), "test_pairs_too_long": dropped,
            "measured_on": "polite_split() test pairs (111), against sft-full as the reference; kl in nats per "
                           "response token on the pairs' contexts; margin = mean beta*(log-ratio chosen - rejected)"}


def preference() -> dict:
    reference, tokenizer, pad_id = sft_reference()
    test_tok, dropped = polite_test(tokenizer)
    beta = dpo.DPO_PRESETS["dpo-polite"].beta
    say("[preference] SFT's and dpo-polite's implicit rewards on the test pairs ...")
    sft_acc = held_out(reference, reference, test_tok, beta, pad_id)
    dpo_polite = dpo.load("dpo-polite", progress=False)
    dpo_acc = held_out(dpo_polite.model, reference, test_tok, beta, pad_id)
    say("[preference] rm-polite on the test pairs ...")
    rm = reward_model.load("rm-polite", progress=False)
    rm_accuracy, rm_n = reward_model.held_out_accuracy(rm)
    say("[preference] dpo_loss vs TRL ...")
    trl = trl_comparison()
    say("[preference] impolite wording in greedy replies: sft-full, dpo-polite ...")
    impolite = {"sft-full": impoliteness(reference, tokenizer),
                "dpo-polite": impoliteness(dpo_polite.model, tokenizer)}
    return {
        "test_pairs": len(test_tok), "test_pairs_too_long": dropped,
        "accuracy": {
            "sft-full (implicit reward)": {**sft_acc, "note": "policy = reference: every reward 0, every pair a "
                                                              "tie, counted half"},
            "rm-polite (reward model)": {"accuracy": r5(rm_accuracy), "n": rm_n,
                                         "folder_name": rm.run_dir.name},
            "dpo-polite (implicit reward)": {**dpo_acc, "beta": beta, "folder_name": dpo_polite.run_dir.name},
        },
        "trl": {"pairs": TRL_PAIRS, "seed": 0, "loss_type": "sigmoid", "by_beta": trl,
                "max_abs_loss_error": max(v["max_abs_loss_error"] for v in trl.values()),
                "inputs": "random float64 summed log-probabilities (reference -65..-5 nats, policy = reference "
                          "+ N(0, 5^2))", "trl_code": "trl.trainer.dpo_trainer.DPOTrainer._compute_loss"},
        "impolite": impolite,
    }


def task() -> dict:
    items = make_task_split(0).test
    loaded = sft.load("sft-full", progress=False)
    tokenizer = loaded.tokenizer
    models = {"sft-full": loaded.model, "dpo-task": dpo.load("dpo-task", progress=False).model,
              "grpo": grpo.load("grpo", progress=False).model}
    rows: dict[str, dict] = {}
    for label, model in models.items():
        start = time.perf_counter()
        say(f"[task] {label}: greedy ...")
        greedy, _ = score_task(model, tokenizer, items, "chatml")
        say(f"[task] {label}: greedy {greedy}; sampling {SAMPLES} per prompt at temperature 1.0 ...")
        sampled = sampled_score(model, tokenizer, items, "chatml", samples=SAMPLES, temperature=1.0, seed=0)
        rows[label] = {"greedy": score_dict(greedy), "sampled_t1.0": sampled_dict(sampled, 1.0)}
        say(f"[task] {label}: sampled at 1.0 {sampled}")
        if label == "sft-full":
            control = sampled_score(model, tokenizer, items, "chatml", samples=SAMPLES, temperature=0.7, seed=0)
            rows[label]["sampled_t0.7"] = sampled_dict(control, 0.7)
            say(f"[task] {label}: sampled at 0.7 {control}")
        rows[label]["seconds"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    say(f"[task] best-of-{BEST_OF} of sft-full with rm-task ...")
    rm = reward_model.load("rm-task", progress=False)
    conversations = [item.messages(with_reference=False) for item in items]
    answers = best_of_n.best_of_n(loaded.model, tokenizer, rm.model, conversations, BEST_OF, "chatml",
                                  temperature=1.0, seed=0)
    bon = score_responses(items, answers)
    rows[f"best-of-{BEST_OF} (rm-task)"] = {"greedy": None, "best_of_n": score_dict(bon),
                                            "seconds": round(time.perf_counter() - start, 1)}
    say(f"[task] best-of-{BEST_OF}: {bon}")
    return {"prompts": len(items), "split": "make_task_split(0).test", "max_new_tokens": 48,
            "sampling": f"{SAMPLES} samples per prompt, seed 0; pass@1 = mean over prompts of the fraction passed",
            "best_of_n": {"n": BEST_OF, "temperature": 1.0, "seed": 0, "policy": "sft-full", "reward_model": "rm-task",
                          "kl_bound_nats": r5(best_of_n.best_of_n_kl(BEST_OF))},
            "models": rows}


# ---------------------------------------------------------------------- printing


def print_beta_sweep(result: dict) -> None:
    print(f"\nbeta sweep: DPO on the polite pairs, {result['max_steps']} steps each; held-out "
          f"({result['test_pairs']} test pairs)")
    print(f"  {'beta':>6} {'accuracy':>9} {'margin':>8} {'KL nats/tok':>11} {'impolite':>9} {'train s':>8}")
    for r in result["runs"]:
        print(f"  {r['beta']:>6g} {r['accuracy']:>9.1%} {r['margin']:>8.3f} {r['kl']:>11.4f} "
              f"{r['impolite']['rate']:>9.1%} {r['train_seconds']:>8.1f}")


def print_preference(result: dict) -> None:
    print(f"\npreference: held-out accuracy on {result['test_pairs']} test pairs")
    for label, m in result["accuracy"].items():
        print(f"  {label:<30} {m['accuracy']:6.1%}")
    print(f"  dpo_loss vs TRL, {result['trl']['pairs']} pairs: max |error| "
          + ", ".join(f"beta {b}: {v['max_abs_loss_error']:.2e}" for b, v in result["trl"]["by_beta"].items()))
    for label, m in result["impolite"].items():
        print(f"  impolite wording, {label:<11} {m['count']:>3}/{m['n']} = {pct(m['rate'], m['low'], m['high'])}")


def print_task(result: dict) -> None:
    print(f"\ntask: success on the {result['prompts']} test prompts (95% intervals)")
    families = list(result["models"]["sft-full"]["greedy"]["per_family"])
    print(f"  {'model':<22} {'how':<18} {'overall':>22}  " + " ".join(f"{f:>13}" for f in families))
    for label, m in result["models"].items():
        for how, key in (("greedy", "greedy"), ("sampled T=1.0", "sampled_t1.0"), ("sampled T=0.7", "sampled_t0.7"),
                         (f"best of {BEST_OF}", "best_of_n")):
            s = m.get(key)
            if not s:
                continue
            fam = s["per_family"]
            fam_rates = [fam[f]["rate"] if isinstance(fam[f], dict) else fam[f] for f in families]
            print(f"  {label:<22} {how:<18} {pct(s['rate'], s['low'], s['high']):>22}  "
                  + " ".join(f"{r:>13.1%}" for r in fam_rates))


PRINTERS = {"beta_sweep": print_beta_sweep, "preference": print_preference, "task": print_task}


# ---------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="max_steps of every beta-sweep run (default: dpo-polite's)")
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
    say(f"preference benchmark: {', '.join(todo)}; load average {start_load} on {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads")
    import trl  # noqa: PLC0415 (its version is recorded; dpo.trl_dpo_loss imports it itself)

    result: dict = {
        "date": now(),
        "machine": machine_line(),
        "machine_details": {**machine_summary(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "trl": trl.__version__,
                     "python": platform.python_version()},
        "shared_machine": "timings are wall-clock on a machine that may have been shared with other work: compare "
                          "them with the load averages recorded",
        "load_average_at_start": start_load,
        "settings": {"steps": args.steps, "steps_note": "null: dpo-polite's max_steps", "only": args.only,
                     "threads": torch.get_num_threads(), "template": "chatml",
                     "models": "the cached presets (sft-full, dpo-polite, dpo-task, rm-polite, rm-task, grpo)"},
    }
    for name in todo:
        load_before, start = load_average(), time.perf_counter()
        block = {"beta_sweep": lambda: beta_sweep(args.steps, args.threads), "preference": preference,
                 "task": task}[name]()
        result[name] = {"date": now(), "machine": machine_line(), **block,
                        "seconds": round(time.perf_counter() - start, 1),
                        "load_average_before": load_before, "load_average_after": load_average()}
    result["load_average_at_end"] = load_average()
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    for name in todo:
        PRINTERS[name](result[name])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.only and args.out.is_file():  # one comparison: keep the others the file already holds
        result = merge_results(json.loads(args.out.read_text(encoding="utf-8")), result, args.only)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\n{result['total_seconds']:.0f} s in all; load average {start_load} at the start, "
          f"{result['load_average_at_end']} at the end -> {args.out}")
    return 0


def merge_results(old: dict, new: dict, only: str) -> dict:
    """``old`` with comparison ``only`` replaced by ``new``'s; each comparison keeps its own date and machine."""
    merged = dict(old)
    merged[only] = new[only]
    for key, value in new.items():  # the run's own keys (date, machine, load, seconds, settings): the latest run's
        if key not in COMPARISONS:
            merged[key] = value
    return merged


if __name__ == "__main__":
    sys.exit(main())
