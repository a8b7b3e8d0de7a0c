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
