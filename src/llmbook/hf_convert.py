"""Move weights between our ``GPT`` and Hugging Face's GPT-2 and Llama models.

A checkpoint is a dict from names to tensors, so converting is renaming, plus
two changes of layout:

    GPT-2   HF's ``Conv1D`` stores weights as (in, out), ``nn.Linear`` as (out, in): transpose
            c_attn, c_proj and c_fc. c_attn is already q, k, v fused in our order.
    Llama   q_proj, k_proj, v_proj are three matrices; ours is one, ``attn.qkv``: concatenate.
            HF's RoPE (``rotate_half``) pairs x[i] with x[i + d/2], our default, so no permutation.

Keeping HF's names here, and nowhere else, lets the model use names that say
what a tensor is (``attn.qkv``, ``mlp.fc``). Matching logits to 1e-5 against
``transformers`` (tests/test_hf_convert.py) is the proof that our model *is*
GPT-2 and Llama. ``transformers`` is imported inside the functions only: the
rest of the package does not need it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmbook.model import GPT, ModelConfig

# buffers some transformers versions keep in the state dict; they follow from the config
_DERIVED_HF_KEYS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def _take(sd: dict[str, Tensor], key: str) -> Tensor:
    try:
        return sd.pop(key)
    except KeyError:
        raise KeyError(f"the checkpoint has no {key!r}; is it the architecture the config says?") from None


def _check_consumed(rest: dict[str, Tensor]) -> None:
    left = [k for k in rest if not k.endswith(_DERIVED_HF_KEYS)]
    if left:
        raise ValueError(f"{len(left)} checkpoint tensors were not converted: {left[:8]}")


def _check_style(cfg: ModelConfig, style: str) -> None:
    if style == "gpt2":
        want = dict(norm="layernorm", mlp="gelu", positions="learned", prenorm=True, bias=True, tied_embeddings=True)
    else:
        want = dict(norm="rmsnorm", mlp="swiglu", positions="rope", prenorm=True)
    wrong = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if wrong:
        raise ValueError(f"this config is not {style}-style: it has {wrong}, {style} needs {want}")


# --- GPT-2 ------------------------------------------------------------------------------------------------------------

# (ours, HF's, transpose?) for every tensor of block N
_GPT2_BLOCK = [
    ("norm1.weight", "ln_1.weight", False), ("norm1.bias", "ln_1.bias", False),
    ("attn.qkv.weight", "attn.c_attn.weight", True), ("attn.qkv.bias", "attn.c_attn.bias", False),
    ("attn.proj.weight", "attn.c_proj.weight", True), ("attn.proj.bias", "attn.c_proj.bias", False),
    ("norm2.weight", "ln_2.weight", False), ("norm2.bias", "ln_2.bias", False),
    ("mlp.fc.weight", "mlp.c_fc.weight", True), ("mlp.fc.bias", "mlp.c_fc.bias", False),
    ("mlp.proj.weight", "mlp.c_proj.weight", True), ("mlp.proj.bias", "mlp.c_proj.bias", False),
]
_GPT2_TOP = [("tok_emb.weight", "transformer.wte.weight"), ("pos_emb.weight", "transformer.wpe.weight"),
             ("norm_f.weight", "transformer.ln_f.weight"), ("norm_f.bias", "transformer.ln_f.bias")]


def gpt2_state_dict_from_hf(hf_sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """``GPT2LMHeadModel.state_dict()`` -> our ``GPT(cfg).state_dict()``; raises if anything is left over."""
    _check_style(cfg, "gpt2")
    rest, sd = dict(hf_sd), {}
    for ours, theirs in _GPT2_TOP:
        sd[ours] = _take(rest, theirs)
    for n in range(cfg.n_layers):
        for ours, theirs, transpose in _GPT2_BLOCK:
            w = _take(rest, f"transformer.h.{n}.{theirs}")
            sd[f"blocks.{n}.{ours}"] = w.t().contiguous() if transpose else w  # Conv1D (in, out) -> (out, in)
    rest.pop("lm_head.weight", None)  # tied: the same tensor as wte
    sd["lm_head.weight"] = sd["tok_emb.weight"]
    _check_consumed(rest)
    return sd


def gpt2_state_dict_to_hf(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our GPT-2-style state dict -> ``GPT2LMHeadModel``'s names and Conv1D layouts."""
    _check_style(cfg, "gpt2")
    hf = {theirs: sd[ours] for ours, theirs in _GPT2_TOP}
    for n in range(cfg.n_layers):
        for ours, theirs, transpose in _GPT2_BLOCK:
            w = sd[f"blocks.{n}.{ours}"]
            hf[f"transformer.h.{n}.{theirs}"] = w.t().contiguous() if transpose else w
    hf["lm_head.weight"] = sd["tok_emb.weight"]
    return hf


# --- Llama ------------------------------------------------------------------------------------------------------------

_LLAMA_BLOCK = [
    ("norm1.weight", "input_layernorm.weight"), ("norm2.weight", "post_attention_layernorm.weight"),
    ("attn.proj.weight", "self_attn.o_proj.weight"), ("attn.proj.bias", "self_attn.o_proj.bias"),
    ("mlp.gate.weight", "mlp.gate_proj.weight"), ("mlp.gate.bias", "mlp.gate_proj.bias"),
    ("mlp.up.weight", "mlp.up_proj.weight"), ("mlp.up.bias", "mlp.up_proj.bias"),
    ("mlp.down.weight", "mlp.down_proj.weight"), ("mlp.down.bias", "mlp.down_proj.bias"),
]


def llama_state_dict_from_hf(hf_sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """``LlamaForCausalLM.state_dict()`` -> ours: q, k, v stacked into one qkv matrix, the rest renamed."""
    _check_style(cfg, "llama")
    rest = dict(hf_sd)
    sd = {"tok_emb.weight": _take(rest, "model.embed_tokens.weight")}
    for n in range(cfg.n_layers):
        pre = f"model.layers.{n}."
        for part in ("weight", "bias") if cfg.bias else ("weight",):
            # q (d, d), k and v (kv_dim, d) -> qkv (d + 2·kv_dim, d): the order attention splits them in
            qkv = [_take(rest, f"{pre}self_attn.{p}_proj.{part}") for p in "qkv"]
            sd[f"blocks.{n}.attn.qkv.{part}"] = torch.cat(qkv, dim=0)
        for ours, theirs in _LLAMA_BLOCK:
            if theirs.endswith(".bias") and not cfg.bias:
                continue
            sd[f"blocks.{n}.{ours}"] = _take(rest, pre + theirs)
    sd["norm_f.weight"] = _take(rest, "model.norm.weight")
    if cfg.tied_embeddings:
        rest.pop("lm_head.weight", None)
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    else:
        sd["lm_head.weight"] = _take(rest, "lm_head.weight")
    _check_consumed(rest)
    return sd


def llama_state_dict_to_hf(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our Llama-style state dict -> ``LlamaForCausalLM``'s: qkv split back into q_proj, k_proj, v_proj."""
    _check_style(cfg, "llama")
    d, kv_dim = cfg.d_model, cfg.kv_heads * cfg.head_dim
    hf = {"model.embed_tokens.weight": sd["tok_emb.weight"]}
    for n in range(cfg.n_layers):
        pre = f"model.layers.{n}."
        for part in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = sd[f"blocks.{n}.attn.qkv.{part}"].split([d, kv_dim, kv_dim], dim=0)
            for name, t in zip("qkv", (q, k, v), strict=True):
                hf[f"{pre}self_attn.{name}_proj.{part}"] = t.contiguous()
        for ours, theirs in _LLAMA_BLOCK:
            if theirs.endswith(".bias") and not cfg.bias:
                continue
            hf[pre + theirs] = sd[f"blocks.{n}.{ours}"]
    hf["model.norm.weight"] = sd["norm_f.weight"]
    hf["lm_head.weight"] = sd["tok_emb.weight" if cfg.tied_embeddings else "lm_head.weight"]
    return hf


# --- Whole models -----------------------------------------------------------------------------------------------------


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if params.get("rope_type", params.get("type", "default")) != "default":
        raise ValueError(f"RoPE scaling {params} is not supported: only the original (default) RoPE")
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def config_from_hf(hf_config) -> ModelConfig:
    """Our ``ModelConfig`` for a ``transformers`` ``GPT2Config`` or ``LlamaConfig``."""
    kind = hf_config.model_type
    if kind == "gpt2":
        if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"our MLP uses the tanh GELU; got activation {hf_config.activation_function!r}")
        if not hf_config.tie_word_embeddings or hf_config.scale_attn_by_inverse_layer_idx:
            raise ValueError("only GPT-2 with tied embeddings and the usual 1/sqrt(head_dim) attention scale")
        return ModelConfig(
            vocab_size=hf_config.vocab_size, context_length=hf_config.n_positions, d_model=hf_config.n_embd,
            n_layers=hf_config.n_layer, n_heads=hf_config.n_head, d_ff=hf_config.n_inner,
            dropout=hf_config.resid_pdrop, norm_eps=hf_config.layer_norm_epsilon,
        )
    if kind == "llama":
        c = hf_config
        if c.hidden_act != "silu" or getattr(c, "mlp_bias", False) != getattr(c, "attention_bias", False):
            raise ValueError("only silu and the same bias setting for attention and MLP are supported")
        if getattr(c, "head_dim", None) not in (None, c.hidden_size // c.num_attention_heads):
            raise ValueError(f"head_dim {c.head_dim} != hidden_size / num_attention_heads is not supported")
        kv = c.num_key_value_heads
        return ModelConfig(
            vocab_size=c.vocab_size, context_length=c.max_position_embeddings, d_model=c.hidden_size,
            n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
            n_kv_heads=None if kv in (None, c.num_attention_heads) else kv, d_ff=c.intermediate_size,
            norm="rmsnorm", mlp="swiglu", positions="rope", bias=bool(getattr(c, "attention_bias", False)),
            tied_embeddings=bool(c.tie_word_embeddings), dropout=float(c.attention_dropout),
            rope_theta=_rope_theta(c), norm_eps=c.rms_norm_eps,
        )
    raise ValueError(f"unsupported model type {kind!r}: only 'gpt2' and 'llama'")


def hf_config_from_config(cfg: ModelConfig):
    """The ``transformers`` config of the same architecture (GPT-2 or Llama style), eager attention."""
    import transformers

    if cfg.positions == "learned":
        _check_style(cfg, "gpt2")
        special = min(50256, cfg.vocab_size - 1)  # GPT-2's <|endoftext|>, kept inside small vocabularies
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=cfg.d_ff, activation_function="gelu_new", resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=cfg.norm_eps,
            bos_token_id=special, eos_token_id=special, tie_word_embeddings=True, attn_implementation="eager",
        )
    _check_style(cfg, "llama")
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context_length, hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.ff_dim, hidden_act="silu", attention_bias=cfg.bias, mlp_bias=cfg.bias,
        tie_word_embeddings=cfg.tied_embeddings, attention_dropout=cfg.dropout, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps, bos_token_id=min(1, cfg.vocab_size - 1), eos_token_id=min(2, cfg.vocab_size - 1),
        attn_implementation="eager",
    )


def from_hf(hf_model) -> GPT:
    """Our ``GPT`` with the weights of a ``GPT2LMHeadModel`` or ``LlamaForCausalLM``, in its train/eval mode."""
    cfg = config_from_hf(hf_model.config)
    convert = gpt2_state_dict_from_hf if cfg.positions == "learned" else llama_state_dict_from_hf
    model = GPT(cfg)
    model.load_state_dict(convert(hf_model.state_dict(), cfg), strict=True)  # strict: every tensor must match
    return model.train(hf_model.training)


def to_hf(model: GPT):
    """A ``transformers`` model (built offline from a config) holding ``model``'s weights."""
    import transformers

    cfg = model.cfg
    hf_config = hf_config_from_config(cfg)
    if cfg.positions == "learned":
        hf_model, convert = transformers.GPT2LMHeadModel(hf_config), gpt2_state_dict_to_hf
    else:
        hf_model, convert = transformers.LlamaForCausalLM(hf_config), llama_state_dict_to_hf
    result = hf_model.load_state_dict(convert(model.state_dict(), cfg), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(_DERIVED_HF_KEYS)]
    if missing or result.unexpected_keys:
        raise ValueError(f"conversion mismatch: missing {missing}, unexpected {result.unexpected_keys}")
    return hf_model.train(model.training)


def load_pretrained_gpt2(name: str = "gpt2") -> GPT:
    """OpenAI's GPT-2 weights in our model; needs the network (or a filled Hugging Face cache).

    ``name`` is a Hub id: "gpt2" (124M), "gpt2-medium" (355M), "gpt2-large" (774M), "gpt2-xl" (1.5B),
    matching the presets "gpt2-124M" ... "gpt2-1.5B". The Hub checkpoints have dropout 0.1 in their
    config; the returned model is in eval mode, where dropout is off.
    """
    import transformers

    hf_model = transformers.GPT2LMHeadModel.from_pretrained(name)
    return from_hf(hf_model).eval()
