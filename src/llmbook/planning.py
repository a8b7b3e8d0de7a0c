"""What an LLM costs before you train it: parameters, memory, FLOPs, time, tokens.

Everything here is arithmetic on a model's shape, so it runs instantly for a
70B model on a laptop. Chapter 1 uses it to size the book's models; later
chapters check their real models against it (``GPT.num_params()`` must equal
``count_params``). The shapes come from ``llmbook.shapes`` (``PRESETS`` is its
registry), and the symbols in the docstrings follow the book's notation table:
N parameters, D tokens, C FLOPs, d model width, L layers, H heads, T sequence
length, V vocabulary, B batch.

    >>> shape = PRESETS["gpt2-124M"]
    >>> count_params(shape).total
    124439808
    >>> round(training_flops(count_params(shape).total, 2.5e9) / 1e18, 2)  # 6·N·D
    1.87
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

from llmbook.shapes import SHAPES, DerivedSizes, ModelShape, Registry

__all__ = [  # the shapes are re-exported: Chapter 1 meets them here
    "DerivedSizes", "ModelShape", "PRESETS", "Registry", "ParamCount", "count_params", "BytesPerParam",
    "PRECISIONS", "TrainingMemory", "training_memory", "inference_memory", "activation_memory",
    "training_flops", "flops_per_token", "Hardware", "HARDWARE", "training_time", "measure_matmul_flops",
    "TOKENS_PER_PARAM", "TRAINER_PRECISION", "compute_optimal_tokens", "compute_optimal_params", "max_trainable_params",
    "Plan", "plan",
]

PRESETS: Registry[ModelShape] = SHAPES  # one registry of named shapes for the planner, the model and the trainer

# ---------------------------------------------------------------------------
# Model shapes and parameter counts
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCount:
    """Parameters by component; ``total`` is what ``sum(p.numel())`` reports."""

    embedding: int  # token embedding table, vocab_size x d_model
    positions: int  # learned position table (0 with RoPE)
    attention: int  # Q, K, V, output projections of all layers
    mlp: int  # feed-forward matrices of all layers
    norms: int  # every norm's scale (and shift, for LayerNorm with bias)
    lm_head: int  # output projection (0 when tied to the embedding)

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    @property
    def non_embedding(self) -> int:
        """Kaplan et al.'s N: the parameters that do matrix multiplies per token."""
        return self.total - self.embedding - self.positions

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def count_params(shape: ModelShape) -> ParamCount:
    """Count parameters layer by layer, the way the model will allocate them."""
    d, L = shape.d_model, shape.n_layers
    kv_dim = shape.kv_heads * shape.head_dim  # width of K and of V (smaller with GQA)

    # attention: Q and output are d x d; K and V are d x kv_dim
    attn = 2 * d * d + 2 * d * kv_dim
    if shape.bias:
        attn += d + 2 * kv_dim + d

    # MLP: up and down projections; SwiGLU adds a gate matrix
    n_mats = 3 if shape.mlp == "swiglu" else 2
    mlp = n_mats * d * shape.ff_dim
    if shape.bias:
        mlp += (n_mats - 1) * shape.ff_dim + d

    # a LayerNorm with bias has a scale and a shift; RMSNorm only a scale
    one_norm = 2 * d if (shape.norm == "layernorm" and shape.bias) else d

    return ParamCount(
        embedding=shape.vocab_size * d,
        positions=shape.context_length * d if shape.positions == "learned" else 0,
        attention=L * attn,
        mlp=L * mlp,
        norms=(2 * L + 1) * one_norm,  # two per block plus the final norm
        lm_head=0 if shape.tied_embeddings else shape.vocab_size * d,
    )


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BytesPerParam:
    """Bytes each parameter costs during training with AdamW, by role."""

    weights: int  # the weights the forward pass reads
    grads: int
    optimizer: int  # AdamW's two moments, m and v
    master: int = 0  # a separate fp32 copy of the weights, where the weights themselves are 16-bit

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.master


PRECISIONS: dict[str, BytesPerParam] = {
    # everything in fp32: 4 (w) + 4 (g) + 8 (m, v)
    "fp32": BytesPerParam(4, 4, 8),
    # torch.autocast, what the book's trainer does (Chapter 7): the weights and their gradients stay
    # fp32, and each matmul casts its inputs to bf16 on the fly; 4 + 4 + 8 = 16 bytes. The casts
    # (2 bytes per weight, kept by autograd until the backward pass) and the activations come on top.
    "autocast": BytesPerParam(4, 4, 8),
    # the ZeRO paper's convention (Rajbhandari et al. 2020), as in Megatron and DeepSpeed: bf16 weights
    # and gradients, plus an fp32 master copy and fp32 moments: 2 + 2 + 4 + 8 = 16 bytes
    "mixed": BytesPerParam(2, 2, 8, 4),
    # pure bf16, moments included: half of fp32, at some cost in stability
    "bf16": BytesPerParam(2, 2, 4),
}
TRAINER_PRECISION = "autocast"  # the convention of llmbook.train's precision="bf16" (and "fp16")


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes needed to train, by role. Activations depend on batch and sequence."""

    weights: float
    grads: float
    optimizer: float
    master: float
    activations: float = 0.0

    @property
    def states(self) -> float:
        """Everything that scales with the parameter count alone."""
        return self.weights + self.grads + self.optimizer + self.master

    @property
    def total(self) -> float:
        return self.states + self.activations


def _precision(precision: str) -> BytesPerParam:
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(
            f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}"
        ) from None


def training_memory(n_params: float, precision: str = TRAINER_PRECISION, activations: float = 0.0):
    """Memory to train ``n_params`` with AdamW: 16 bytes/param in fp32 and in both mixed-precision conventions.

    ``"autocast"`` (fp32 weights and gradients, bf16 matmuls) and ``"mixed"``
    (bf16 weights and gradients plus an fp32 master copy) cost the same 16
    bytes, split differently between the roles.
    """
    b = _precision(precision)
    return TrainingMemory(
        weights=n_params * b.weights,
        grads=n_params * b.grads,
        optimizer=n_params * b.optimizer,
        master=n_params * b.master,
        activations=activations,
    )


def inference_memory(n_params: float, bytes_per_param: float = 2.0) -> float:
    """Weights only (bf16 by default); the KV cache comes on top (Chapter 4)."""
    return n_params * bytes_per_param


def activation_memory(
    shape: ModelShape,
    batch_size: int,
    seq_len: int | None = None,
    checkpointing: bool = False,
    flash: bool = False,
) -> float:
    """Peak bytes of activations kept for the backward pass, 16-bit, one micro-batch of B x T tokens.

    Per layer and token, Korthikanti et al. (2022) count ``34·d + 5·H·T`` bytes
    for a GPT block (their ``34·h + 5·a·s``, with h the hidden size, a the
    heads and s the sequence length): 34·d for the tensors the matmuls, norms,
    GELU and dropout keep, and 5·H·T for the T x T attention scores, softmax and
    dropout mask of the H heads. FlashAttention never stores the scores (the
    5·H·T term goes). Full activation checkpointing keeps only each block's
    input (2·d bytes) and recomputes the rest during the backward pass, one
    block at a time: while a block is recomputed and differentiated, its full
    activations are alive too, so the peak adds one block's worth. On top: the
    logits in fp32 for the loss, 4·V bytes per token.

        >>> s = ModelShape("toy", vocab_size=10, context_length=8, d_model=4, n_layers=3, n_heads=2)
        >>> activation_memory(s, 1, checkpointing=True, flash=True) / 8  # 3·2·4 + 34·4 + 4·10 per token
        200.0
    """
    T = shape.context_length if seq_len is None else seq_len
    d, H, L = shape.d_model, shape.n_heads, shape.n_layers
    one_layer = 34 * d + (0 if flash else 5 * H * T)  # per token: everything one block keeps
    if checkpointing:
        # every block's input, plus the one block being recomputed during the backward pass
        per_token = L * 2 * d + one_layer
    else:
        per_token = L * one_layer
    tokens = batch_size * T
    return tokens * (per_token + 4 * shape.vocab_size)


# ---------------------------------------------------------------------------
# Compute: FLOPs, hardware, time
# ---------------------------------------------------------------------------


def training_flops(n_params: float, n_tokens: float) -> float:
    """C ≈ 6·N·D: 2 FLOPs per parameter per token forward, 4 backward (attention's own matmuls left out)."""
    return 6.0 * n_params * n_tokens


def flops_per_token(shape: ModelShape, seq_len: int | None = None, training: bool = True,
                    causal: bool = False) -> float:
    """FLOPs per token counted from the shapes, attention's own matmuls included.

    Forward: 2 FLOPs per multiply-add of every matrix a token meets (the
    non-embedding weights and the output head), plus ``4·L·T·d`` for attention
    over a context of T: ``2·L·T·d`` for the scores QKᵀ and as much again for
    the weighted sum of V. Kaplan et al. (2020, Table 1) count only the first,
    ``2·n_layer·n_ctx·d_attn`` per token forward; the PaLM paper's training
    count (Chowdhery et al. 2022, Appendix B) has both, ``12·L·H·Q·T`` = 3 x
    ``4·L·T·d`` with Q·H = d. Training: three times the forward count (the
    backward pass costs twice the forward).

    The count assumes every query meets all T keys, which is what a kernel
    that computes the full T x T scores and then masks them does (ours in
    Chapter 4). A causal kernel that skips the masked half (FlashAttention,
    Chapter 6) meets (T + 1)/2 keys per query on average: ``causal=True``
    counts that, about half the attention term.
    """
    T = shape.context_length if seq_len is None else seq_len
    n = count_params(shape)
    matmul_params = n.non_embedding - n.lm_head + shape.vocab_size * shape.d_model
    keys = (T + 1) / 2 if causal else T  # keys each query meets, on average over the sequence
    forward = 2 * matmul_params + 4 * shape.n_layers * keys * shape.d_model
    return 3 * forward if training else forward


@dataclass(frozen=True)
class Hardware:
    """A device's datasheet peak for dense 16-bit matmuls and its memory."""

    name: str
    peak_flops: float  # FLOP/s, dense bf16/fp16 tensor cores (no sparsity)
    memory: float  # bytes
    note: str = ""


HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in [
        Hardware("H100 SXM", 989e12, 80e9, "NVIDIA datasheet, bf16 dense"),
        Hardware("A100 80GB", 312e12, 80e9, "NVIDIA datasheet, bf16 dense"),
        Hardware("RTX 4090", 165.2e12, 24e9, "NVIDIA datasheet, bf16 dense, fp32 accumulate"),
    ]
}


def training_time(total_flops: float, peak_flops: float, mfu: float = 0.4, n_devices: int = 1):
    """Seconds to spend ``total_flops`` at a model FLOPs utilization ``mfu`` of the peak.

    MFU is the fraction of the datasheet peak a real training run sustains;
    40% is good for large GPU clusters, small models on one GPU often get less.
    """
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu is a fraction of peak in (0, 1], got {mfu}")
    if n_devices < 1:
        raise ValueError(f"n_devices must be at least 1, got {n_devices}")
    return total_flops / (peak_flops * mfu * n_devices)


def measure_matmul_flops(n: int = 1024, repeats: int = 5, dtype=None, device: str = "cpu",
                         clock=time.perf_counter):
    """Measured FLOP/s of an n x n matmul on this machine: the best of ``repeats`` runs.

    The best run, not the mean, estimates what the hardware can do when nothing
    else interferes; 2·n³ FLOPs per matmul. ``clock`` is wall time by default;
    ``time.thread_time`` counts only this thread's CPU time (Chapter 7's MFU).
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm up: first calls pay for allocation and thread start-up
    best = math.inf
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = clock()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, clock() - start)
    return 2 * n**3 / max(best, 1e-9)  # a coarse clock can read 0 for a small matmul


# ---------------------------------------------------------------------------
# Data: compute-optimal tokens
# ---------------------------------------------------------------------------

TOKENS_PER_PARAM = 20  # Chinchilla (Hoffmann et al. 2022): about 20 tokens per parameter


def compute_optimal_tokens(n_params: float) -> float:
    """Tokens that minimize loss for a fixed compute budget at this model size."""
    return TOKENS_PER_PARAM * n_params


def compute_optimal_params(total_flops: float) -> float:
    """The model size a budget of ``total_flops`` should buy: C = 6·N·(20·N)."""
    return math.sqrt(total_flops / (6 * TOKENS_PER_PARAM))


def max_trainable_params(memory_bytes: float, precision: str = TRAINER_PRECISION) -> float:
    """The largest model whose weights, grads and AdamW states fit in ``memory_bytes``."""
    return memory_bytes / _precision(precision).total


# ---------------------------------------------------------------------------
# A whole plan
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The cost of training one model: the table rows of Chapter 1."""

    shape: ModelShape
    params: ParamCount
    tokens: float
    memory: TrainingMemory
    flops: float
    seconds: float
    hardware: Hardware
    mfu: float
    n_devices: int
    precision: str = TRAINER_PRECISION
    extra: dict = field(default_factory=dict)

    @property
    def device_days(self) -> float:
        return self.seconds * self.n_devices / 86400


def plan(
    shape: ModelShape,
    tokens: float | None = None,
    hardware: Hardware | str = "H100 SXM",
    mfu: float = 0.4,
    n_devices: int = 1,
    precision: str = TRAINER_PRECISION,
    batch_size: int = 1,
    checkpointing: bool = False,
) -> Plan:
    """Size a training run; ``tokens`` defaults to the compute-optimal 20 per parameter.

    Activations are for ``batch_size`` sequences of the full context, with
    FlashAttention (no stored scores), optionally with activation checkpointing.
    """
    hw = HARDWARE[hardware] if isinstance(hardware, str) else hardware
    params = count_params(shape)
    n = params.total
    d = compute_optimal_tokens(n) if tokens is None else tokens
    acts = activation_memory(shape, batch_size, checkpointing=checkpointing, flash=True)
    flops = training_flops(n, d)
    return Plan(
        shape=shape,
        params=params,
        tokens=d,
        memory=training_memory(n, precision, activations=acts),
        flops=flops,
        seconds=training_time(flops, hw.peak_flops, mfu, n_devices),
        hardware=hw,
        mfu=mfu,
        n_devices=n_devices,
        precision=precision,
    )
