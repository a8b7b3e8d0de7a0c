"""The planner against published parameter counts, PyTorch's numel(), and its own algebra."""

from __future__ import annotations

import dataclasses
import doctest
import math

import pytest
import torch
from torch import nn

from llmbook import planning
from llmbook.planning import PRESETS, ModelShape, count_params

# Parameter counts as published or as reported by the reference implementations
# (Hugging Face transformers' num_parameters() for the GPT-2 and Llama checkpoints).
PUBLISHED = {
    "gpt2-124M": 124_439_808,
    "gpt2-355M": 354_823_168,
    "gpt2-774M": 774_030_080,
    "gpt2-1.5B": 1_557_611_200,
    "tinyllama-1.1B": 1_100_048_384,
    "llama2-7B": 6_738_415_616,
    "llama2-13B": 13_015_864_320,
    "llama2-70B": 68_976_648_192,
}


@pytest.mark.parametrize(("name", "expected"), PUBLISHED.items())
def test_count_matches_published(name, expected):
    assert count_params(PRESETS[name]).total == expected


def test_module_doctests():
    result = doctest.testmod(planning)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------
# The planner against models built in PyTorch on the meta device
# ---------------------------------------------------------------------------


class MetaBlock(nn.Module):
    """One decoder block with every option ModelShape has, from plain nn modules."""

    def __init__(self, s: ModelShape):
        super().__init__()
        d, kv, ff, b = s.d_model, s.kv_heads * s.head_dim, s.ff_dim, s.bias
        norm = (lambda: nn.LayerNorm(d, bias=b)) if s.norm == "layernorm" else (lambda: nn.RMSNorm(d))
        self.attn_norm, self.mlp_norm = norm(), norm()
        self.q, self.o = nn.Linear(d, d, bias=b), nn.Linear(d, d, bias=b)
        self.k, self.v = nn.Linear(d, kv, bias=b), nn.Linear(d, kv, bias=b)
        self.up, self.down = nn.Linear(d, ff, bias=b), nn.Linear(ff, d, bias=b)
        if s.mlp == "swiglu":
            self.gate = nn.Linear(d, ff, bias=b)


class MetaModel(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        d = s.d_model
        self.tokens = nn.Embedding(s.vocab_size, d)
        if s.positions == "learned":
            self.positions = nn.Embedding(s.context_length, d)
        self.blocks = nn.ModuleList(MetaBlock(s) for _ in range(s.n_layers))
        self.final_norm = nn.LayerNorm(d, bias=s.bias) if s.norm == "layernorm" else nn.RMSNorm(d)
        self.head = nn.Linear(d, s.vocab_size, bias=False)
        if s.tied_embeddings:
            self.head.weight = self.tokens.weight


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # a tied weight is yielded once


def meta_numel(shape: ModelShape) -> int:
    with torch.device("meta"):
        return numel(MetaModel(shape))


VARIANTS = [
    ModelShape("gpt2-gqa", 1000, 64, 96, 3, 8, n_kv_heads=2),
    ModelShape("gpt2-nobias-untied", 1000, 64, 96, 3, 8, bias=False, tied_embeddings=False),
    ModelShape("gpt2-dff", 1000, 64, 96, 2, 4, d_ff=200),
    ModelShape("swiglu-bias-learned", 500, 32, 64, 2, 4, n_kv_heads=1, d_ff=160, mlp="swiglu"),
    ModelShape("llama-tied", 500, 32, 64, 2, 8, n_kv_heads=4, d_ff=172, mlp="swiglu",
               norm="rmsnorm", positions="rope", bias=False, tied_embeddings=True),
    ModelShape("rmsnorm-with-bias", 300, 16, 32, 1, 2, norm="rmsnorm"),
]


@pytest.mark.parametrize("shape", [*PRESETS.values(), *VARIANTS], ids=lambda s: s.name)
def test_count_matches_torch_numel(shape):
    assert count_params(shape).total == meta_numel(shape)


@pytest.mark.parametrize("d", [64, 768, 1600])
def test_gpt2_block_is_torch_transformer_layer(d):
    """nn.TransformerEncoderLayer (GELU, 4d MLP, pre-norm) has exactly a GPT-2 block's parameters."""
    shape = ModelShape("one-block", 1, 1, d, 1, 4 if d != 1600 else 25)
    n = count_params(shape)
    with torch.device("meta"):
        layer = nn.TransformerEncoderLayer(d, shape.n_heads, 4 * d, activation="gelu",
                                           norm_first=True, batch_first=True)
        no_bias = nn.TransformerEncoderLayer(d, shape.n_heads, 4 * d, activation="gelu",
                                             norm_first=True, batch_first=True, bias=False)
    final_norm = 2 * d
    assert numel(layer) == n.attention + n.mlp + n.norms - final_norm == 12 * d * d + 13 * d
    n_nb = count_params(ModelShape("one-block", 1, 1, d, 1, shape.n_heads, bias=False))
    assert numel(no_bias) == n_nb.attention + n_nb.mlp + n_nb.norms - d == 12 * d * d + 2 * d


def test_gqa_shrinks_only_key_and_value():
    mha = count_params(ModelShape("mha", 100, 16, 64, 2, 8))
    gqa = count_params(ModelShape("gqa", 100, 16, 64, 2, 8, n_kv_heads=2))
    per_layer_kv_saving = 2 * (64 * 64 - 64 * 16) + 2 * (64 - 16)  # K and V weights and biases
    assert mha.attention - gqa.attention == 2 * per_layer_kv_saving
    assert (mha.mlp, mha.norms, mha.embedding) == (gqa.mlp, gqa.norms, gqa.embedding)


@pytest.mark.parametrize("shape", PRESETS.values(), ids=lambda s: s.name)
def test_param_count_components(shape):
    n = count_params(shape)
    assert n.total == sum(v for k, v in n.as_dict().items() if k != "total")
    assert n.non_embedding == n.total - n.embedding - n.positions
    assert n.embedding == shape.vocab_size * shape.d_model
    assert n.lm_head == (0 if shape.tied_embeddings else n.embedding)
    assert n.positions == (shape.context_length * shape.d_model if shape.positions == "learned" else 0)


# ---------------------------------------------------------------------------
# Impossible shapes fail with a message that says what is wrong
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 100, "n_heads": 3}, "d_model=100 is not divisible by n_heads=3"),
        ({"n_heads": 8, "n_kv_heads": 3}, "n_heads=8 must be a multiple of n_kv_heads=3"),
        ({"n_heads": 4, "n_kv_heads": 8}, "n_heads=4 must be a multiple of n_kv_heads=8"),
        ({"n_kv_heads": 0}, "must be a multiple of n_kv_heads=0"),
        ({"vocab_size": 0}, "vocab_size must be positive"),
        ({"n_layers": -1}, "n_layers must be positive"),
        ({"mlp": "relu"}, "mlp must be gelu|swiglu"),
        ({"norm": "batchnorm"}, "norm layernorm|rmsnorm"),
        ({"positions": "alibi"}, "positions must be 'learned' or 'rope'"),
    ],
)
def test_impossible_shapes_raise(kwargs, message):
    base = {"name": "bad", "vocab_size": 100, "context_length": 16, "d_model": 64,
            "n_layers": 2, "n_heads": 8}
    with pytest.raises(ValueError, match=message) as info:
        ModelShape(**{**base, **kwargs})
    assert str(info.value).startswith("bad: "), "the message names the shape"


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("precision", "per_param"), [("fp32", 16), ("autocast", 16), ("mixed", 16), ("bf16", 8)])
def test_bytes_per_param(precision, per_param):
    assert planning.PRECISIONS[precision].total == per_param
    memory = planning.training_memory(1e9, precision)
    assert memory.states == per_param * 1e9
    assert memory.total == memory.states  # no activations given
    assert planning.max_trainable_params(per_param * 1e9, precision) == pytest.approx(1e9)


def test_mixed_precision_roles():
    m = planning.training_memory(10, "mixed", activations=7)
    assert (m.weights, m.grads, m.optimizer, m.master, m.activations) == (20, 20, 80, 40, 7)
    assert m.total == 160 + 7
    fp32 = planning.training_memory(10, "fp32")
    assert (fp32.weights, fp32.master) == (40, 0)


def test_two_mixed_precision_conventions():
    """torch.autocast (the book's trainer) keeps fp32 weights and grads; the ZeRO convention bf16 ones plus a master."""
    autocast = planning.training_memory(10, "autocast")
    assert (autocast.weights, autocast.grads, autocast.optimizer, autocast.master) == (40, 40, 80, 0)
    zero = planning.training_memory(10, "mixed")
    assert autocast.states == zero.states == 160  # same total, different roles
    assert planning.TRAINER_PRECISION == "autocast"
    assert planning.training_memory(10).weights == 40  # the default is what the book's trainer does
    assert planning.plan(PRESETS["gpt2-124M"]).memory.master == 0


def test_autocast_keeps_fp32_weights_and_grads():
    """The convention the planner calls "autocast" is what torch.autocast does to a model's parameters."""
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(3, 8))
    assert out.dtype == torch.bfloat16  # the matmuls ran in bf16
    out.float().sum().backward()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
    assert planning.PRECISIONS["autocast"].weights == planning.PRECISIONS["autocast"].grads == 4


def test_unknown_precision_is_a_clear_error():
    for call in (lambda: planning.training_memory(1e9, "fp8"),
                 lambda: planning.max_trainable_params(80e9, "fp8")):
        with pytest.raises(ValueError, match=r"unknown precision 'fp8'; choose one of fp32, autocast, mixed, bf16"):
            call()


def test_inference_memory():
    assert planning.inference_memory(7e9) == 14e9
    assert planning.inference_memory(7e9, bytes_per_param=0.5) == 3.5e9


@pytest.mark.parametrize("shape", PRESETS.values(), ids=lambda s: s.name)
def test_activation_memory_ordering(shape):
    s = shape.context_length
    full = planning.activation_memory(shape, 2, s)
    flash = planning.activation_memory(shape, 2, s, flash=True)
    ckpt = planning.activation_memory(shape, 2, s, checkpointing=True)
    ckpt_flash = planning.activation_memory(shape, 2, s, checkpointing=True, flash=True)
    assert ckpt_flash < ckpt < full and ckpt_flash < flash < full
    tokens, L, d = 2 * s, shape.n_layers, shape.d_model
    scores = 5 * shape.n_heads * s
    assert full - flash == tokens * L * scores  # the attention scores
    # the block inputs, plus one block's activations alive while it is recomputed, plus the fp32 logits
    assert ckpt == tokens * (L * 2 * d + 34 * d + scores + 4 * shape.vocab_size)
    assert ckpt_flash == tokens * (L * 2 * d + 34 * d + 4 * shape.vocab_size)


def test_checkpointing_counts_the_recompute_peak():
    """One block's full activations live during its recomputation: with one layer, checkpointing saves nothing."""
    shape = ModelShape("one", vocab_size=100, context_length=32, d_model=64, n_layers=1, n_heads=4)
    plain = planning.activation_memory(shape, 3)
    ckpt = planning.activation_memory(shape, 3, checkpointing=True)
    assert ckpt == plain + 3 * 32 * 2 * 64  # the kept block input comes on top of the recompute peak
    deeper = dataclasses.replace(shape, n_layers=9)
    extra = planning.activation_memory(deeper, 3, checkpointing=True) - ckpt
    assert extra == 3 * 32 * 8 * 2 * 64  # each further layer adds only its input


def test_activation_memory_scaling():
    gpt2 = PRESETS["gpt2-124M"]
    one = planning.activation_memory(gpt2, 1)
    assert one == planning.activation_memory(gpt2, 1, gpt2.context_length)  # default: full context
    assert planning.activation_memory(gpt2, 4) == 4 * one  # linear in the batch
    # with FlashAttention, linear in the sequence length; without, faster than linear
    flash = [planning.activation_memory(gpt2, 1, s, flash=True) for s in (512, 1024)]
    full = [planning.activation_memory(gpt2, 1, s) for s in (512, 1024)]
    assert flash[1] == 2 * flash[0]
    assert full[1] > 2 * full[0]


# ---------------------------------------------------------------------------
# Compute and time
# ---------------------------------------------------------------------------


def test_six_n_d():
    assert planning.training_flops(124e6, 1e9) == 6 * 124e6 * 1e9
    assert planning.training_flops(175e9, 300e9) == pytest.approx(3.14e23, rel=0.01)  # GPT-3


@pytest.mark.parametrize("shape", PRESETS.values(), ids=lambda s: s.name)
def test_flops_per_token(shape):
    n = count_params(shape)
    L, s, d = shape.n_layers, shape.context_length, shape.d_model
    attention = 4 * L * s * d  # QK^T and the weighted sum of V, forward
    # every matmul a token meets: the blocks plus one vocab x d head, tied or not
    matmuls = n.total - n.positions - (n.embedding if not shape.tied_embeddings else 0)
    forward = planning.flops_per_token(shape, training=False)
    assert forward == 2 * matmuls + attention
    assert planning.flops_per_token(shape) == 3 * forward
    if n.total > 1e8:  # the 6·N rule is close for real models; small ones with large vocabularies differ more
        assert 1.0 < planning.flops_per_token(shape) / (6 * n.total) < 1.2
    assert planning.flops_per_token(shape, seq_len=s // 2) < planning.flops_per_token(shape)
    # a causal kernel meets (T + 1) / 2 keys per query on average: about half of the attention term
    causal = planning.flops_per_token(shape, training=False, causal=True)
    assert forward - causal == pytest.approx(4 * L * d * (s - (s + 1) / 2))
    assert (causal - 2 * matmuls) / attention == pytest.approx((s + 1) / (2 * s))


def test_attention_flops_against_kaplan_and_palm():
    """Kaplan et al. count 2·n_layer·n_ctx·d_attn forward (QKᵀ only); PaLM's 12·L·H·Q·T is 3 x both matmuls."""
    shape = PRESETS["gpt2-124M"]
    L, T, d, H = shape.n_layers, shape.context_length, shape.d_model, shape.n_heads
    no_attention = planning.flops_per_token(shape, seq_len=0, training=False)  # a context of no keys
    attention_forward = planning.flops_per_token(shape, training=False) - no_attention
    kaplan_mask_row = 2 * L * T * d
    assert attention_forward == 2 * kaplan_mask_row  # Kaplan's row, plus as much for the weighted sum of V
    attention_training = planning.flops_per_token(shape) - 3 * no_attention
    assert attention_training == 12 * L * H * shape.head_dim * T


@pytest.mark.parametrize("n_params", [count_params(s).total for s in PRESETS.values()])
def test_compute_optimal_round_trip(n_params):
    tokens = planning.compute_optimal_tokens(n_params)
    assert tokens == 20 * n_params
    budget = planning.training_flops(n_params, tokens)
    assert planning.compute_optimal_params(budget) == pytest.approx(n_params, rel=1e-12)


def test_chinchilla_budget():
    """Chinchilla: 70B parameters on 1.4T tokens, about 5.76e23 FLOPs."""
    assert planning.compute_optimal_params(5.76e23) == pytest.approx(70e9, rel=0.02)


def test_training_time():
    h100 = planning.HARDWARE["H100 SXM"]
    flops = planning.training_flops(7e9, 2e12)
    seconds = planning.training_time(flops, h100.peak_flops, mfu=0.4)
    assert seconds == flops / (0.4 * 989e12)
    assert planning.training_time(flops, h100.peak_flops, 0.4, n_devices=1024) == pytest.approx(
        seconds / 1024)
    assert planning.training_time(flops, h100.peak_flops, mfu=1.0) == pytest.approx(0.4 * seconds)


@pytest.mark.parametrize("mfu", [0, -0.1, 1.5])
def test_mfu_out_of_range(mfu):
    with pytest.raises(ValueError, match=r"mfu is a fraction of peak in \(0, 1\]"):
        planning.training_time(1e20, 1e15, mfu=mfu)


def test_devices_at_least_one():
    with pytest.raises(ValueError, match="n_devices must be at least 1"):
        planning.training_time(1e20, 1e15, n_devices=0)


def test_hardware_datasheets():
    h = planning.HARDWARE
    assert h["H100 SXM"].peak_flops > h["A100 80GB"].peak_flops > h["RTX 4090"].peak_flops
    assert h["H100 SXM"].memory == h["A100 80GB"].memory == 80e9
    assert h["RTX 4090"].memory == 24e9


def test_llama2_7b_reported_gpu_hours_imply_realistic_mfu():
    """Meta reports 184,320 A100-hours for Llama 2 7B on 2T tokens: about 40% MFU."""
    n = count_params(PRESETS["llama2-7B"]).total
    seconds = planning.training_time(planning.training_flops(n, 2e12),
                                     planning.HARDWARE["A100 80GB"].peak_flops, mfu=0.4)
    assert seconds / 3600 == pytest.approx(184_320, rel=0.05)


def test_measure_matmul_flops_is_positive_and_finite():
    rate = planning.measure_matmul_flops(n=64, repeats=2)
    assert 0 < rate < math.inf


# ---------------------------------------------------------------------------
# A whole plan
# ---------------------------------------------------------------------------


def test_plan_defaults_to_compute_optimal():
    shape = PRESETS["gpt2-124M"]
    p = planning.plan(shape)
    n = count_params(shape).total
    assert p.params.total == n and p.tokens == 20 * n
    assert p.flops == planning.training_flops(n, 20 * n)
    assert p.hardware.name == "H100 SXM" and p.mfu == 0.4 and p.precision == "autocast"
    assert p.memory.states == 16 * n
    assert p.memory.activations == planning.activation_memory(shape, 1, flash=True)
    assert p.device_days == pytest.approx(p.seconds / 86400)


def test_plan_devices_share_time_not_device_days():
    shape, hw = PRESETS["llama2-7B"], planning.HARDWARE["A100 80GB"]
    one = planning.plan(shape, tokens=2e12, hardware=hw)
    many = planning.plan(shape, tokens=2e12, hardware="A100 80GB", n_devices=8)
    assert many.seconds == pytest.approx(one.seconds / 8)
    assert many.device_days == pytest.approx(one.device_days)


def test_plan_precision_and_checkpointing():
    shape = PRESETS["gpt2-124M"]
    bf16 = planning.plan(shape, precision="bf16", checkpointing=True, batch_size=4)
    assert bf16.memory.states == 8 * bf16.params.total
    assert bf16.memory.activations == planning.activation_memory(shape, 4, checkpointing=True, flash=True)
    with pytest.raises(ValueError, match="unknown precision"):
        planning.plan(shape, precision="int4")
