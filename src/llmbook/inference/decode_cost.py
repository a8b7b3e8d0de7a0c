"""The cost of decoding: why generating one token at a time is limited by memory, not arithmetic.

Generation has two phases. **Prefill** runs the prompt's T tokens through the
model in one forward pass: every weight matrix is read once and multiplied by
T rows, so each byte of weights feeds 2·T FLOPs and the pass is compute bound.
**Decode** then produces one token per step: with the KV cache of Chapter 4 a
step feeds the model a single token, so every weight is read from memory to do
just 2 FLOPs (one multiply-add) with it. At batch size 1 that is an arithmetic
intensity of 0.5 FLOP per float32 byte, far left of any machine's ridge point
(Chapter 6's roofline): the step waits for memory. Hence the decoding roofline

    tokens/s  ≤  bandwidth / bytes read per step  × batch

where a step reads the weights once plus the K and V of every cached position
of every sequence in the batch. A batch of B sequences shares one read of the
weights, which is why serving batches requests (``scheduler``) and why smaller
weights decode faster (``quantize``). The compute roof, measured matmul FLOP/s
divided by the step's FLOPs, only binds for large batches, long contexts or
decoding without the cache.

**Without the cache** a step recomputes the keys and values of the whole prefix:
a forward over all ``context_len`` tokens, which reads the weights once (as
prefill does) but does ``context_len`` times the FLOPs, plus the full
``context_len x context_len`` attention scores. It is compute bound and gets
slower with every token; the outputs are identical (tests/test_decode_cost.py).

On a CPU the small models do not reach either roof: each step also pays a fixed
cost per operation (Python, the dispatcher, a kernel launch per layer, tens of
microseconds each), the same for a model of 1M parameters as for 100M.
``roofline_points`` measures several sizes and ``fit_overhead`` fits that cost
from the points: ``measured ≈ per_layer · n_layers + slowdown × predicted``
(or a fixed cost per step instead of one per layer).
A model whose weights fit in the CPU's caches can also beat the DRAM roof.

Measure on an idle machine. On a busy one every number drops, and a CPU
shared by more processes than it has cores is worse still with several torch
threads: each small kernel waits for all its threads, and a thread that was
descheduled makes a 1M-parameter model's step 20x slower (measured: 137 ms
with 2 threads vs 7 ms with 1, on 2 cores running 8 jobs).
``torch.set_num_threads(1)`` before measuring on a shared machine.
Decoding in bfloat16 halves the bytes but, on a CPU without fast bf16 matrix-vector
kernels, is not faster (measured: slower, 0.3 of its roof).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from llmbook.kernels import roofline
from llmbook.model import GPT, ModelConfig

# (name, d_model, n_layers) of roofline_points' default sweep, with vocab 4096: 1.3M, 10.5M, 40M, 102M parameters;
# the largest holds 409 MB of float32 weights, more than this machine's L3 cache (260 MiB), so it decodes from DRAM.
# Sized so that the default sweep fits in 40 s on 2 idle cores (44 s measured on 2 cores shared by 8 jobs).
DEFAULT_SIZES: tuple[tuple[str, int, int], ...] = (
    ("1M", 128, 4),
    ("10M", 256, 12),
    ("40M", 512, 12),
    ("100M", 768, 14),
)
# a longer sweep for benchmarks/bench_inference.py: adds 350M parameters (1.4 GB of float32), a minute or more
BENCH_SIZES: tuple[tuple[str, int, int], ...] = (*DEFAULT_SIZES, ("200M", 1024, 16), ("350M", 1024, 28))
BANDWIDTH_BYTES = 1 << 29  # 512 MiB per buffer for the bandwidth copy: twice the L3 cache, so it measures DRAM


def _check_context(model: GPT, context_len: int) -> None:
    if not 1 <= context_len <= model.cfg.context_length:
        raise ValueError(f"context_len must be in 1..{model.cfg.context_length} (the model's context), "
                         f"got {context_len}")


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters, a tied matrix counted once: what the model holds in memory."""
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() yields a shared one once


def step_weight_bytes(model: GPT, batch_size: int = 1) -> int:
    """Bytes of weights one decode step reads: every matrix once, but of an embedding table only the rows used.

    The token and position tables are looked up, not multiplied: a step reads
    one row per sequence. A token table tied to the output head (GPT-2) is read
    in full all the same, by the head's matmul.
    """
    total = weight_bytes(model)
    tables = []
    if not model.cfg.tied_embeddings:
        tables.append(model.tok_emb.weight)
    if model.cfg.positions == "learned":
        tables.append(model.pos_emb.weight)
    for w in tables:
        total -= w.numel() * w.element_size()  # the whole table ...
        total += batch_size * w.shape[1] * w.element_size()  # ... replaced by one row per sequence
    return total


def kv_bytes_per_token(model: GPT, dtype: torch.dtype | None = None) -> int:
    """Bytes of K and V one token adds to the cache: 2 · layers · kv heads · head_dim · bytes per value.

    ``dtype`` defaults to the model's (``new_caches`` allocates the cache in the weights' dtype).
    """
    cfg = model.cfg
    dtype = _param_dtype(model) if dtype is None else dtype
    return 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def decode_bytes_per_token(model: GPT, context_len: int, use_cache: bool = True) -> int:
    """Bytes one decoding step of one sequence reads from memory, attending to ``context_len`` positions.

    With the cache: the weights once (``step_weight_bytes``) plus the K and V of
    all ``context_len`` positions (the new token's written, then read with the
    rest). Without: the weights once (the forward over the ``context_len``
    tokens multiplies each matrix by all their rows), no cache, but each layer
    writes and reads the ``context_len x context_len`` attention scores of the
    manual attention (``roofline.naive_attention_traffic``). Left out as small:
    the activations of the new token (and, without the cache, the
    ``context_len x d_model`` ones) and the logits.
    """
    _check_context(model, context_len)
    cfg = model.cfg
    weights = step_weight_bytes(model)
    if use_cache:
        return weights + kv_bytes_per_token(model) * context_len
    size = torch.empty((), dtype=_param_dtype(model)).element_size()
    attention = roofline.total(roofline.naive_attention_traffic(1, cfg.n_heads, context_len, cfg.head_dim, size))
    return weights + cfg.n_layers * int(attention.bytes)


def matmul_weights(model: nn.Module) -> int:
    """Entries of every ``nn.Linear`` weight, the output head included (tied or not): 2 FLOPs each per token."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def decode_flops_per_token(model: GPT, context_len: int, use_cache: bool = True) -> int:
    """FLOPs of one decoding step of one sequence attending to ``context_len`` positions.

    With the cache: 2 per matmul weight, plus attention's ``q·k`` and ``p·v``
    over the cached positions, 4 · d_model · context_len per layer (the
    query heads span d_model). Without: the forward over all ``context_len``
    tokens, ``context_len`` times the matmuls plus the whole
    ``context_len x context_len`` attention (the manual kernel computes the
    masked half too) and its softmax, 5 FLOPs per score.
    """
    _check_context(model, context_len)
    cfg = model.cfg
    linear = 2 * matmul_weights(model)
    if use_cache:
        return linear + cfg.n_layers * 4 * cfg.n_heads * cfg.head_dim * context_len
    T = context_len
    attention = 4 * cfg.n_heads * cfg.head_dim * T * T + roofline.SOFTMAX_FLOPS_PER_SCORE * cfg.n_heads * T * T
    return T * linear + cfg.n_layers * attention


@dataclass(frozen=True)
class DecodePrediction:
    """The two roofs of decoding for one model, context and batch size, in tokens per second."""

    bytes_per_step: int  # weights once + the K and V of every sequence of the batch
    flops_per_step: int
    memory_bound: float  # bandwidth / bytes_per_step × batch
    compute_bound: float  # flops / flops_per_step × batch; inf when no FLOP/s was given
    batch_size: int

    @property
    def tokens_per_s(self) -> float:
        """The roofline's prediction: the lower of the two roofs."""
        return min(self.memory_bound, self.compute_bound)

    @property
    def bound(self) -> str:
        """Which roof binds: "memory" or "compute"."""
        return "memory" if self.memory_bound <= self.compute_bound else "compute"

    @property
    def step_s(self) -> float:
        """The predicted seconds of one step (one token for every sequence of the batch)."""
        return self.batch_size / self.tokens_per_s


def predicted_tokens_per_s(
    model: GPT, bandwidth: float, context_len: int, batch_size: int = 1, flops: float | None = None,
    use_cache: bool = True,
) -> DecodePrediction:
    """The decoding roofline: tokens/s ≤ bandwidth / bytes read per step × batch, and ≤ FLOP/s / FLOPs per step × batch.

    ``bandwidth`` in bytes/s (``roofline.memory_bandwidth``), ``flops`` in FLOP/s
    (``roofline.matmul_flops``; None leaves the compute roof out). A step of a
    batch of B reads the weights once and the K and V of B sequences.
    """
    if bandwidth <= 0 or (flops is not None and flops <= 0):
        raise ValueError(f"bandwidth and flops must be positive, got {bandwidth} and {flops}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    per_seq = decode_bytes_per_token(model, context_len, use_cache) - step_weight_bytes(model)
    step_bytes = step_weight_bytes(model, batch_size) + batch_size * per_seq
    step_flops = batch_size * decode_flops_per_token(model, context_len, use_cache)
    memory = bandwidth / step_bytes * batch_size
    compute = math.inf if flops is None else flops / step_flops * batch_size
    return DecodePrediction(step_bytes, step_flops, memory, compute, batch_size)


@dataclass(frozen=True)
class DecodeTiming:
    """Measured greedy generation, split into its two phases (medians over repeats)."""

    prefill_s: float  # one forward over the prompt (all rows), which also gives the first new token
    per_token_s: float  # seconds of one decode step (one token for every row)
    prompt_len: int
    new_tokens: int
    batch_size: int
    use_cache: bool
    tokens: list[list[int]] = field(repr=False)  # the new tokens of each row, to check that speed-ups change nothing

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: new tokens per second over the whole batch."""
        return self.batch_size / self.per_token_s

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens processed per second in prefill: many tokens per read of the weights."""
        return self.batch_size * self.prompt_len / self.prefill_s


def _greedy_run(model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool,
                dtype: torch.dtype) -> tuple[float, list[float], list[list[int]]]:
    """One greedy generation: the prefill's seconds, each decode step's seconds and the new tokens ``(B, new)``."""
    B, T0 = prompt.shape
    caches = model.new_caches(B, T0 + new_tokens, dtype=dtype) if use_cache else None
    seq = torch.empty(B, T0 + new_tokens, dtype=torch.long)
    seq[:, :T0] = prompt
    steps = []
    with torch.no_grad():
        start = time.perf_counter()
        logits, _ = model(prompt, caches=caches)  # prefill: (B, T0, V)
        seq[:, T0] = logits[:, -1].argmax(dim=-1)
        prefill = time.perf_counter() - start
        for t in range(T0 + 1, T0 + new_tokens):
            start = time.perf_counter()
            # with the cache: only the newest token; without: the whole sequence so far, recomputed
            idx = seq[:, t - 1 : t] if use_cache else seq[:, :t]
            logits, _ = model(idx, caches=caches)  # (B, 1 or t, V)
            seq[:, t] = logits[:, -1].argmax(dim=-1)
            steps.append(time.perf_counter() - start)
    return prefill, steps, seq[:, T0:].tolist()


def measure_decode(
    model: GPT, prompt_len: int, new_tokens: int, use_cache: bool = True, batch_size: int = 1, repeats: int = 3,
    seed: int = 0, prompt: torch.Tensor | None = None,
) -> DecodeTiming:
    """Time greedy generation of ``new_tokens`` after a random prompt: prefill and decode measured apart.

    Prefill is one forward over the ``(batch_size, prompt_len)`` prompt, which
    yields the first new token; each of the other ``new_tokens - 1`` tokens is
    one decode step, feeding one token with the KV cache or the whole sequence
    without it. One warm-up run, then the median over ``repeats`` runs of the
    prefill time and of the mean step time. Greedy, so every run makes the
    same tokens as ``llmbook.generate.generate(model, prompt, new_tokens, temperature=0)``.
    """
    if prompt_len < 1 or new_tokens < 2 or batch_size < 1 or repeats < 1:
        raise ValueError(
            f"need prompt_len >= 1, new_tokens >= 2 (one from prefill, at least one decode step), batch_size >= 1 "
            f"and repeats >= 1; got {prompt_len}, {new_tokens}, {batch_size}, {repeats}"
        )
    if prompt_len + new_tokens > model.cfg.context_length:
        raise ValueError(
            f"prompt_len + new_tokens = {prompt_len + new_tokens} is more than the model's context_length="
            f"{model.cfg.context_length}; use a shorter prompt or fewer tokens"
        )
    if prompt is None:
        gen = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, model.cfg.vocab_size, (batch_size, prompt_len), generator=gen)
    elif tuple(prompt.shape) != (batch_size, prompt_len):
        raise ValueError(f"prompt must be (batch_size, prompt_len) = {(batch_size, prompt_len)}, "
                         f"got {tuple(prompt.shape)}")
    dtype = _param_dtype(model)
    was_training = model.training
    model.eval()
    try:
        _greedy_run(model, prompt, min(new_tokens, 3), use_cache, dtype)  # warm-up: allocator, threads, caches
        prefills, steps, tokens = [], [], []
        for _ in range(repeats):
            pre, step, tokens = _greedy_run(model, prompt, new_tokens, use_cache, dtype)
            prefills.append(pre)
            steps.append(statistics.fmean(step))
    finally:
        model.train(was_training)
    return DecodeTiming(statistics.median(prefills), statistics.median(steps), prompt_len, new_tokens, batch_size,
                        use_cache, tokens)


def sweep_model(d_model: int, n_layers: int, vocab_size: int = 4096, context_length: int = 256,
                dtype: torch.dtype = torch.float32, seed: int = 0) -> GPT:
    """A random-weight GPT-2 style model of the given width and depth (heads of 64 dims), in eval mode."""
    if d_model % 64:
        raise ValueError(f"d_model must be a multiple of 64 (heads of 64 dims), got {d_model}")
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, context_length=context_length, d_model=d_model, n_layers=n_layers,
                      n_heads=d_model // 64)
    return GPT(cfg).to(dtype).eval()


@dataclass(frozen=True)
class Roofs:
    """This machine's two roofs: DRAM copy bandwidth (bytes/s) and float32 matmul FLOP/s."""

    bandwidth: float
    flops: float


def measure_roofs(nbytes: int = BANDWIDTH_BYTES, repeats: int = 5, matmul_n: int = 1024) -> Roofs:
    """``roofline.memory_bandwidth`` with buffers larger than the L3 cache, and ``roofline.matmul_flops``."""
    return Roofs(roofline.memory_bandwidth(nbytes, repeats), roofline.matmul_flops(matmul_n, repeats))


def roofline_points(
    sizes: tuple[tuple[str, int, int], ...] = DEFAULT_SIZES, context_len: int = 64, new_tokens: int = 8,
    repeats: int = 3, dtype: torch.dtype = torch.float32, roofs: Roofs | None = None, uncached: bool = True,
) -> list[dict]:
    """Predicted vs measured decode tokens/s for random GPTs of several sizes, with and without the KV cache.

    ``sizes``: (name, d_model, n_layers); the defaults span 1.3M to 102M
    parameters (float32); the whole call took 44 s with one thread on 2 cores
    shared by 8 jobs (15 s of it the 100M model without the cache), less on an
    idle machine (``measure_s`` in each point says where the time goes). Each
    model gets a ``context_len``-token prompt and ``new_tokens`` new tokens; the
    prediction uses the mean context of the decode steps. One dict per (size,
    use_cache) with the model's numbers, the prediction, the measurement and
    ``ratio`` = measured / predicted tokens/s (below 1: slower than the roof).
    ``roofs`` defaults to ``measure_roofs()``.
    """
    roofs = measure_roofs() if roofs is None else roofs
    points = []
    for name, d_model, n_layers in sizes:
        model = sweep_model(d_model, n_layers, context_length=context_len + new_tokens, dtype=dtype)
        ctx = context_len + new_tokens // 2  # the mean number of positions a decode step attends to
        for use_cache in (True, False) if uncached else (True,):
            pred = predicted_tokens_per_s(model, roofs.bandwidth, ctx, flops=roofs.flops, use_cache=use_cache)
            start = time.perf_counter()
            timing = measure_decode(model, context_len, new_tokens, use_cache=use_cache, repeats=repeats)
            seconds = time.perf_counter() - start
            # prefill is one forward over the prompt: an uncached step's work, making context_len tokens at once
            prefill = predicted_tokens_per_s(model, roofs.bandwidth, context_len, flops=roofs.flops, use_cache=False)
            points.append({
                "name": name, "d_model": d_model, "n_layers": n_layers, "params": model.num_params(),
                "dtype": str(dtype).removeprefix("torch."), "weight_bytes": weight_bytes(model),
                "use_cache": use_cache, "context_len": ctx, "bytes_per_step": pred.bytes_per_step,
                "flops_per_step": pred.flops_per_step, "memory_bound": pred.memory_bound,
                "compute_bound": pred.compute_bound, "predicted_tokens_per_s": pred.tokens_per_s,
                "bound": pred.bound, "measured_tokens_per_s": timing.tokens_per_s,
                "prefill_tokens_per_s": timing.prefill_tokens_per_s,
                "predicted_prefill_tokens_per_s": prefill.tokens_per_s * context_len, "prefill_bound": prefill.bound,
                "ratio": timing.tokens_per_s / pred.tokens_per_s, "threads": torch.get_num_threads(),
                "measure_s": seconds,
            })
        del model
    return points


def batch_points(
    model: GPT, batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16), context_len: int = 32, new_tokens: int = 6,
    repeats: int = 3, roofs: Roofs | None = None,
) -> list[dict]:
    """Decode tokens/s against batch size, predicted and measured: one read of the weights serves the whole batch.

    The memory roof grows almost linearly with the batch until the K and V of
    all sequences or the compute roof take over. One dict per batch size.
    """
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes must be positive, got {batch_sizes}")
    roofs = measure_roofs() if roofs is None else roofs
    points = []
    for b in batch_sizes:
        pred = predicted_tokens_per_s(model, roofs.bandwidth, context_len + new_tokens // 2, batch_size=b,
                                      flops=roofs.flops)
        timing = measure_decode(model, context_len, new_tokens, batch_size=b, repeats=repeats)
        points.append({"batch_size": b, "predicted_tokens_per_s": pred.tokens_per_s, "bound": pred.bound,
                       "memory_bound": pred.memory_bound, "compute_bound": pred.compute_bound,
                       "measured_tokens_per_s": timing.tokens_per_s, "step_s": timing.per_token_s,
                       "ratio": timing.tokens_per_s / pred.tokens_per_s})
    return points


@dataclass(frozen=True)
class OverheadFit:
    """``measured step s ≈ overhead_s + per_layer_s · n_layers + slowdown · predicted step s``, least squares.

    Two shapes of overhead: ``"fixed"`` (one cost per step, ``per_layer_s`` = 0)
    or ``"per_layer"`` (a cost per block: Python and a dozen kernel launches
    each, ``overhead_s`` = 0). On this CPU the per-layer line fits better.
    """

    overhead_s: float  # a fixed cost of a step whatever the model
    per_layer_s: float  # a cost of each block, whatever its width
    slowdown: float  # how far above the roof the size-dependent part runs (1: exactly at the roof)
    kind: str
    n_points: int

    def step_s(self, predicted_tokens_per_s: float, n_layers: int) -> float:
        """Seconds per step of a model the roofline alone gives ``predicted_tokens_per_s``, overhead added back."""
        return self.overhead_s + self.per_layer_s * n_layers + self.slowdown / predicted_tokens_per_s

    def predict(self, predicted_tokens_per_s: float, n_layers: int) -> float:
        """Tokens/s (batch 1) with the overhead added back to the roofline's prediction."""
        return 1.0 / self.step_s(predicted_tokens_per_s, n_layers)


def fit_overhead(points: list[dict], use_cache: bool = True, kind: str = "per_layer") -> OverheadFit:
    """Fit the overhead of a decode step from ``roofline_points``' points (the cached ones by default), at batch 1.

    ``kind`` "per_layer" fits ``measured = per_layer_s · n_layers + slowdown ·
    predicted``; "fixed" fits ``measured = overhead_s + slowdown · predicted``.
    """
    if kind not in ("per_layer", "fixed"):
        raise ValueError(f"kind must be 'per_layer' or 'fixed', got {kind!r}")
    pts = [p for p in points if p["use_cache"] == use_cache]
    if len(pts) < 2:
        raise ValueError(f"need at least two points with use_cache={use_cache} to fit a line, got {len(pts)}")
    first = [float(p["n_layers"]) if kind == "per_layer" else 1.0 for p in pts]
    predicted = [1.0 / p["predicted_tokens_per_s"] for p in pts]  # the roofline's seconds per step
    A = torch.tensor([first, predicted], dtype=torch.float64).T  # (points, 2)
    y = torch.tensor([1.0 / p["measured_tokens_per_s"] for p in pts], dtype=torch.float64)[:, None]  # measured s
    if torch.linalg.matrix_rank(A) < 2:
        raise ValueError("the points cannot separate overhead from the roofline's time; give models of other sizes")
    c = torch.linalg.lstsq(A, y).solution.flatten().tolist()
    fixed, per_layer = (0.0, c[0]) if kind == "per_layer" else (c[0], 0.0)
    return OverheadFit(fixed, per_layer, c[1], kind, len(pts))


def prefill_vs_decode(model: GPT, prompt_len: int = 64, new_tokens: int = 8, batch_size: int = 1,
                      repeats: int = 3) -> dict:
    """Tokens/s of prefill (many tokens per read of the weights) and of cached decode (one), for the same model."""
    timing = measure_decode(model, prompt_len, new_tokens, use_cache=True, batch_size=batch_size, repeats=repeats)
    return {"prompt_len": prompt_len, "batch_size": batch_size, "prefill_s": timing.prefill_s,
            "prefill_tokens_per_s": timing.prefill_tokens_per_s, "decode_tokens_per_s": timing.tokens_per_s,
            "ratio": timing.prefill_tokens_per_s / timing.tokens_per_s}
