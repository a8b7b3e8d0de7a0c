"""Chapter 11's measurements: the evaluation table, decoding cost, batching, quantization, speculative decoding.

    .venv/bin/python benchmarks/bench_inference.py                     # from the repository root: every section
    .venv/bin/python benchmarks/bench_inference.py --only speculative  # one section (the others stay in the file)
    .venv/bin/python benchmarks/bench_inference.py --threads 1         # on a machine shared with other work

Sections (``--only`` one of them):

* **evaluation**: ``evaluation.suite.evaluate_book_models`` with more items than
  the chapter (``--items``, default 200 per book and 200 task prompts): bits
  per byte on held-out Shakespeare and Austen, the book's multiple-choice task
  (acc and acc_norm) and the verifiable task, each with its 95% interval, for
  the reference, English base, SFT, DPO and GRPO models; and lm-eval's
  agreement with our scorer on 100 items (``harness_agreement``).
* **roofline**: this machine's copy bandwidth and matmul FLOP/s, and predicted vs
  measured greedy decoding for random-weight models of 1M to 350M parameters
  (``decode_cost.BENCH_SIZES``), with and without the KV cache; the fitted
  fixed cost per step.
* **batching**: decode throughput by batch size, and one synthetic stream of
  requests served by static and continuous batching (tokens/s, latency, time
  to first token), English base model.
* **quantization**: float32, our int8 and int4, and torch.ao's dynamic int8 of
  the English base model: bytes, bits per byte on held-out Austen, tokens/s,
  greedy agreement. The issue's target: int8 changes bits per byte by <= 0.01.
* **speculative**: greedy speculative decoding of the English base model with
  the one-layer draft ("english-draft"), k = 1..8, against plain greedy: acceptance,
  tokens per target pass, speed-up, identical outputs. The issue's target: >= 1.5x
  with the best k.
* **compile**: torch.compile of each block for greedy decoding vs eager
  (tokens/s, compile seconds with an empty Inductor cache, same tokens) or the
  reason it was skipped.

The models are the book's cached ones (trained once into ``$LLMBOOK_CACHE_DIR``).
Timings are wall-clock: the load average is recorded before and after each
section. Results, with the machine, the date and the library versions, go to
benchmarks/results/inference.json (``--out`` elsewhere).
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
RESULTS = ROOT / "benchmarks" / "results" / "inference.json"
SECTIONS = ("evaluation", "roofline", "batching", "quantization", "speculative", "compile")

# Offline by default: use the repository's shared data folder when none is set.
_SHARED = ROOT.parent / "shared" / "data"
if "LLMBOOK_DATA_DIR" not in os.environ and _SHARED.is_dir():
    os.environ["LLMBOOK_DATA_DIR"] = str(_SHARED)

import torch  # noqa: E402

from llmbook import loader, pretrained  # noqa: E402
from llmbook.evaluation import book_tasks, suite  # noqa: E402
from llmbook.inference import compiled, decode_cost, quantize, speculative, workload  # noqa: E402
from llmbook.inference.ngram_draft import NgramDraft  # noqa: E402
from llmbook.notebook import machine_summary  # noqa: E402


def say(text: str) -> None:
    print(text, flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def now() -> str:
    """The date as a person reads it: ``2026-12-01 03:40 UTC``."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def machine_line() -> str:
    m = machine_summary()
    return (f"{m['cpu']}, {m['cores']} cores, {m['torch threads']} torch threads, {m['memory']}, "
            f"{'no GPU' if m['gpu'] == 'none' else m['gpu']}, torch {m['torch']}, Python {m['python']}")


def english():
    run = pretrained.load("english", progress=False)
    return run.model, run.tokenizer


def evaluation(items: int) -> dict:
    sizes = suite.EvalSizes(mc_items=items, task_items=items)
    rows = suite.evaluate_book_models(sizes=sizes)
    say(suite.format_table(rows))
    model, tok = english()
    shakespeare = book_tasks.continuation_items("shakespeare", n=100, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        agreement = suite.harness_agreement(model, tok, shakespeare, folder, "book_shakespeare",
                                            delimiter=book_tasks.DELIMITERS["shakespeare"])
    say(f"lm-eval vs ours on {agreement['items']} items: identical={agreement['identical']}, "
        f"max difference {agreement['max_abs_diff']} nats")
    return {"sizes": vars(sizes), "models": rows, "lm_eval_agreement": agreement}


def roofline() -> dict:
    roofs = decode_cost.measure_roofs()
    points = decode_cost.roofline_points(decode_cost.BENCH_SIZES, roofs=roofs)
    fit = decode_cost.fit_overhead(points)
    for p in points:
        say(f"{p['name']:>5} cache={p['use_cache']!s:5} predicted {p['predicted_tokens_per_s']:>9,.0f} "
            f"measured {p['measured_tokens_per_s']:>9,.1f} tokens/s ({p['ratio']:.2f} of the roof)")
    return {"bandwidth_bytes_per_s": roofs.bandwidth, "matmul_flops": roofs.flops, "points": points,
            "overhead_fit": {"overhead_s": fit.overhead_s, "slowdown": fit.slowdown, "n_points": fit.n_points}}


def batching() -> dict:
    model, tok = english()
    by_batch = workload.throughput_by_batch_size(model, sizes=(1, 2, 4, 8, 16, 32))
    stream = workload.request_stream(n=96, vocab_size=tok.vocab_size)
    served = workload.compare_batching(model, stream, batch_size=8, vocab_size=tok.vocab_size)
    out = {"by_batch_size": by_batch, "stream": {"requests": len(stream), "batch_size": 8},
           "static": served["static"].summary(), "continuous": served["continuous"].summary(),
           "identical_outputs": served["static"].outputs == served["continuous"].outputs}
    say(f"static {out['static']['tokens_per_s']} tokens/s vs continuous {out['continuous']['tokens_per_s']}")
    return out


def quantization() -> dict:
    model, tok = english()
    docs = suite.held_out_documents("austen", 24, doc_chars=2000)
    rows = quantize.measure_quantized(model, tok, docs, new_tokens=128, repeats=3)
    for r in rows:
        say(f"{r['scheme']:>10}: {r['bytes']} bytes, bpb {r['bpb']}, {r['tokens_per_s']} tokens/s, "
            f"same argmax {r['same_argmax']}, greedy prefix {r['greedy_prefix']} {r['note'] or ''}")
    int8 = next(r for r in rows if r["scheme"] == "int8")
    return {"documents": len(docs), "rows": rows, "int8_delta_bpb_target": 0.01,
            "int8_meets_target": abs(int8["delta_bpb"]) <= 0.01}


def speculative_section() -> dict:
    """Both drafts on the same prompts: the one-layer neural draft, and the n-gram draft (training-data counts)."""
    run = pretrained.load("english", progress=False)
    model, tok = run.model, run.tokenizer
    draft = pretrained.load("english-draft", progress=False).model
    prepared = loader.prepare_data(run.config.dataset, run.config.tokenizer)
    ngram = NgramDraft.fit(prepared.train, order=3)
    prompts = [tok.encode_ordinary(d[:200]) for d in suite.held_out_documents("austen", 12, doc_chars=400)]
    out = {}
    for name, d in (("neural", draft), ("ngram", ngram)):
        rows = speculative.measure_speedup(model, d, prompts, ks=range(1, 9), max_new_tokens=96,
                                           vocab_size=tok.vocab_size, repeats=2)
        for r in rows:
            say(f"{name} k={r['k']}: acceptance {r['acceptance']:.2f}, {r['tokens_per_call']:.2f} tokens per "
                f"target pass, {r['speedup']:.2f}x, identical {r['identical']}")
        best = max(rows, key=lambda r: r["speedup"])
        out[name] = {"rows": rows, "best_k": best["k"], "best_speedup": best["speedup"],
                     "identical": all(r["identical"] for r in rows)}
    best = max(out.values(), key=lambda o: o["best_speedup"])
    return {"target": "english", "draft": "english-draft", "target_params": model.num_params(),
            "draft_params": draft.num_params(), "prompts": len(prompts), "max_new_tokens": 96,
            # the one-layer draft's rows at the top level, as before; the n-gram draft's under "ngram"
            "rows": out["neural"]["rows"], "best_k": out["neural"]["best_k"],
            "best_speedup": out["neural"]["best_speedup"],
            "ngram": {"draft": "NgramDraft.fit(english training tokens, order=3), lookup on",
                      "contexts": [len(t) for t in ngram.tables], **out["ngram"]},
            "target_speedup": 1.5, "meets_target": best["best_speedup"] >= 1.5 and best["identical"]}


def compile_section() -> dict:
    # a fresh Inductor cache: a warm on-disk cache from an earlier run would make compiling look nearly free
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_")
    model, _ = english()
    result = compiled.compiled_decode(model, prompt_len=16, new_tokens=64)
    say(result.skipped or f"eager {result.eager_tokens_per_s:.0f} vs compiled {result.compiled_tokens_per_s:.0f} "
                          f"tokens/s, compile {result.compile_s:.0f} s, identical {result.identical}")
    return {**vars(result), "speedup": result.speedup}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=SECTIONS, help="run one section only")
    parser.add_argument("--items", type=int, default=200, help="multiple-choice items per book and task prompts")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: 1, as the chapter)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default: {RESULTS})")
    args = parser.parse_args()
    if args.items < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--items and --threads must be positive")
    torch.set_num_threads(args.threads or 1)
    todo = (args.only,) if args.only else SECTIONS
    started, start_load = time.perf_counter(), load_average()
    say(f"inference benchmark: {', '.join(todo)}; load average {start_load} on {os.cpu_count()} cores")
    import lm_eval  # noqa: PLC0415 (its version is recorded)

    result: dict = {
        "date": now(), "machine": machine_line(),
        "machine_details": {**machine_summary(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "lm_eval": getattr(lm_eval, "__version__", "?"),
                     "python": platform.python_version()},
        "shared_machine": "timings are wall-clock: compare them with the load averages recorded",
        "load_average_at_start": start_load,
    }
    runners = {"evaluation": lambda: evaluation(args.items), "roofline": roofline, "batching": batching,
               "quantization": quantization, "speculative": speculative_section, "compile": compile_section}
    for name in todo:
        say(f"== {name}")
        before, t0 = load_average(), time.perf_counter()
        result[name] = {"date": now(), "machine": machine_line(), **runners[name](),
                        "seconds": round(time.perf_counter() - t0, 1),
                        "load_average_before": before, "load_average_after": load_average()}
    result["load_average_at_end"] = load_average()
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.is_file():  # keep the sections this run did not measure
        old = json.loads(args.out.read_text(encoding="utf-8"))
        result = {**{k: v for k, v in old.items() if k in SECTIONS and k not in todo}, **result}
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    say(f"{result['total_seconds']:.0f} s in all; load average {start_load} at the start, "
        f"{result['load_average_at_end']} at the end -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
