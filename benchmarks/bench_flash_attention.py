"""FlashAttention benchmark: the Triton kernels against PyTorch's flash SDPA on a GPU, memory against naive on a CPU.

    .venv/bin/python benchmarks/bench_flash_attention.py            # from the repository root
    .venv/bin/python benchmarks/bench_flash_attention.py --quick    # fewer lengths (a smoke test)
    .venv/bin/python benchmarks/bench_flash_attention.py --device cpu --out /tmp/x.json

On a CUDA GPU (the default when one is present) it times, with
``triton.testing.do_bench``, the forward, the backward and forward + backward
of three implementations in bfloat16, causal and not, head dims 64 and 128,
T = 512 ... 16K with batch x heads chosen so the tokens per call stay at 16K
x 2048 / head_dim (batch = 16K / T, heads = 2048 / head_dim):

* ``flash_attention_triton`` (``llmbook.kernels.flash_triton``, autotuned);
* ``F.scaled_dot_product_attention`` restricted to its FlashAttention backend
  (``torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)``);
* naive eager attention (``llmbook.attention.scaled_dot_product_attention``,
  the T x T scores in float32), skipped where its matrices would not fit.

Targets from issue 11: the Triton forward >= 1.0x SDPA-flash's speed at
T >= 4K, head dim 64, causal, and forward + backward >= 0.8x. Results go to
benchmarks/results/flash_attention.json.

Without a GPU it measures what a CPU can show: the peak memory
(``llmbook.kernels.memory.peak_memory``) and the time of forward + backward of
naive attention against the tiled ``flash_attention_torch``, causal, float32,
batch 1, one head, head dim 64, T = 1K ... 16K. Target: at T = 16K the tiled
version's peak <= 1/10 of naive's. It also checks the Triton kernels for
correctness under Triton's interpreter at a small shape (the interpreter says
nothing about speed). Results go to benchmarks/results/flash_attention_cpu.json.

The script exits with status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from llmbook.attention import attention_with_lse, causal_mask, scaled_dot_product_attention
from llmbook.kernels.flash_torch import flash_attention_torch
from llmbook.kernels.memory import peak_memory
from llmbook.notebook import machine_summary

ROOT = Path(__file__).resolve().parent.parent
RESULTS_GPU = ROOT / "benchmarks" / "results" / "flash_attention.json"
RESULTS_CPU = ROOT / "benchmarks" / "results" / "flash_attention_cpu.json"
FWD_TARGET = 1.0  # Triton forward at least as fast as SDPA-flash (T >= 4K, head dim 64, causal)
FWD_BWD_TARGET = 0.8  # forward + backward at least 0.8x SDPA-flash's speed there
TARGET_MIN_T, TARGET_HEAD_DIM = 4096, 64
MEMORY_TARGET = 0.1  # tiled peak <= 1/10 of naive's at T = 16K (CPU)
MODES = ("fwd", "bwd", "fwd+bwd")


def naive_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """Chapter 4's attention: the whole T x T score matrix, softmax, then the values."""
    return scaled_dot_product_attention(q, k, v, is_causal=causal)


def attention_flops(B: int, H: int, T: int, D: int, causal: bool, mode: str) -> float:
    """Matmul FLOPs: forward 2 matmuls of 2·T·T·D each per head; backward 2.5x that (5 matmuls); causal half."""
    fwd = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def versions() -> dict[str, str]:
    import triton

    return {**machine_summary(), "platform": platform.platform(), "triton": triton.__version__}


# --- GPU: speed -----------------------------------------------------------------------------------------------------
def _gpu_time_ms(attn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, dout: Tensor, causal: bool,
                 mode: str) -> float:
    """Mean milliseconds of one forward, backward, or both, by ``triton.testing.do_bench``."""
    from triton.testing import do_bench

    if mode == "fwd":
        with torch.no_grad():
            return do_bench(lambda: attn(q, k, v, causal))
    if mode == "bwd":
        out = attn(q, k, v, causal)
        return do_bench(lambda: out.backward(dout, retain_graph=True), grad_to_none=[q, k, v])
    return do_bench(lambda: attn(q, k, v, causal).backward(dout), grad_to_none=[q, k, v])


def _naive_fits(B: int, H: int, T: int) -> bool:
    """Naive fwd + bwd keeps about six float32 T x T matrices per head alive; leave a margin."""
    free, _ = torch.cuda.mem_get_info()
    return 6 * B * H * T * T * 4 < 0.8 * free


def gpu_benchmark(quick: bool) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llmbook.kernels.flash_triton import flash_attention_triton

    def sdpa_flash(q, k, v, causal):  # T_q == T_k here, so SDPA's top-left causal equals ours
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    contenders = {"triton": flash_attention_triton, "sdpa_flash": sdpa_flash, "naive": naive_attention}
    lengths = [1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    rows = []
    cases = [(D, causal, T) for D in (64, 128) for causal in (True, False) for T in lengths]
    for D, causal, T in tqdm(cases, desc="GPU shapes"):
        B, H = max(1, 16384 // T), 2048 // D
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                         for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        with torch.no_grad():  # correctness first: the kernels have never run on this GPU before
            err = (flash_attention_triton(q, k, v, causal).float() - sdpa_flash(q, k, v, causal).float()).abs().max()
        flash_attention_triton(q, k, v, causal).backward(dout)  # autotune the backward kernels outside the timing
        for t in (q, k, v):
            t.grad = None
        for mode in MODES:
            row = {"head_dim": D, "causal": causal, "T": T, "batch": B, "heads": H, "mode": mode,
                   "max_abs_err_vs_sdpa": round(err.item(), 5)}
            for name, attn in contenders.items():
                if name == "naive" and not _naive_fits(B, H, T):
                    row[f"{name}_ms"] = None
                    continue
                try:
                    row[f"{name}_ms"] = round(_gpu_time_ms(attn, q, k, v, dout, causal, mode), 4)
                except torch.OutOfMemoryError:
                    row[f"{name}_ms"] = None
                torch.cuda.empty_cache()
            row["speed_vs_sdpa_flash"] = round(row["sdpa_flash_ms"] / row["triton_ms"], 3)
            row["triton_tflops"] = round(attention_flops(B, H, T, D, causal, mode) / row["triton_ms"] / 1e9, 1)
            rows.append(row)
        del q, k, v, dout
        torch.cuda.empty_cache()

    def target(mode: str, at_least: float) -> dict:
        cells = [r for r in rows if r["mode"] == mode and r["causal"] and r["head_dim"] == TARGET_HEAD_DIM
                 and r["T"] >= TARGET_MIN_T]
        worst = min((r["speed_vs_sdpa_flash"] for r in cells), default=None)
        return {"speed_vs_sdpa_flash_at_least": at_least, "worst": worst,
                "met": worst is not None and worst >= at_least}

    targets = {"fwd": target("fwd", FWD_TARGET), "fwd+bwd": target("fwd+bwd", FWD_BWD_TARGET),
               "where": f"T >= {TARGET_MIN_T}, head dim {TARGET_HEAD_DIM}, causal, bfloat16"}
    return {"gpu": torch.cuda.get_device_name(0), "dtype": "bfloat16", "rows": rows, "targets": targets}


def print_gpu(result: dict) -> bool:
    print(f"\n{result['gpu']}, bfloat16; speed = SDPA-flash ms / Triton ms (> 1: Triton is faster)")
    print(f"{'D':>4} {'causal':>6} {'T':>6} {'B x H':>8} {'mode':>8} {'triton ms':>10} {'sdpa ms':>9} "
          f"{'naive ms':>9} {'speed':>6} {'TFLOP/s':>8}")
    for r in result["rows"]:
        naive = f"{r['naive_ms']:9.3f}" if r["naive_ms"] is not None else f"{'-':>9}"
        print(f"{r['head_dim']:>4} {r['causal']!s:>6} {r['T']:>6} {r['batch']:>3} x {r['heads']:<3} {r['mode']:>8} "
              f"{r['triton_ms']:10.3f} {r['sdpa_flash_ms']:9.3f} {naive} {r['speed_vs_sdpa_flash']:6.2f} "
              f"{r['triton_tflops']:8.1f}")
    met = True
    for mode in ("fwd", "fwd+bwd"):
        t = result["targets"][mode]
        met = met and t["met"]
        print(f"target {mode} >= {t['speed_vs_sdpa_flash_at_least']}x SDPA-flash ({result['targets']['where']}): "
              f"worst {t['worst']}x, {'met' if t['met'] else 'NOT met'}")
    return met


# --- CPU: memory, and correctness under the interpreter --------------------------------------------------------------
def _fwd_bwd(attn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, dout: Tensor) -> None:
    attn(q, k, v, True).backward(dout)


def _clear_grads(*tensors: Tensor) -> None:
    """Before a measurement, not inside it: freeing old grads inside would count as negative memory."""
    for t in tensors:
        t.grad = None


def cpu_memory(lengths: list[int], heads: int = 1, head_dim: int = 64, rounds: int = 3) -> list[dict]:
    """Peak bytes and seconds of causal forward + backward, naive against tiled, float32, batch 1."""
    tiled = flash_attention_torch
    rows = []
    for T in tqdm(lengths, desc="CPU lengths"):
        gen = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(1, heads, T, head_dim, generator=gen) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        _clear_grads(q, k, v)
        _, naive_peak = peak_memory(_fwd_bwd, naive_attention, q, k, v, dout)
        _clear_grads(q, k, v)
        _, tiled_peak = peak_memory(_fwd_bwd, tiled, q, k, v, dout)
        times: dict[str, list[float]] = {"naive": [], "tiled": []}
        for _ in range(rounds if T <= 4096 else 1):  # interleaved, so a busy machine slows both alike
            for name, attn in (("naive", naive_attention), ("tiled", tiled)):
                _clear_grads(q, k, v)
                start = time.perf_counter()
                _fwd_bwd(attn, q, k, v, dout)
                times[name].append(time.perf_counter() - start)
        rows.append({
            "T": T, "naive_peak_bytes": naive_peak, "tiled_peak_bytes": tiled_peak,
            "tiled_over_naive": round(tiled_peak / naive_peak, 4),
            "one_score_matrix_bytes": heads * T * T * 4,  # a single float32 T x T matrix, for scale
            "naive_s": round(statistics.median(times["naive"]), 3),
            "tiled_s": round(statistics.median(times["tiled"]), 3),
        })
    return rows


def interpreter_check() -> dict:
    """The Triton kernels (interpreted on CPU, or compiled when a GPU is there) against PyTorch at a small shape."""
    from llmbook.kernels import flash_triton as ft

    device = "cpu" if ft.INTERPRET else "cuda"
    B, H, H_kv, T, D = 1, 4, 2, 64, 32
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=gen).to(device).requires_grad_()
    k, v = (torch.randn(B, H_kv, T, D, generator=gen).to(device).requires_grad_() for _ in range(2))
    dout = torch.randn(B, H, T, D, generator=gen).to(device)
    errors = {}
    start = time.perf_counter()
    out, lse = ft.flash_forward_triton(q.detach(), k.detach(), v.detach(), causal=True)
    grads = torch.autograd.grad(ft.flash_attention_triton(q, k, v, causal=True), (q, k, v), dout)
    seconds = time.perf_counter() - start
    ref_out, ref_lse = attention_with_lse(q.detach(), k.detach(), v.detach(), is_causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, T, device), enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    errors = {"out": (out - ref_out).abs().max().item(), "lse": (lse - ref_lse).abs().max().item(),
              **{f"d{n}": (g - r).abs().max().item() for n, g, r in zip("qkv", grads, ref_grads, strict=True)}}
    return {"mode": "interpreter" if ft.INTERPRET else "compiled", "shape": {"B": B, "H": H, "H_kv": H_kv, "T": T,
            "D": D, "causal": True}, "seconds": round(seconds, 2),
            "max_abs_err": {n: float(f"{e:.3g}") for n, e in errors.items()},
            "passed": all(e < 1e-4 for e in errors.values())}


def print_cpu(result: dict) -> bool:
    mb = 1 / 2**20
    print(f"\nCausal forward + backward, float32, batch 1, {result['heads']} head(s), head dim {result['head_dim']}, "
          "peak memory above the inputs (torch.profiler):")
    print(f"{'T':>6} {'naive MiB':>10} {'tiled MiB':>10} {'tiled/naive':>12} {'naive s':>8} {'tiled s':>8}")
    for r in result["rows"]:
        print(f"{r['T']:>6} {r['naive_peak_bytes'] * mb:10.1f} {r['tiled_peak_bytes'] * mb:10.1f} "
              f"{r['tiled_over_naive']:12.4f} {r['naive_s']:8.2f} {r['tiled_s']:8.2f}")
    check = result["triton_check"]
    print(f"Triton kernels ({check['mode']}) vs PyTorch at {check['shape']}: max abs errors {check['max_abs_err']} "
          f"({check['seconds']} s): {'passed' if check['passed'] else 'FAILED'}")
    t = result["target"]
    if t["ratio_at_16k"] is None:
        print("memory target (tiled <= 1/10 of naive at T = 16K): not measured (no T = 16K run)")
        return check["passed"]
    print(f"memory target: tiled/naive at T = 16K is {t['ratio_at_16k']:.4f} (1/{1 / t['ratio_at_16k']:.0f}); "
          f"goal <= {MEMORY_TARGET}: {'met' if t['met'] else 'NOT met'}")
    return t["met"] and check["passed"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer lengths: a smoke test, no 16K target")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="cuda: speed against SDPA-flash; cpu: memory against naive (default: cuda if present)")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: benchmarks/results/...)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in CPU mode (default 1: on a busy machine OpenMP threads that wait for "
                             "a core made the tiled loop's many small ops 10-60x slower; memory is unaffected)")
    args = parser.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu (memory and interpreter checks)", file=sys.stderr)
        return 2

    start = time.perf_counter()
    if device == "cpu":
        torch.set_num_threads(args.threads)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    result: dict = {"date": now, "machine": versions(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    if device == "cuda":
        result.update(gpu_benchmark(args.quick))
        met = print_gpu(result)
        out = args.out or RESULTS_GPU
    else:
        lengths = [1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
        heads, head_dim = 1, 64
        rows = cpu_memory(lengths, heads, head_dim)
        at_16k = next((r["tiled_over_naive"] for r in rows if r["T"] == 16384), None)
        result.update({"dtype": "float32", "causal": True, "batch": 1, "heads": heads, "head_dim": head_dim,
                       "rows": rows, "triton_check": interpreter_check(),
                       "target": {"tiled_over_naive_at_most": MEMORY_TARGET, "ratio_at_16k": at_16k,
                                  "met": at_16k is not None and at_16k <= MEMORY_TARGET}})
        met = print_cpu(result)
        out = args.out or RESULTS_CPU
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"done: {len(result['rows'])} measurements on {device} in {time.perf_counter() - start:.0f} s, written to "
          f"{out}; targets {'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
