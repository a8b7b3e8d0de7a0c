"""A decoder-only transformer that is GPT-2 or Llama depending on its config.

The model is a stack of identical blocks between an embedding and an output head:

    token ids (B, T) -> tok_emb (+ pos_emb) -> Block x n_layers -> norm_f -> lm_head -> logits (B, T, vocab)

and each block is attention then an MLP, each added back to a residual stream:

    x = x + attn(norm1(x))
    x = x + mlp(norm2(x))

GPT-2 and Llama differ only in the parts, which ``ModelConfig`` chooses:

                 GPT-2                     Llama
    positions    learned table (pos_emb)   RoPE inside attention
    norm         LayerNorm with bias       RMSNorm
    mlp          GELU, d_ff = 4·d          SwiGLU, d_ff ≈ 8/3·d
    biases       everywhere                none
    lm_head      tied to tok_emb           its own matrix
    k/v heads    one per query head        fewer, in the bigger models (GQA)

Attention, the KV cache and RoPE come from Chapter 4 (``llmbook.attention``,
``llmbook.rope``), unchanged. The structure follows nanoGPT's ``model.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llmbook.attention import KVCache, MultiHeadAttention, backend_names
from llmbook.layers import GELU, MLP, LayerNorm, RMSNorm, SiLU, SwiGLU
from llmbook.rope import RotaryEmbedding
from llmbook.shapes import SHAPES, DerivedSizes, ModelShape, Registry


@dataclass
class ModelConfig(DerivedSizes):
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64, for faster matmuls
    context_length: int = 1024  # the most tokens the model sees at once
    d_model: int = 768  # width of the residual stream
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: one k/v head per query head; fewer is grouped-query attention
    d_ff: int | None = None  # None: 4·d_model, GPT-2's choice
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    positions: Literal["learned", "rope"] = "learned"
    prenorm: bool = True  # False: the original Transformer's norm after each residual addition
    bias: bool = True  # in every Linear and LayerNorm; Llama has none
    tied_embeddings: bool = True  # lm_head reuses tok_emb's matrix (GPT-2), saving vocab·d parameters
    dropout: float = 0.0  # 0 for pretraining on lots of data; 0.1-0.2 for small data sets
    # on the attention probabilities; None: the same as dropout. 0 keeps SDPA on its fast CPU kernel
    # (with dropout on the probabilities it takes a path about 2x slower: benchmarks/bench_pretraining.py)
    attention_dropout: float | None = None
    rope_theta: float = 10000.0  # RoPE's frequency base (Llama 2); only with positions="rope"
    norm_eps: float = 1e-5  # added to the variance before the square root
    attention: str = "manual"  # llmbook.attention.backend_names(): "manual" (Chapter 4), "sdpa", "flash-triton", ...

    def __post_init__(self) -> None:
        self.check_sizes()
        if self.d_ff is not None and self.d_ff <= 0:
            raise ValueError(f"d_ff must be positive (or None for 4·d_model), got {self.d_ff}")
        choices = {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"), "positions": ("learned", "rope")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of dimensions: head_dim={self.head_dim} must be even")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attention_dropout is not None and not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1) or None, got {self.attention_dropout}")
        if self.attention not in backend_names():
            names = ", ".join(backend_names())
            raise ValueError(f"unknown attention backend {self.attention!r}; choose one of: {names}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(f"norm_eps and rope_theta must be positive, got {self.norm_eps}, {self.rope_theta}")

    def to_shape(self, name: str = "model") -> ModelShape:
        """The Chapter 1 planning view of this model, to count its parameters and size its training."""
        return ModelShape(
            name, self.vocab_size, self.context_length, self.d_model, self.n_layers, self.n_heads,
            self.n_kv_heads, self.d_ff, mlp=self.mlp, norm=self.norm, positions=self.positions,
            bias=self.bias, tied_embeddings=self.tied_embeddings,
        )

    @classmethod
    def from_shape(cls, shape: ModelShape, **overrides) -> ModelConfig:
        """The model of a Chapter 1 shape; the fields a shape does not have (dropout, ...) keep their defaults."""
        fields = {f.name: getattr(shape, f.name) for f in dataclasses.fields(shape) if f.name not in ("name", "note")}
        return cls(**{**fields, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A copy of ``PRESETS[name]`` with some fields changed: ``preset("gpt-tiny", dropout=0.1)``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS.names()}")
        return dataclasses.replace(PRESETS[name], **overrides)


# The named shapes of llmbook.shapes (Chapter 1's planner reads the same registry), as model configs:
# "gpt-tiny" and "llama-tiny" for tests, "nanogpt-char-cpu" (alias "shakespeare-char") and
# "nanogpt-char-gpu" for nanoGPT's character models, "laptop-llama" for the book's reference model and
# "laptop-gpt" for its GPT-2 style twin, then the GPT-2 and Llama 2 families.
PRESETS: Registry[ModelConfig] = SHAPES.map(ModelConfig.from_shape)


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    """One transformer layer: attention (tokens talk to each other), then an MLP (each token thinks alone)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.prenorm = layer, cfg.prenorm  # layer: this block's index, 0 .. n_layers - 1
        rope = None
        if cfg.positions == "rope":
            rope = RotaryEmbedding(cfg.head_dim, max_seq_len=cfg.context_length, theta=cfg.rope_theta)
        self.norm1 = _norm(cfg)
        self.attn = MultiHeadAttention(
            cfg.d_model, cfg.n_heads, cfg.n_kv_heads, bias=cfg.bias, rope=rope,
            dropout=cfg.dropout if cfg.attention_dropout is None else cfg.attention_dropout,
            backend=cfg.attention,
        )
        self.drop = nn.Dropout(cfg.dropout)  # on attention's output, as nanoGPT's resid_dropout
        self.norm2 = _norm(cfg)
        if cfg.mlp == "swiglu":
            self.mlp = SwiGLU(cfg.d_model, cfg.ff_dim, bias=cfg.bias, dropout=cfg.dropout)
        else:
            self.mlp = MLP(cfg.d_model, cfg.ff_dim, bias=cfg.bias, dropout=cfg.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, mask: Tensor | None = None) -> Tensor:
        """``(B, T, C) -> (B, T, C)``."""
        if self.prenorm:
            # pre-norm (GPT-2, Llama): the residual stream x itself is never normalized, so the
            # gradient flows straight from the loss to every layer through the additions
            x = x + self.drop(self.attn(self.norm1(x), cache, mask))
            return x + self.mlp(self.norm2(x))
        # post-norm (Vaswani et al. 2017): normalize after each addition; needs warmup to train deep
        x = self.norm1(x + self.drop(self.attn(x, cache, mask)))
        return self.norm2(x + self.mlp(x))


class GPT(nn.Module):
    """The whole language model: token ids ``(B, T)`` in, next-token logits ``(B, T, vocab_size)`` out."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Chapter 7: recompute each block's activations in the backward pass instead of storing them
        self.activation_checkpointing = False
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = _norm(cfg)  # kept with post-norm too, so both variants have the same parameters
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tied_embeddings:
            # the same matrix maps ids to vectors and vectors to scores of ids (Press & Wolf 2017)
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: each block adds two outputs to the residual stream, so scale those projections down by
        # sqrt(2·n_layers) to keep the stream's variance from growing with depth
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=resid_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def use_fused_kernels(self, fused: bool = True) -> GPT:
        """Compute the norms and activations with PyTorch's fused kernels (``F.layer_norm``, ``F.gelu``, ...).

        The same functions (tests/test_layers.py checks each against ours), in
        fewer passes over memory, which is what a step at small widths spends
        much of its time on (benchmarks/bench_pretraining.py measures it).
        Attention's kernel is ``cfg.attention``'s choice. Returns the model.
        """
        for module in self.modules():
            if isinstance(module, (LayerNorm, RMSNorm, GELU, SiLU)):
                module.fused = fused
        return self

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPT:
        return cls(ModelConfig.preset(name, **overrides))

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied matrix counted once; ``non_embedding`` leaves out tok_emb and pos_emb."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.cfg.positions == "learned":
                n -= self.pos_emb.weight.numel()
        return n

    def new_caches(
        self, batch_size: int, max_len: int | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> list[KVCache]:
        """One empty KV cache per layer, for up to ``max_len`` tokens (default: the context length)."""
        max_len = self.cfg.context_length if max_len is None else max_len
        if not 0 < max_len <= self.cfg.context_length:
            raise ValueError(f"max_len must be in 1..context_length={self.cfg.context_length}, got {max_len}")
        return [b.attn.new_cache(batch_size, max_len, device, dtype) for b in self.blocks]

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, caches: list[KVCache] | None = None,
        positions: Tensor | None = None, mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits ``(B, T, vocab_size)`` and, given targets ``(B, T)``, the mean cross-entropy loss.

        With ``caches`` (from ``new_caches``), idx holds only the new tokens; they
        come after the ``caches[0].length`` tokens seen before. ``positions``
        ``(B, T)`` or ``(T,)`` overrides the learned-embedding positions, which
        default to ``past + arange(T)``: a left-padded row [pad, pad, a, b] wants
        [0, 0, 0, 1]. RoPE always rotates by the cache offset instead; it only sees
        relative distances, so padding is exact once ``mask`` hides the pad keys.
        ``mask`` is bool, True for real tokens: ``(B, past + T)``, or any shape
        that broadcasts to ``(B, n_heads, T, past + T)``; the causal mask is added anyway.
        """
        B, T = idx.shape  # batch, time
        cfg = self.cfg
        if caches is not None and len(caches) != cfg.n_layers:
            raise ValueError(f"expected one cache per layer ({cfg.n_layers}), got {len(caches)}")
        past = caches[0].length if caches else 0
        if past + T > cfg.context_length:
            raise ValueError(
                f"{T} new tokens after {past} cached ones make {past + T}, more than the model's "
                f"context_length={cfg.context_length}; crop the input to the last {cfg.context_length - past}"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= cfg.vocab_size):
            raise ValueError(
                f"token ids must be in 0..{cfg.vocab_size - 1} (vocab_size={cfg.vocab_size}), "
                f"got ids from {int(idx.min())} to {int(idx.max())}"
            )

        x = self.tok_emb(idx)  # (B, T, C)
        if cfg.positions == "learned":
            if positions is None:
                positions = torch.arange(past, past + T, device=idx.device)  # (T,), shared by the batch
            if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= cfg.context_length):
                raise ValueError(
                    f"positions must be in 0..{cfg.context_length - 1}, "
                    f"got {int(positions.min())}..{int(positions.max())}"
                )
            x = x + self.pos_emb(positions)  # (B, T, C) + (T, C) or (B, T, C)
        x = self.drop(x)

        if mask is not None and mask.dim() == 2:  # (B, T_k) real keys -> (B, 1, 1, T_k): for every head and query
            if mask.shape != (B, past + T):
                raise ValueError(f"a 2-D mask must be (B, past + T) = {(B, past + T)}, got {tuple(mask.shape)}")
            mask = mask[:, None, None, :]
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            if recompute and cache is None:
                # keep only the block's input; its inner activations are recomputed during backward
                x = checkpoint(block, x, None, mask, use_reentrant=False)
            else:
                x = block(x, cache, mask)  # (B, T, C)
        x = self.norm_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)

        loss = None
        if targets is not None:
            # predict token t+1 from tokens 0..t at every position at once; -100 marks positions to skip
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss
