"""Our GPT against Hugging Face's GPT-2 and Llama: same weights, same logits (offline, random tiny models)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.testing import assert_close

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network: models are built from configs
transformers = pytest.importorskip("transformers")

from llmbook.hf_convert import (  # noqa: E402
    config_from_hf,
    from_hf,
    gpt2_state_dict_from_hf,
    hf_config_from_config,
    llama_state_dict_from_hf,
    to_hf,
)
from llmbook.model import GPT, ModelConfig  # noqa: E402

LOGITS = {"atol": 1e-5, "rtol": 1e-5}


pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py


def tiny_hf_gpt2():
    config = transformers.GPT2Config(
        vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=99, eos_token_id=99,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_hf_llama(**overrides):
    kw = dict(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=172, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, attn_implementation="eager", bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**kw, **overrides})).eval()
    with torch.no_grad():  # HF initializes norm weights to 1: make them random so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(hf_model, idx):
    with torch.no_grad():
        return hf_model(idx).logits


def ours_logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("make", [tiny_hf_gpt2, tiny_hf_llama])
def test_from_hf_same_logits(make):
    hf = make()
    ours = from_hf(hf).eval()
    idx = torch.randint(0, 100, (2, 17))
    assert_close(ours_logits(ours, idx), hf_logits(hf, idx), **LOGITS)


@pytest.mark.parametrize("make", [tiny_hf_gpt2, tiny_hf_llama])
def test_to_hf_same_logits(make):
    cfg = config_from_hf(make().config)
    ours = GPT(cfg).eval()
    with torch.no_grad():  # our init leaves norms at 1 and biases at 0: perturb everything
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    hf = to_hf(ours).eval()
    assert type(hf).__name__ in ("GPT2LMHeadModel", "LlamaForCausalLM")
    idx = torch.randint(0, 100, (3, 11))
    assert_close(hf_logits(hf, idx), ours_logits(ours, idx), **LOGITS)
    back = from_hf(hf).eval()  # and back again, bit for bit
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_llama_config_matches_our_style():
    cfg = config_from_hf(tiny_hf_llama().config)
    expected = ModelConfig.preset(
        "llama-tiny", vocab_size=100, context_length=64, norm_eps=1e-6
    )  # the same architecture as our Llama-style preset
    assert cfg == expected
    assert (cfg.kv_heads, cfg.ff_dim, cfg.rope_theta, cfg.tied_embeddings) == (2, 172, 10000.0, False)


def test_gpt2_config_matches_our_style():
    cfg = config_from_hf(tiny_hf_gpt2().config)
    assert cfg == ModelConfig.preset("gpt-tiny", vocab_size=100, context_length=32)


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig.preset("gpt-tiny"),
        ModelConfig.preset("gpt-tiny", d_ff=100, dropout=0.1, norm_eps=1e-6),
        ModelConfig.preset("llama-tiny"),
        ModelConfig.preset("llama-tiny", rope_theta=500000.0, tied_embeddings=True, n_kv_heads=None),
        ModelConfig.preset("llama2-7B"),
        ModelConfig.preset("tinyllama-1.1B"),
        ModelConfig.preset("gpt2-1.5B"),
    ],
    ids=lambda c: f"{c.positions}-{c.d_model}-{c.n_kv_heads}",
)
def test_config_round_trip(cfg):
    hf_config = hf_config_from_config(cfg)
    assert config_from_hf(hf_config) == cfg
    # and HF -> ours -> HF keeps the numbers that matter
    again = hf_config_from_config(config_from_hf(hf_config)).to_dict()
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "n_positions",
                "num_key_value_heads", "intermediate_size", "n_inner", "rms_norm_eps", "layer_norm_epsilon"):
        assert again.get(key) == hf_config.to_dict().get(key), key


@pytest.mark.parametrize("make, convert", [(tiny_hf_gpt2, gpt2_state_dict_from_hf),
                                           (tiny_hf_llama, llama_state_dict_from_hf)])
def test_state_dict_fully_consumed(make, convert):
    hf = make()
    cfg = config_from_hf(hf.config)
    sd = convert(hf.state_dict(), cfg)
    assert set(sd) == set(GPT(cfg).state_dict())  # no missing, no unexpected keys
    result = GPT(cfg).load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    extra = dict(hf.state_dict())
    extra["transformer.h.9.mlp.c_fc.weight" if cfg.positions == "learned" else "model.layers.9.mlp.up_proj.weight"] = (
        torch.zeros(1)
    )
    with pytest.raises(ValueError, match="not converted"):
        convert(extra, cfg)
    missing = dict(hf.state_dict())
    missing.pop(next(k for k in missing if "layers.1." in k or "h.1." in k))
    with pytest.raises(KeyError, match="has no"):
        convert(missing, cfg)
    hf_sd = hf.state_dict()
    convert(hf_sd, cfg)
    assert set(hf_sd) == set(hf.state_dict())  # the caller's dict is left alone


def test_unsupported_configs_are_rejected():
    with pytest.raises(ValueError, match="GELU"):
        config_from_hf(transformers.GPT2Config(activation_function="relu"))
    with pytest.raises(ValueError, match="not llama-style"):
        hf_config_from_config(ModelConfig.preset("llama-tiny", mlp="gelu"))
    with pytest.raises(ValueError, match="not gpt2-style"):
        hf_config_from_config(ModelConfig.preset("gpt-tiny", prenorm=False))
