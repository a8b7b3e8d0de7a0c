"""Chapter 5's "assemble it yourself" check (5.9): it passes the solution, reports the starter as not attempted,
and names each typical mistake in one line.

The model below is the solution of solutions/05_transformer.md written out
again with one typical mistake switched on by name. Tiny models: well under a
second per case.
"""

from __future__ import annotations

import pytest
import torch
from exercise_helpers import fresh_starter as _fresh_starter
from exercise_helpers import one_line_error as _one_line_error
from exercise_helpers import passes_and_starter_not_attempted as _passes_and_starter_not_attempted
from exercise_helpers import solution_lines as _solution_lines
from torch import nn
from torch.nn import functional as F

from llmbook import model
from llmbook.attention import MultiHeadAttention
from llmbook.exercises import ch05
from llmbook.layers import MLP, LayerNorm, RMSNorm, SwiGLU
from llmbook.rope import RotaryEmbedding


def _norm(cfg):
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class _Block(nn.Module):
    def __init__(self, cfg, mistake=None):
        super().__init__()
        self.mistake = mistake
        rope = None
        if cfg.positions == "rope" and mistake != "no_rope":
            rope = RotaryEmbedding(cfg.head_dim, max_seq_len=cfg.context_length, theta=cfg.rope_theta)
        self.norm1 = _norm(cfg)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, bias=cfg.bias, rope=rope)
        self.norm2 = _norm(cfg)
        mlp = SwiGLU if cfg.mlp == "swiglu" else MLP
        self.mlp = mlp(cfg.d_model, cfg.ff_dim, bias=cfg.bias)

    def forward(self, x):
        if self.mistake == "postnorm":
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.mlp(x))
        a = self.attn(self.norm1(x))
        x = a if self.mistake == "no_attn_residual" else x + a
        m = self.mlp(self.norm2(x))
        return m if self.mistake == "no_mlp_residual" else x + m


class _GPT(nn.Module):
    """The solution's GPT, with one typical mistake switched on by name."""

    def __init__(self, cfg, mistake=None):
        super().__init__()
        self.cfg, self.mistake = cfg, mistake
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned" or mistake == "llama_pos_table":
            self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg, mistake) for _ in range(cfg.n_layers))
        self.norm_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if (cfg.tied_embeddings and mistake != "untied") or mistake == "tied_llama":
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx, targets=None):
        B, T = idx.shape
        mistake = self.mistake
        x = self.tok_emb(idx)
        if hasattr(self, "pos_emb") and mistake != "no_positions":
            x = x + self.pos_emb(torch.arange(T))
        for block in self.blocks:
            x = block(x)
        if mistake != "no_final_norm":
            x = self.norm_f(x)
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        V = logits.shape[-1]
        if mistake == "shifted_twice":
            return logits, F.cross_entropy(logits[:, :-1].reshape(-1, V), targets[:, 1:].reshape(-1))
        if mistake == "against_inputs":
            return logits, F.cross_entropy(logits.reshape(-1, V), idx.reshape(-1))
        if mistake == "transposed_targets":
            return logits, F.cross_entropy(logits.reshape(-1, V), targets.t().reshape(-1))
        if mistake == "softmax_first":
            return logits, F.cross_entropy(logits.reshape(-1, V).softmax(-1), targets.reshape(-1))
        if mistake == "sum":
            return logits, F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="sum")
        return logits, F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T))


class _Starter(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        raise NotImplementedError("your solution goes here")


def test_reference_variant_is_the_library_model():
    """The check's own assembly of the reference's parts gives llmbook.model.GPT's logits, for every case."""
    for seed, (_, cfg, batch, T) in enumerate(ch05.gpt_cases()):
        ref = ch05.random_gpt(cfg, seed)
        idx, _ = ch05.gpt_inputs(cfg, batch, T, seed)
        with torch.no_grad():
            assert torch.allclose(ref(idx)[0], ch05.gpt_variant(ref, idx), atol=1e-6)


def test_random_weights_make_every_part_matter():
    """Each mistake of the check moves the logits far beyond its tolerance in some case (RoPE in Llama, ...)."""
    for kwargs, _ in ch05.GPT_MISTAKES:
        gaps = []
        for seed, (_, cfg, batch, T) in enumerate(ch05.gpt_cases()):
            ref = ch05.random_gpt(cfg, seed)
            idx, _ = ch05.gpt_inputs(cfg, batch, T, seed)
            with torch.no_grad():
                gaps.append((ch05.gpt_variant(ref, idx, **kwargs) - ref(idx)[0]).abs().max().item())
        assert max(gaps) > 0.1, (kwargs, gaps)


def test_solution_passes_and_starter_is_not_attempted(capsys):
    _passes_and_starter_not_attempted(capsys, ch05.check_gpt_forward, "5.9", (_GPT,), (_Starter,))


@pytest.mark.parametrize(("mistake", "hint"), [
    ("postnorm", "post-norm"),
    ("no_attn_residual", "missing residual: add attention's output"),
    ("no_mlp_residual", "missing residual: add the MLP's output"),
    ("untied", "head is not tied to the embedding"),
    ("tied_llama", "tied_embeddings=False"),
    ("no_final_norm", "final norm is missing"),
    ("llama_pos_table", "no position table"),
    ("no_rope", "RoPE is missing"),
    ("no_positions", "adds the learned positions"),
    ("shifted_twice", "shifted twice"),
    ("against_inputs", "not shifted"),
    ("transposed_targets", "wrong reshape"),
    ("softmax_first", "do not softmax"),
    ("sum", "not the sum"),
])
def test_gpt_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch05.check_gpt_forward, lambda cfg: _GPT(cfg, mistake))
    assert hint in message, message


def test_wrong_names_are_reported():
    class Renamed(_GPT):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.final_norm = self.norm_f
            del self.norm_f

    message = _one_line_error(ch05.check_gpt_forward, Renamed)
    assert "'norm_f.weight'" in message and "unexpected ['final_norm.bias'" in message, message


def test_library_model_passes():
    """llmbook.model.GPT itself (a different signature: Block(cfg, layer), caches, ...) passes the check."""
    ch05.check_gpt_forward.strict(model.GPT)


def test_starter_is_generated_and_solution_is_long_enough():
    _fresh_starter("05_transformer")
    assert len(_solution_lines("05_transformer", "## Exercise 5.9")) >= 30
