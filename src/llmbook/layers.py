"""The layers around attention: normalizations, activations and the feed-forward MLP.

A transformer block is attention plus an MLP, each wrapped with a
normalization. This module builds the pieces from scratch, in the order the
chapter meets them:

    BatchNorm1d   normalize each channel over the batch: the idea, and why it does not fit language models
    LayerNorm     normalize each token over its channels (GPT-2)
    RMSNorm       LayerNorm without the mean: cheaper, as good (Llama)
    gelu, silu    the smooth activations of GPT-2 and Llama
    MLP           GPT-2's feed-forward: d -> 4d -> GELU -> d
    SwiGLU        Llama's gated feed-forward: down(silu(gate(x)) * up(x))

Every layer is checked against its PyTorch counterpart in tests/test_layers.py.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --- Normalization ----------------------------------------------------------------------------------------------------


class BatchNorm1d(nn.Module):
    """Normalize each channel over all tokens of the batch; running statistics for evaluation.

    For ``(B, T, C)`` input, channel c is shifted and scaled by the mean and
    variance of ``x[:, :, c]`` over the B·T tokens. So a token's output depends
    on which other sequences share its batch, and on the padding; at evaluation
    the layer switches to running averages and behaves differently again. Both
    are why transformers normalize each token on its own (``LayerNorm``).

    ``mask`` ``(B, T)`` bool marks the real tokens: with it, padding does not
    enter the statistics. Without it, this equals ``torch.nn.BatchNorm1d`` on
    ``x.transpose(1, 2)``. Any ``(..., C)`` input works; ``(N, C)`` is the classic case.
    """

    def __init__(self, d: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.register_buffer("running_mean", torch.zeros(d))
        self.register_buffer("running_var", torch.ones(d))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        C = x.shape[-1]  # channels
        if self.training:
            flat = x.reshape(-1, C)  # (N, C): every token of the batch, N = B·T
            if mask is not None:
                flat = flat[mask.reshape(-1)]  # (N_real, C): only the real tokens count
            n = flat.shape[0]
            if n < 2:
                raise ValueError(f"BatchNorm needs at least 2 tokens to estimate a variance, got {n}")
            mean = flat.mean(dim=0)  # (C,)
            var = flat.var(dim=0, unbiased=False)  # (C,), biased: what normalizes this batch
            with torch.no_grad():  # running averages for evaluation; PyTorch stores the unbiased variance
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class LayerNorm(nn.Module):
    """Normalize each token over its channels to mean 0 and variance 1, then scale and shift.

    ``[1, 2, 3] -> [-1.22, 0, 1.22]`` (mean 2, variance 2/3), whatever else is
    in the batch. ``weight`` and ``bias`` (learned, per channel) let the model
    undo the normalization where that helps; ``bias=False`` drops the shift.
    ``fused=True`` hands the same computation to PyTorch's one-pass kernel
    (``GPT.use_fused_kernels``; tests/test_layers.py checks that both agree).
    """

    def __init__(self, d: int, eps: float = 1e-5, bias: bool = True, fused: bool = False):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:  # one pass over x instead of several, and a fused backward
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        mean = x.mean(dim=-1, keepdim=True)  # (..., 1)
        var = x.var(dim=-1, keepdim=True, unbiased=False)  # (..., 1), biased, as torch.nn.LayerNorm
        y = (x - mean) / torch.sqrt(var + self.eps) * self.weight
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    """Scale each token to root-mean-square 1, then by a learned weight: ``x / sqrt(mean(x²) + eps) · w``.

    LayerNorm without subtracting the mean and without a bias (Zhang & Sennrich
    2019): ``[1, 2, 3]`` has RMS sqrt(14/3) = 2.16 and becomes ``[0.46, 0.93, 1.39]``.
    Computed in float32 whatever the input dtype, because mean(x²) of bf16
    values loses most of its digits; the result comes back in the input dtype.
    ``fused=True`` calls PyTorch's ``F.rms_norm`` for the same computation.
    """

    def __init__(self, d: int, eps: float = 1e-6, fused: bool = False):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), self.eps).to(x.dtype)
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., C), RMS 1
        return (y * self.weight.float()).to(x.dtype)


# --- Activations ------------------------------------------------------------------------------------------------------


def gelu(x: Tensor, approximate: Literal["tanh", "none"] = "tanh") -> Tensor:
    """x·Φ(x), with Φ the standard normal CDF: inputs pass in proportion to how likely they are positive.

    ``"none"`` is exact, ``0.5·x·(1 + erf(x/√2))``; ``"tanh"`` is GPT-2's
    approximation (Hendrycks & Gimpel 2016), within 1e-3 of it and the one
    its weights were trained with. gelu(1) = 0.841, gelu(-1) = -0.159.
    """
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")


def silu(x: Tensor) -> Tensor:
    """x·sigmoid(x), also called swish: silu(1) = 0.731, silu(-1) = -0.269. Llama's activation."""
    return x * torch.sigmoid(x)


class GELU(nn.Module):
    """``gelu`` as a module; ``fused=True`` computes it with PyTorch's one-kernel ``F.gelu`` instead."""

    def __init__(self, approximate: Literal["tanh", "none"] = "tanh", fused: bool = False):
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate, self.fused = approximate, fused

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return F.gelu(x, approximate=self.approximate)
        return gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class SiLU(nn.Module):
    """``silu`` as a module; ``fused=True`` computes it with PyTorch's one-kernel ``F.silu`` instead."""

    def __init__(self, fused: bool = False):
        super().__init__()
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(x) if self.fused else silu(x)


# --- Feed-forward -----------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """GPT-2's feed-forward: widen each token to d_ff, apply GELU, project back to d_model.

    Attention mixes information between tokens; this layer then works on each
    token alone. It holds two thirds of a GPT-2 block's parameters (8·d² of 12·d²).
    """

    def __init__(self, d_model: int, d_ff: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.act = GELU("tanh")
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.fc(x))  # (B, T, d_ff)
        return self.drop(self.proj(h))  # (B, T, d_model)


class SwiGLU(nn.Module):
    """Llama's gated feed-forward: ``down(silu(gate(x)) * up(x))`` (Shazeer 2020).

    One branch (``up``) proposes features, the other (``gate``) decides through
    silu how much of each to let through. Three matrices instead of two, so
    Llama takes d_ff ≈ 8/3·d_model rather than 4·d_model to keep the parameter
    count of GPT-2's MLP (Llama 2 7B: 11008 ≈ 2.69·4096).
    """

    def __init__(self, d_model: int, d_ff: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.act = SiLU()  # fused=True: PyTorch's kernel for the same function
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.gate(x)) * self.up(x)  # (B, T, d_ff): the gate scales each proposed feature
        return self.drop(self.down(h))  # (B, T, d_model)
