"""The GPT model: parameter counts against Chapter 1's planner, caching, padding, init and errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from llmbook.model import GPT, PRESETS, Block, ModelConfig
from llmbook.planning import count_params

FP32 = {"atol": 1e-5, "rtol": 1e-5}
SMALL = ["gpt-tiny", "llama-tiny"]  # GPT-2 style and Llama style (GQA, RoPE, SwiGLU, RMSNorm)


pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_matches_planner(name):
    cfg = PRESETS[name]
    with torch.device("meta"):  # no memory for the billions of weights
        model = GPT(cfg)
    counts = count_params(cfg.to_shape(name))
    assert model.num_params() == counts.total
    assert model.num_params(non_embedding=True) == counts.non_embedding


def test_preset_sizes():
    n = {name: count_params(cfg.to_shape()).total for name, cfg in PRESETS.items()}
    assert round(n["gpt2-124M"] / 1e6) == 124 and round(n["llama2-7B"] / 1e9, 1) == 6.7
    assert 1e6 <= n["laptop-gpt"] <= 3e6 and 1e6 <= n["laptop-llama"] <= 3e6
    gpt, llama = PRESETS["laptop-gpt"], PRESETS["laptop-llama"]
    assert (gpt.d_model, gpt.n_layers, gpt.vocab_size) == (llama.d_model, llama.n_layers, llama.vocab_size)
    assert ModelConfig.preset("gpt-tiny", dropout=0.1).dropout == 0.1 and PRESETS["gpt-tiny"].dropout == 0.0
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("gpt-5")


@pytest.mark.parametrize("name", SMALL + ["shakespeare-char"])
def test_untrained_loss_is_log_vocab(name):
    model = GPT.from_preset(name).eval()
    V, T = model.cfg.vocab_size, model.cfg.context_length
    idx, targets = torch.randint(0, V, (4, T)), torch.randint(0, V, (4, T))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, T, V)
    assert abs(loss.item() - math.log(V)) < 0.1
    targets[:, ::2] = -100  # ignored positions
    _, loss_half = model(idx, targets)
    assert abs(loss_half.item() - math.log(V)) < 0.1
    assert model(idx)[1] is None


@pytest.mark.parametrize("name", SMALL)
def test_kv_cache_token_by_token_equals_full_forward(name):
    model = GPT.from_preset(name).eval()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 12))
    full, _ = model(idx)
    caches = model.new_caches(2, max_len=12)
    parts = [model(idx[:, :5], caches=caches)[0]]  # a prompt at once, then one token at a time
    parts += [model(idx[:, t : t + 1], caches=caches)[0] for t in range(5, 12)]
    assert caches[0].length == 12
    assert_close(torch.cat(parts, dim=1), full, **FP32)


@pytest.mark.parametrize("name", SMALL)
def test_left_padding_with_mask_and_positions(name):
    model = GPT.from_preset(name).eval()
    seq = torch.randint(1, model.cfg.vocab_size, (1, 6))
    alone, _ = model(seq)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], dim=1)  # (1, 9): 3 pads, then the sequence
    mask = torch.tensor([[False] * 3 + [True] * 6])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [0, 0, 0, 0, 1, 2, 3, 4, 5]
    out, _ = model(padded, positions=positions, mask=mask)
    assert_close(out[:, 3:], alone, **FP32)
    if model.cfg.positions == "learned":  # without explicit positions, learned embeddings are shifted by the pads
        shifted, _ = model(padded, mask=mask)
        assert not torch.allclose(shifted[:, 3:], alone, atol=1e-4)


def test_tied_embeddings_share_storage():
    tied, untied = GPT.from_preset("gpt-tiny"), GPT.from_preset("gpt-tiny", tied_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    V, d = tied.cfg.vocab_size, tied.cfg.d_model
    assert untied.num_params() - tied.num_params() == V * d
    with torch.no_grad():
        tied.tok_emb.weight[0, 0] = 42.0
    assert tied.lm_head.weight[0, 0].item() == 42.0


def test_postnorm_runs_and_differs():
    pre = GPT.from_preset("gpt-tiny").eval()
    torch.manual_seed(0)
    post = GPT.from_preset("gpt-tiny", prenorm=False).eval()
    post.load_state_dict(pre.state_dict())  # same weights, only the wiring differs
    idx = torch.randint(0, 256, (2, 10))
    y_pre, y_post = pre(idx)[0], post(idx)[0]
    assert torch.isfinite(y_post).all()
    assert not torch.allclose(y_pre, y_post, atol=1e-3)
    x = torch.randn(2, 10, 64) * 5
    block = post.blocks[0]
    out = block(x)
    assert_close(out.mean(-1), torch.zeros(2, 10), atol=1e-4, rtol=0)  # post-norm ends on a LayerNorm


def test_block_wiring():
    block = Block(ModelConfig.preset("llama-tiny"), layer=1).eval()
    assert block.layer == 1 and block.attn.rope is not None and block.attn.n_kv_heads == 2
    x = torch.randn(2, 7, 64)
    expected = x + block.attn(block.norm1(x))
    expected = expected + block.mlp(block.norm2(expected))
    assert_close(block(x), expected)


def test_clear_errors():
    model = GPT.from_preset("gpt-tiny")
    with pytest.raises(ValueError, match=r"65.*context_length=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    caches = model.new_caches(1)
    model(torch.zeros(1, 60, dtype=torch.long), caches=caches)
    with pytest.raises(ValueError, match=r"5 new tokens after 60 cached"):
        model(torch.zeros(1, 5, dtype=torch.long), caches=caches)
    with pytest.raises(ValueError, match="vocab_size=256"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="vocab_size=256"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(d_model=64, n_heads=5)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(d_model=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="norm"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig(vocab_size=0)


def test_init_std():
    cfg = ModelConfig.preset("gpt-tiny", d_model=256, n_layers=6, n_heads=4, tied_embeddings=False)
    model = GPT(cfg)
    resid = 0.02 / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            assert abs(p.std().item() - resid) < 0.1 * resid, name
        elif name.endswith(("qkv.weight", "fc.weight", "tok_emb.weight", "pos_emb.weight", "lm_head.weight")):
            assert abs(p.std().item() - 0.02) < 0.002, name
        elif name.endswith("bias") and "norm" not in name:
            assert (p == 0).all(), name
    llama = GPT.from_preset("llama-tiny", d_model=256, n_heads=4, n_layers=4)
    down = llama.blocks[0].mlp.down.weight
    assert abs(down.std().item() - 0.02 / math.sqrt(8)) < 0.1 * 0.02 / math.sqrt(8)


def test_dropout_only_in_training():
    model = GPT.from_preset("gpt-tiny", dropout=0.2)
    idx = torch.randint(0, 256, (2, 8))
    assert not torch.allclose(model(idx)[0], model(idx)[0])
    model.eval()
    assert_close(model(idx)[0], model(idx)[0])


def test_backward_reaches_every_parameter():
    for name in SMALL:
        model = GPT.from_preset(name)
        idx = torch.randint(0, model.cfg.vocab_size, (2, 8))
        model(idx, idx)[1].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", SMALL)
def test_fused_kernels_same_loss_and_gradients(name):
    """use_fused_kernels swaps every norm and activation for PyTorch's kernel; the model computes the same."""
    ours = GPT.from_preset(name)
    fused = GPT(ours.cfg)
    fused.load_state_dict(ours.state_dict())
    assert fused.use_fused_kernels() is fused
    flags = [m.fused for m in fused.modules() if hasattr(m, "fused")]
    assert len(flags) >= 2 * ours.cfg.n_layers + 1 and all(flags)  # two norms per block, the final norm, ...
    assert not any(m.fused for m in ours.modules() if hasattr(m, "fused"))  # from scratch unless asked
    idx = torch.randint(0, ours.cfg.vocab_size, (2, 16))
    losses = []
    for model in (ours, fused):
        _, loss = model(idx, idx.roll(-1, dims=1))
        loss.backward()
        losses.append(loss)
    assert_close(losses[0], losses[1], **FP32)
    for (name_, a), b in zip(ours.named_parameters(), fused.parameters(), strict=True):
        assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name_)
    fused.use_fused_kernels(False)
    assert not any(m.fused for m in fused.modules() if hasattr(m, "fused"))


def test_attention_dropout_is_separate_from_dropout():
    """attention_dropout=0 keeps the other dropouts but none on the attention probabilities (SDPA's fast path)."""
    cfg = ModelConfig.preset("gpt-tiny", dropout=0.1, attention_dropout=0.0)
    model = GPT(cfg)
    assert all(block.attn.dropout == 0.0 for block in model.blocks)
    assert all(block.drop.p == 0.1 for block in model.blocks)
    assert all(block.attn.dropout == 0.1 for block in GPT(ModelConfig.preset("gpt-tiny", dropout=0.1)).blocks)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="attention_dropout"):
            ModelConfig.preset("gpt-tiny", attention_dropout=bad)
