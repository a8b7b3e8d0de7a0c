"""Checks for Chapter 1's exercises: parameters, training time, memory, compute-optimal size.

Every expected value comes from ``llmbook.planning``, so a check and the
chapter can never disagree. When an answer is wrong, the check tries to name
the usual mistake (a forgotten embedding, seconds instead of days, ...).
"""

from __future__ import annotations

from llmbook import planning
from llmbook.exercises import exercise, expect_close

SECONDS_PER_DAY = 86400


def _gpt2_shapes() -> list[planning.ModelShape]:
    """A toy shape with small, distinct numbers first, then real GPT-2 shapes."""
    toy = planning.ModelShape("toy", vocab_size=10, context_length=8, d_model=4, n_layers=1, n_heads=1)
    names = ["laptop-gpt", "gpt2-124M", "gpt2-355M", "gpt2-1.5B"]  # GPT-2 style: biases, tied head
    return [toy] + [planning.PRESETS[name] for name in names]


def _gpt2_hint(shape: planning.ModelShape, got: float, expected: int) -> str:
    """Explain the difference between a wrong GPT-2 count and the right one."""
    d, L, V, T = shape.d_model, shape.n_layers, shape.vocab_size, shape.context_length
    diff = got - expected
    known = {
        V * d: "you counted an output head of vocab_size x d_model; GPT-2 ties it to the "
               "token embedding, so that matrix is counted once",
        -V * d: "the token embedding (vocab_size x d_model) is missing",
        -T * d: "the learned position embedding (context_length x d_model) is missing",
        -2 * d: "the final LayerNorm (a scale and a shift, 2·d_model) is missing",
        -13 * d * L: "each block's biases and LayerNorms (13·d_model per block) are missing",
        -4 * d * L: "each block's two LayerNorms (4·d_model per block) are missing",
        -9 * d * L: "each block's biases (9·d_model per block: 4d in attention, 5d in the MLP) "
                    "are missing",
        -(4 * d * d + 4 * d) * L: "the attention projections are missing (4·d² + 4·d per block)",
        -(8 * d * d + 5 * d) * L: "the MLP is missing (8·d² + 5·d per block)",
    }
    hint = known.get(diff, "per block 12·d² + 13·d, plus vocab·d + context·d + 2·d for the "
                           "embeddings and the final LayerNorm")
    return (f"{shape.name} (vocab_size={V}, context_length={T}, d_model={d}, n_layers={L}): "
            f"got {got:,}, expected {expected:,} (off by {diff:+,}); {hint}")


@exercise("1.1", solution="gpt2_params")
def check_gpt2_params(gpt2_params):
    for shape in _gpt2_shapes():
        expected = planning.count_params(shape).total
        got = gpt2_params(shape.vocab_size, shape.context_length, shape.d_model, shape.n_layers)
        if got is None:
            raise AssertionError("gpt2_params returned None; did you forget `return`?")
        if got != expected:
            raise AssertionError(_gpt2_hint(shape, got, expected))


def _ratio_hint(ratio: float, hints: dict[float, str]) -> str:
    for factor, hint in hints.items():
        if abs(ratio - factor) <= 1e-6 * factor:
            return f" ({hint})"
    return ""


@exercise("1.2", solution="training_days")
def check_training_days(training_days):
    h100 = planning.HARDWARE["H100 SXM"].peak_flops
    a100 = planning.HARDWARE["A100 80GB"].peak_flops
    gpt2 = planning.count_params(planning.PRESETS["gpt2-124M"]).total
    cases = [  # (what, n_params, n_tokens, n_gpus, peak_flops, mfu)
        ("7B on 2T tokens, 1024 H100s at 40% MFU", 7e9, 2e12, 1024, h100, 0.4),
        ("GPT-2 124M, compute-optimal, one A100 at 30% MFU",
         gpt2, planning.compute_optimal_tokens(gpt2), 1, a100, 0.3),
        ("1.1B on 3T tokens, 16 A100s at 50% MFU", 1.1e9, 3e12, 16, a100, 0.5),
    ]
    for what, n, d, gpus, peak, mfu in cases:
        expected = planning.training_time(planning.training_flops(n, d), peak, mfu, gpus)
        expected /= SECONDS_PER_DAY
        got = training_days(n, d, gpus, peak, mfu)
        if got is None:
            raise AssertionError("training_days returned None; did you forget `return`?")
        ratio = got / expected
        hint = _ratio_hint(ratio, {
            SECONDS_PER_DAY: "that is seconds; divide by 86,400 for days",
            24.0: "that is hours; divide by 24 for days",
            1 / 3: "2 FLOPs per parameter per token is the forward pass only; training is 6",
            1 / 6: "training costs 6 FLOPs per parameter per token: 2 forward, 4 backward",
            mfu * mfu: "multiply the peak by mfu: the run achieves only that fraction",
            1 / (mfu * mfu): "multiply the peak by mfu: the run achieves only that fraction",
            float(gpus * gpus): "divide by the number of GPUs: they share the work",
        })
        expect_close(got, expected, what + hint)


@exercise("1.3", solution="adamw_memory_bytes")
def check_adamw_memory_bytes(adamw_memory_bytes):
    hints = {
        "fp32": "fp32: 4 (weights) + 4 (grads) + 4 + 4 (AdamW m and v) bytes per parameter",
        "autocast": "autocast: the weights and grads stay fp32 (4 + 4), plus fp32 m and v (4 + 4); "
                    "the bf16 copies are made on the fly",
        "mixed": "mixed: 2 (bf16 weights) + 2 (bf16 grads) + 8 (fp32 m, v) "
                 "+ 4 (fp32 master weights) bytes per parameter",
        "bf16": "bf16: 2 (weights) + 2 (grads) + 2 + 2 (AdamW m and v) bytes per parameter",
    }
    sizes = [1, 124_439_808, planning.count_params(planning.PRESETS["llama2-7B"]).total]
    for precision, hint in hints.items():
        for n in sizes:
            expected = planning.training_memory(n, precision).states
            got = adamw_memory_bytes(n, precision)
            expect_close(got, expected, f"n_params={n:,} in {precision} ({hint})")


@exercise("1.7", solution="compute_optimal")
def check_compute_optimal(compute_optimal):
    for budget in [1e18, 5.76e23, planning.training_flops(7e9, 140e9)]:
        answer = compute_optimal(budget)
        if not isinstance(answer, tuple | list) or len(answer) != 2:
            raise AssertionError(
                f"compute_optimal({budget:.3g}) should return a pair (n_params, n_tokens), "
                f"got {answer!r}"
            )
        n, d = answer
        n_expected = planning.compute_optimal_params(budget)
        d_expected = planning.compute_optimal_tokens(n_expected)
        if n is not None and d is not None and abs(n - d_expected) <= 1e-6 * d_expected:
            raise AssertionError("the pair looks swapped: return (n_params, n_tokens)")
        expect_close(n, n_expected, f"parameters for a budget of {budget:.3g} FLOPs "
                                    "(solve C = 6·N·(20·N) for N)")
        expect_close(d, d_expected, f"tokens for a budget of {budget:.3g} FLOPs (20 per parameter)")


PLAN_KEYS = ("params", "flops_per_token", "states", "activations", "total")


def _plan_cases() -> list[tuple[planning.ModelShape, int, int, str]]:
    """(shape, batch_size, seq_len, precision) for GPT-2-style shapes: toys with distinct numbers first."""
    toy_gpt = planning.ModelShape("toy-gpt", vocab_size=10, context_length=8, d_model=4, n_layers=1,
                                  n_heads=2)
    toy_nobias = planning.ModelShape("toy-gpt-nobias", vocab_size=12, context_length=16, d_model=8,
                                     n_layers=2, n_heads=4, bias=False)
    S = planning.PRESETS
    return [
        (toy_gpt, 2, 8, "fp32"),
        (toy_nobias, 3, 5, "bf16"),
        (S["nanogpt-char-cpu"], 4, 32, "autocast"),  # LayerNorm without bias; seq_len < context
        (S["gpt2-124M"], 8, 1024, "mixed"),
        (S["laptop-gpt"], 2, 128, "bf16"),
        (S["gpt2-1.5B"], 1, 1024, "autocast"),
    ]


def _params_hint(shape: planning.ModelShape, diff: int) -> str:
    d, L, V, T = shape.d_model, shape.n_layers, shape.vocab_size, shape.context_length
    one_norm = 2 * d if shape.bias else d
    known: dict[int, str] = {
        V * d: "the output head is tied to the token embedding: count that matrix once",
        -V * d: "the token embedding (vocab_size x d_model) is missing",
        -T * d: "the learned position table (context_length x d_model) is missing",
        -one_norm: "the final LayerNorm is missing",
        -2 * L * one_norm: "the two LayerNorms of each block are missing",
    }
    if shape.bias:
        known.setdefault(-L * 9 * d, "each block's biases (9·d_model: 4d in attention, 5d in the MLP) are missing")
        known.setdefault(-(2 * L + 1) * d, "a LayerNorm with bias=True has a shift too: 2·d_model parameters")
    else:
        known.setdefault((2 * L + 1) * d, "with bias=False a LayerNorm has a scale only: d_model parameters, "
                                          "not 2·d_model")
        known.setdefault(L * 9 * d, "bias=False: the shape's matrices have no biases")
        known.setdefault(L * 11 * d + d, "bias=False: no biases and no LayerNorm shifts")
    return known.get(diff, "attention 4·d², MLP 8·d², biases and LayerNorm shifts when bias=True, "
                           "embeddings, learned positions and a final LayerNorm")


def _flops_hint(shape: planning.ModelShape, seq_len: int, got: float, expected: float, params: int):
    d, L, V = shape.d_model, shape.n_layers, shape.vocab_size
    diff = got - expected
    candidates = [
        (-3 * 4 * L * seq_len * d, "the attention term 4·L·T·d per token (forward) is missing"),
        (12 * L * d * (shape.context_length - seq_len),
         "attention meets seq_len keys, not context_length"),
        (-12 * L * d * (seq_len - (seq_len + 1) / 2),
         "count every query meeting all T keys (no causal halving)"),
        (6 * params - expected, "6·N is the approximation; count the matmul weights: no embedding lookup "
                                "tables, but the output head (V·d) even when tied"),
        (-6 * V * d, "the output head is a matmul of V·d weights per token, even when it is tied"),
    ]
    if shape.positions == "learned":
        candidates.append((6 * shape.context_length * d, "the position table is a lookup, not a matmul"))
    for amount, hint in candidates:
        if amount and abs(diff - amount) <= 1e-9 * abs(expected):
            return hint
    ratio = got / expected if expected else 0.0
    return _ratio_hint(ratio, {1 / 3: "that is the forward pass; training is 3 x forward"}).strip(" ()")


@exercise("1.8", solution="plan_training")
def check_plan_training(plan_training):
    for shape, batch, seq, precision in _plan_cases():
        where = f"{shape.name}, batch_size={batch}, seq_len={seq}, precision={precision!r}"
        got = plan_training(shape, batch, seq, precision)
        if got is None:
            raise AssertionError("plan_training returned None; did you forget `return`?")
        if not hasattr(got, "keys") or not all(k in got for k in PLAN_KEYS):
            raise AssertionError(f"plan_training should return a dict with the keys {PLAN_KEYS}, "
                                 f"got {got!r}")
        n = planning.count_params(shape).total
        if got["params"] != n:
            diff = got["params"] - n
            raise AssertionError(f"{where}: params got {got['params']:,}, expected {n:,} "
                                 f"(off by {diff:+,}); {_params_hint(shape, diff)}")
        flops = planning.flops_per_token(shape, seq_len=seq)
        if abs(got["flops_per_token"] - flops) > 1e-9 * flops:
            hint = _flops_hint(shape, seq, got["flops_per_token"], flops, n)
            raise AssertionError(f"{where}: flops_per_token got {got['flops_per_token']!r}, expected "
                                 f"{flops!r}" + (f" ({hint})" if hint else ""))
        states = planning.training_memory(n, precision).states
        per_param = planning.PRECISIONS[precision].total
        expect_close(got["states"], states, f"{where}: states, the bytes of weights, grads, AdamW "
                                            f"moments and any master copy ({per_param} per parameter)")
        acts = planning.activation_memory(shape, batch, seq)
        L, H, V = shape.n_layers, shape.n_heads, shape.vocab_size
        tokens = batch * seq
        hint = next((h for amount, h in [
            (-tokens * 4 * V, "the fp32 logits, 4·V bytes per token, are missing"),
            (-tokens * L * 5 * H * seq, "the attention scores, 5·H·T bytes per layer and token, are "
                                        "missing (only FlashAttention drops them)"),
            (acts, "the counts 34·d + 5·H·T are already bytes (16-bit): do not double them"),
            (tokens * L * 5 * H * (shape.context_length - seq),
             "the scores are T x T with T = seq_len, not context_length"),
        ] if amount and abs(got["activations"] - acts - amount) <= 1e-9 * acts), "")
        expect_close(got["activations"], acts, f"{where}: activations (Korthikanti et al.: "
                                               f"34·d + 5·H·T bytes per layer and token, plus 4·V per "
                                               f"token for the logits)" + (f"; {hint}" if hint else ""))
        expect_close(got["total"], states + acts, f"{where}: total = states + activations")
