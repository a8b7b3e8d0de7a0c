"""What an LLM costs before you train it: parameters, memory, FLOPs, time, tokens.

Everything here is arithmetic on a model's shape, so it runs instantly for a
70B model on a laptop. Chapter 1 uses it to size the book's models; later
chapters check their real models against it (``GPT.num_params()`` must equal
``count_params``).

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
from typing import Literal

# ---------------------------------------------------------------------------
# Model shapes and parameter counts
# ---------------------------------------------------------------------------


class DerivedSizes:
    """Sizes that follow from a shape's fields, and the rules they obey; for ModelShape and ModelConfig."""

    vocab_size: int
    context_length: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None
    d_ff: int | None

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ff_dim(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def check_sizes(self, prefix: str = "") -> None:
        """The size rules every shape obeys, checked once for both classes; ``prefix`` names the shape in errors."""
        for attr in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads"):
            if getattr(self, attr) <= 0:
                raise ValueError(f"{prefix}{attr} must be positive, got {getattr(self, attr)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"{prefix}d_model={self.d_model} is not divisible by n_heads={self.n_heads}: every head gets "
                "d_model // n_heads dimensions; choose n_heads that divides d_model"
            )
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ValueError(
                f"{prefix}n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}: each key/value "
                "head serves a whole group of query heads; choose n_kv_heads that divides n_heads"
            )


@dataclass(frozen=True)
class ModelShape(DerivedSizes):
    """The hyperparameters that decide a decoder-only transformer's size.

    GPT-2 style: learned positions, LayerNorm with bias, GELU MLP with
    ``d_ff = 4·d_model``, biases everywhere, input and output embeddings tied.
    Llama style: RoPE (no position parameters), RMSNorm (weight only), SwiGLU
    MLP (three matrices), no biases, untied output head, and optionally fewer
    key/value heads than query heads (grouped-query attention).
    """

    name: str
    vocab_size: int
    context_length: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: one K/V head per query head (plain MHA)
    d_ff: int | None = None  # None: 4 * d_model, GPT-2's choice
    mlp: Literal["gelu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    positions: Literal["learned", "rope"] = "learned"
    bias: bool = True
    tied_embeddings: bool = True

    def __post_init__(self) -> None:
        self.check_sizes(f"{self.name}: ")
        if self.mlp not in ("gelu", "swiglu") or self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"{self.name}: mlp must be gelu|swiglu and norm layernorm|rmsnorm")
        if self.positions not in ("learned", "rope"):
            raise ValueError(f"{self.name}: positions must be 'learned' or 'rope'")


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


def _gpt2(name: str, d: int, layers: int, heads: int, vocab: int = 50257, ctx: int = 1024):
    return ModelShape(name, vocab, ctx, d, layers, heads)


def _llama(name, d, layers, heads, kv_heads, d_ff, vocab=32000, ctx=4096):
    return ModelShape(
        name, vocab, ctx, d, layers, heads, kv_heads, d_ff,
        mlp="swiglu", norm="rmsnorm", positions="rope", bias=False, tied_embeddings=False,
    )


PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in [
        # nanoGPT's character-level Shakespeare model: 65 characters, 6 layers of width 384
        _gpt2("shakespeare-10M", 384, 6, 6, vocab=65, ctx=256),
        _gpt2("gpt2-124M", 768, 12, 12),
        _gpt2("gpt2-355M", 1024, 24, 16),
        _gpt2("gpt2-774M", 1280, 36, 20),
        _gpt2("gpt2-1.5B", 1600, 48, 25),
        _llama("tinyllama-1.1B", 2048, 22, 32, 4, 5632, ctx=2048),
        _llama("llama2-7B", 4096, 32, 32, 32, 11008),
        _llama("llama2-13B", 5120, 40, 40, 40, 13824),
        _llama("llama2-70B", 8192, 80, 64, 8, 28672),
    ]
}


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BytesPerParam:
    """Bytes each parameter costs during training with AdamW, by role."""

    weights: int
    grads: int
    optimizer: int  # AdamW's two moments, m and v
    master: int = 0  # fp32 copy of the weights kept by mixed precision

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.master


PRECISIONS: dict[str, BytesPerParam] = {
    # everything in fp32: 4 (w) + 4 (g) + 8 (m, v)
    "fp32": BytesPerParam(4, 4, 8),
    # mixed precision as in the ZeRO paper: 16-bit weights and grads, fp32 master
    # weights and moments: 2 + 2 + 8 + 4 = 16 bytes, no saving over fp32 for states
    "mixed": BytesPerParam(2, 2, 8, 4),
    # pure bf16, moments included: half of fp32, at some cost in stability
    "bf16": BytesPerParam(2, 2, 4),
}


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


def training_memory(n_params: float, precision: str = "mixed", activations: float = 0.0):
    """Memory to train ``n_params`` with AdamW: 16 bytes/param in fp32 or mixed precision."""
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
    """Bytes of activations saved for the backward pass, 16-bit, one micro-batch.

    Per layer and token, Korthikanti et al. (2022) count ``34·d + 5·h·s`` bytes
    for a GPT block: 34·d for the tensors the matmuls, norms, GELU and dropout
    keep, and 5·h·s for the s x s attention scores, softmax and dropout mask of
    the h heads. FlashAttention never stores the scores (the 5·h·s term goes).
    Full activation checkpointing keeps only each block's input (2·d bytes) and
    recomputes the rest during the backward pass. On top: the logits in fp32
    for the loss, 4·vocab bytes per token.
    """
    s = shape.context_length if seq_len is None else seq_len
    d, h = shape.d_model, shape.n_heads
    if checkpointing:
        per_layer_per_token = 2 * d
    else:
        per_layer_per_token = 34 * d + (0 if flash else 5 * h * s)
    tokens = batch_size * s
    return tokens * (shape.n_layers * per_layer_per_token + 4 * shape.vocab_size)


# ---------------------------------------------------------------------------
# Compute: FLOPs, hardware, time
# ---------------------------------------------------------------------------


def training_flops(n_params: float, n_tokens: float) -> float:
    """C ≈ 6·N·D: 2 FLOPs per parameter per token forward, 4 backward."""
    return 6.0 * n_params * n_tokens


def flops_per_token(shape: ModelShape, seq_len: int | None = None, training: bool = True):
    """FLOPs per token counted from the shapes, attention included (Kaplan et al. 2020).

    Forward: 2 FLOPs per multiply-add of every matrix a token meets (the
    non-embedding weights and the output head), plus ``2·2·L·s·d`` for QKᵀ and
    the weighted sum of V over a context of s. Training: three times that.
    """
    s = shape.context_length if seq_len is None else seq_len
    n = count_params(shape)
    matmul_params = n.non_embedding - n.lm_head + shape.vocab_size * shape.d_model
    forward = 2 * matmul_params + 4 * shape.n_layers * s * shape.d_model
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


def measure_matmul_flops(n: int = 1024, repeats: int = 5, dtype=None, device: str = "cpu"):
    """Measured FLOP/s of an n x n matmul on this machine: the best of ``repeats`` runs.

    The best run, not the mean, estimates what the hardware can do when nothing
    else interferes; 2·n³ FLOPs per matmul.
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
        start = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


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


def max_trainable_params(memory_bytes: float, precision: str = "mixed") -> float:
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
    precision: str = "mixed"
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
    precision: str = "mixed",
    batch_size: int = 1,
    checkpointing: bool = False,
) -> Plan:
    """Size a training run; ``tokens`` defaults to the compute-optimal 20 per parameter."""
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
