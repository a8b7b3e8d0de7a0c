"""Tokenizer benchmark: training and encoding speed of llmbook.bpe against the compiled libraries.

    .venv/bin/python benchmarks/bench_tokenizer.py            # from the repository root

Measures, in one run and side by side:

* training time, ours (``llmbook.bpe.train_bpe``) vs Hugging Face ``tokenizers``
  (byte-level BPE) vs SentencePiece BPE, on corpus.en at a vocabulary of 500
  and on Tiny Shakespeare at 4,096, each with ``<|endoftext|>`` as a special token;
* encoding speed on Tiny Shakespeare with GPT-2's ranks: ours
  (``Tokenizer.from_tiktoken("gpt2").encode_ordinary``) vs tiktoken's
  ``encode_ordinary``, which runs on one thread, and whether the ids agree;
* hostile text: one megabyte of a single repeated letter, which GPT-2's
  pattern makes one pre-token of a million bytes (and a megabyte of random
  letters, one pre-token with thousands of different merges): time, ours vs
  tiktoken, identical ids, and the peak memory our encoder allocates
  (``tracemalloc``; tiktoken's Rust memory is not visible to it).

Times are the best of a few runs (the least disturbed one). Our encoder caches
the ids of every pre-token it has seen, so its speed is measured with a fresh
tokenizer each run ("cold", the fair comparison) and, for information, on a
second pass over the same text ("warm").

Targets (the script exits with status 1 when one is missed):
corpus.en at vocab 500 trains in under 1.5 s, our encoder runs at least
0.25x tiktoken's speed with identical ids, and encodes a megabyte of one
repeated letter in at most 2 s with identical ids, allocating at most 200
bytes per input byte at its peak (linear, not quadratic). Results, with the
hardware, the date and the library versions, go to
benchmarks/results/tokenizer.json.
"""

from __future__ import annotations

import io
import json
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "tokenizer.json"
SPECIAL = "<|endoftext|>"
REPEATS = 3
TARGET_CORPUS_EN_SECONDS = 1.5
TARGET_ENCODE_RATIO = 0.25
HOSTILE_CHARS = 1_000_000
TARGET_HOSTILE_SECONDS = 2.0
TARGET_HOSTILE_BYTES_PER_BYTE = 200

# Offline by default: use the repository's shared data folder when none is set.
_SHARED = ROOT.parent / "shared" / "data"
if "LLMBOOK_DATA_DIR" not in os.environ and _SHARED.is_dir():
    os.environ["LLMBOOK_DATA_DIR"] = str(_SHARED)

import sentencepiece as spm  # noqa: E402
import tokenizers  # noqa: E402

from llmbook import bpe, data  # noqa: E402


def best_of(fn: Callable[..., object], *args, repeats: int = REPEATS) -> tuple[float, float]:
    """(best, median) wall-clock seconds of ``repeats`` calls of ``fn(*args)``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def train_ours(path: Path, vocab_size: int) -> None:
    bpe.train_bpe(path, vocab_size, special_tokens=[SPECIAL])


def train_hf(path: Path, vocab_size: int) -> None:
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train([str(path)], trainer=trainer)


def train_sentencepiece(path: Path, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        input=str(path), model_writer=io.BytesIO(), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=[SPECIAL],
        num_threads=os.cpu_count() or 1, minloglevel=2,
    )


TRAINERS = {"ours": train_ours, "hf_tokenizers": train_hf, "sentencepiece_bpe": train_sentencepiece}


def bench_training() -> list[dict]:
    rows = []
    for corpus, vocab_size in [("corpus.en", 500), ("tinyshakespeare", 4096)]:
        path = data.path(corpus)
        row = {"corpus": corpus, "bytes": path.stat().st_size, "vocab_size": vocab_size}
        for name, train in TRAINERS.items():
            best, median = best_of(train, path, vocab_size)
            row[f"{name}_s"] = round(best, 4)
            row[f"{name}_median_s"] = round(median, 4)
        rows.append(row)
    return rows


def bench_encoding() -> dict:
    text = data.read_text("tinyshakespeare")
    megabytes = len(text.encode("utf-8")) / 1e6
    enc = data.tiktoken_encoding("gpt2")
    t0 = time.perf_counter()
    bpe.Tokenizer.from_tiktoken("gpt2")  # recovers GPT-2's merges from the ranks, once per process
    load_seconds = time.perf_counter() - t0

    theirs = enc.encode_ordinary(text)  # warm-up: tiktoken compiles its regex on first use
    tiktoken_s, _ = best_of(enc.encode_ordinary, text)

    cold_times, ours = [], None
    for _ in range(REPEATS):
        tok = bpe.Tokenizer.from_tiktoken("gpt2")  # an empty pre-token cache
        t0 = time.perf_counter()
        ours = tok.encode_ordinary(text)
        cold_times.append(time.perf_counter() - t0)
    warm_s, _ = best_of(tok.encode_ordinary, text)
    cold_s = min(cold_times)
    return {
        "corpus": "tinyshakespeare",
        "megabytes": round(megabytes, 4),
        "tokens": len(theirs),
        "identical_ids": ours == theirs,
        "ours_load_gpt2_s": round(load_seconds, 3),
        "tiktoken_mb_s": round(megabytes / tiktoken_s, 3),
        "ours_cold_mb_s": round(megabytes / cold_s, 3),
        "ours_warm_mb_s": round(megabytes / warm_s, 3),
        "ratio_cold": round(tiktoken_s / cold_s, 3),
        "ratio_warm": round(tiktoken_s / warm_s, 3),
    }


def bench_hostile() -> list[dict]:
    """One megabyte that is a single pre-token: ours vs tiktoken, best of ``REPEATS``, and our peak memory."""
    enc = data.tiktoken_encoding("gpt2")
    tok = bpe.Tokenizer.from_tiktoken("gpt2")
    rng = random.Random(0)
    texts = {
        "one letter repeated (a * 1M)": "a" * HOSTILE_CHARS,
        "random lowercase letters (1M)": "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=HOSTILE_CHARS)),
    }
    rows = []
    for what, text in texts.items():
        assert len(tok._split(text)) == 1  # one pre-token: the case the merge loop must survive
        theirs = enc.encode_ordinary(text)
        tiktoken_s, _ = best_of(enc.encode_ordinary, text)
        ours_s, _ = best_of(tok.encode_ordinary, text)
        tracemalloc.start()
        ours = tok.encode_ordinary(text)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append({
            "text": what,
            "megabytes": round(len(text.encode("utf-8")) / 1e6, 3),
            "tokens": len(theirs),
            "identical_ids": ours == theirs,
            "ours_s": round(ours_s, 3),
            "tiktoken_s": round(tiktoken_s, 3),
            "ours_over_tiktoken": round(ours_s / tiktoken_s, 2),
            "ours_peak_mb": round(peak / 1e6, 1),
            "ours_peak_bytes_per_byte": round(peak / len(text.encode("utf-8")), 1),
        })
    return rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ["llmbook", "tiktoken", "tokenizers", "sentencepiece", "regex", "numpy"]:
        try:
            found[package] = version(package)
        except Exception:  # not installed as a distribution
            found[package] = "unknown"
    return found


def main() -> int:
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; best of {REPEATS} runs\n")
    training = bench_training()
    print(f"{'training time':<42}{'ours':>9}{'HF tokenizers':>15}{'SentencePiece':>15}"
          f"{'ours/HF':>9}{'ours/SP':>9}")
    for row in training:
        label = f"{row['corpus']} ({row['bytes'] / 1e6:.2f} MB), vocab {row['vocab_size']}"
        ours, hf, sp = row["ours_s"], row["hf_tokenizers_s"], row["sentencepiece_bpe_s"]
        print(f"{label:<42}{ours:>8.3f}s{hf:>14.3f}s{sp:>14.3f}s{ours / hf:>8.2f}x{ours / sp:>8.2f}x")

    encoding = bench_encoding()
    print(f"\nencode Tiny Shakespeare with GPT-2 ranks ({encoding['tokens']:,} tokens)")
    print(f"  tiktoken encode_ordinary (1 thread): {encoding['tiktoken_mb_s']:7.2f} MB/s")
    print(f"  ours, cold cache:                    {encoding['ours_cold_mb_s']:7.2f} MB/s "
          f"= {encoding['ratio_cold']:.2f}x tiktoken")
    print(f"  ours, warm cache:                    {encoding['ours_warm_mb_s']:7.2f} MB/s "
          f"= {encoding['ratio_warm']:.2f}x tiktoken")
    print(f"  identical ids: {encoding['identical_ids']}; loading GPT-2's ranks into ours took "
          f"{encoding['ours_load_gpt2_s']:.2f} s")

    hostile = bench_hostile()
    print("\nhostile text: one pre-token of a million bytes, GPT-2 ranks")
    for row in hostile:
        print(f"  {row['text']:<32} ours {row['ours_s']:6.2f} s, tiktoken {row['tiktoken_s']:6.2f} s "
              f"(ours/tiktoken {row['ours_over_tiktoken']:.1f}x); identical ids: {row['identical_ids']}; "
              f"our peak allocation {row['ours_peak_mb']:.0f} MB = {row['ours_peak_bytes_per_byte']:.0f} B/byte")

    corpus_en = training[0]["ours_s"]
    targets = {
        "corpus_en_vocab500_under_1.5s": {
            "target": f"< {TARGET_CORPUS_EN_SECONDS} s", "value": corpus_en,
            "met": corpus_en < TARGET_CORPUS_EN_SECONDS,
        },
        "encode_at_least_0.25x_tiktoken": {
            "target": f">= {TARGET_ENCODE_RATIO}x (cold cache)", "value": encoding["ratio_cold"],
            "met": encoding["ratio_cold"] >= TARGET_ENCODE_RATIO,
        },
        "encode_identical_ids": {"target": "ids == tiktoken's", "value": encoding["identical_ids"],
                                 "met": encoding["identical_ids"]},
        "one_letter_1MB_under_2s": {
            "target": f"<= {TARGET_HOSTILE_SECONDS} s, ids == tiktoken's", "value": hostile[0]["ours_s"],
            "met": hostile[0]["ours_s"] <= TARGET_HOSTILE_SECONDS and hostile[0]["identical_ids"],
        },
        "hostile_memory_linear": {
            "target": f"<= {TARGET_HOSTILE_BYTES_PER_BYTE} bytes allocated per input byte",
            "value": max(row["ours_peak_bytes_per_byte"] for row in hostile),
            "met": all(row["ours_peak_bytes_per_byte"] <= TARGET_HOSTILE_BYTES_PER_BYTE for row in hostile),
        },
        "hostile_identical_ids": {"target": "ids == tiktoken's", "value": all(r["identical_ids"] for r in hostile),
                                  "met": all(r["identical_ids"] for r in hostile)},
    }
    print("\ntargets:")
    for name, t in targets.items():
        print(f"  {'PASS' if t['met'] else 'MISS'}  {name}: {t['value']} (target {t['target']})")

    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": {"cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
                     "system": f"{platform.system()} {platform.release()}"},
        "versions": versions(),
        "repeats": REPEATS,
        "training": training,
        "encoding": encoding,
        "hostile": hostile,
        "targets": targets,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    return 0 if all(t["met"] for t in targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
