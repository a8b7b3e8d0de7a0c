"""Weight quantization from scratch (llmbook.inference.quantize) and PyTorch's own (llmbook.inference.torch_quant)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from llmbook.bpe.tokenizer import Tokenizer
from llmbook.inference.quantize import (
    Int4Linear,
    Int8Linear,
    dequantize_groupwise,
    dequantize_int4,
    dequantize_int8,
    error_vs_bits,
    linear_nbytes,
    measure_quantized,
    model_nbytes,
    pack_int4,
    quantization_error,
    quantize_groupwise,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantize_per_channel,
    unpack_int4,
)
from llmbook.inference.torch_quant import agreement, serialized_nbytes, torch_dynamic_int8
from llmbook.model import GPT, ModelConfig

SLOP = 1e-6  # float rounding on top of the bounds below (relative)


def _weight(out_f: int = 48, in_f: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[3, 7] = 0.5  # an outlier: the reason for small groups
    w[5] = 0.0  # an all-zero row
    w[6, :] = w[6, :].abs()  # a row with no negative weight
    return w


def _llama(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.preset("llama-tiny", **kw)).eval()


# ---------------------------------------------------------------------- tensors


def test_int8_round_trip_within_half_a_step_per_element():
    w = _weight()
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (w.shape[0],)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127  # the largest weight of a row maps to ±127
    err = (dequantize_int8(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + SLOP)).all())
    assert bool((dequantize_int8(q, scale)[5] == 0).all())  # a zero row stays zero


def test_int8_codes_equal_torch_quantize_per_channel_with_the_same_scales():
    w = _weight()
    q, scale = quantize_int8(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.quantize_per_channel(w, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    assert torch.equal(ref.int_repr(), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("group_size", [16, 32])
def test_groupwise_round_trip_within_half_a_step_and_zero_exact(bits, group_size):
    w = _weight()
    w[0, 0] = 0.0
    codes, scale, zero = quantize_groupwise(w, bits, group_size)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert scale.dtype == torch.float16 and scale.shape == (w.shape[0], w.shape[1] // group_size)
    wq = dequantize_groupwise(codes, scale, zero)
    step = scale.float().repeat_interleave(group_size, dim=1)  # (out, in)
    assert bool(((wq - w).abs() <= step / 2 * (1 + SLOP) + 1e-12).all())
    assert wq[0, 0] == 0 and bool((wq[5] == 0).all())


def test_int4_packing_is_exact_and_low_nibble_first():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (7, 64), generator=g, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert pack_int4(torch.tensor([[1, 2]], dtype=torch.uint8)).item() == 0x21
    w = _weight()
    packed, scale, zero = quantize_int4(w, 32)
    assert torch.equal(dequantize_int4(packed, scale, zero), dequantize_groupwise(*quantize_groupwise(w, 4, 32)))


def test_error_falls_with_bits_and_groups_beat_rows_at_low_bits():
    w = _weight(64, 128)
    rows = error_vs_bits(w, (2, 3, 4, 6, 8), 32)
    for scheme in ("per_channel", "group"):
        errs = [r[scheme] for r in rows]
        assert errs == sorted(errs, reverse=True)
    assert rows[2]["group"] < rows[2]["per_channel"]  # 4 bits: the outlier hurts only its group
    assert rows[-1]["per_channel"] < 0.01
    assert quantization_error(w, "int8") == rows[-1]["per_channel"]
    assert quantization_error(w, "int4", group_size=32) == rows[2]["group"]
    assert rows[2]["bits_per_weight_group"] == 4.75


# ---------------------------------------------------------------------- layers


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_linear_is_the_dequantized_matmul_and_near_the_float_one(kind, bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 48, bias=bias)
    x = torch.randn(2, 5, 96)
    layer = Int8Linear.from_linear(lin) if kind == "int8" else Int4Linear.from_linear(lin, 32)
    assert list(layer.parameters()) == []  # buffers only: nothing to train
    w = layer.dequantized()
    expected = x @ w.T + (lin.bias.detach() if bias else 0)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
        # |x · (w - w_q)| <= sum_j |x_j| · step_i / 2 for output i
        step = layer.scale.float() if kind == "int8" else layer.scale.float().amax(dim=1)  # (out,)
        bound = x.abs().sum(-1, keepdim=True) * step / 2  # (2, 5, out)
        assert bool(((layer(x) - lin(x)).abs() <= bound * (1 + 1e-4) + 1e-6).all())
    if bias:
        assert layer.bias.dtype == torch.float32 and torch.equal(layer.bias, lin.bias.detach())


def test_int4_linear_pads_a_partial_last_group():
    torch.manual_seed(0)
    lin = nn.Linear(40, 8)  # 40 = one group of 32 + 8
    layer = Int4Linear.from_linear(lin, 32)
    assert layer.qweight.shape == (8, 32) and layer.scale.shape == (8, 2)
    w = layer.dequantized()
    assert w.shape == (8, 40)
    # the first group quantized exactly as on its own
    assert torch.equal(w[:, :32], dequantize_groupwise(*quantize_groupwise(lin.weight[:, :32], 4, 32)))
    assert torch.equal(w[:, 32:], dequantize_groupwise(*quantize_groupwise(lin.weight[:, 32:], 4, 8)))
    x = torch.randn(3, 40)
    assert torch.equal(layer(x), x @ w.T + lin.bias.detach())


# ---------------------------------------------------------------------- models


def test_quantize_model_copies_replaces_the_block_linears_and_keeps_logits_close():
    model = _llama()  # Llama style: no biases, an untied head
    before = copy.deepcopy(model.state_dict())
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = model(ids)
    for scheme, rel in (("int8", 0.01), ("int4", 0.1)):
        q = quantize_model(model, scheme, group_size=32)
        replaced = {n for n, m in q.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        assert replaced == linears - {"lm_head"} and all(n.startswith("blocks.") for n in replaced)
        assert type(q.lm_head) is nn.Linear and torch.equal(q.lm_head.weight, model.lm_head.weight)
        with torch.no_grad():
            logits, _ = q(ids)
        assert float((logits - ref).norm() / ref.norm()) < rel
        assert isinstance(quantize_model(model, scheme, skip=()).lm_head, (Int8Linear, Int4Linear))
        assert isinstance(quantize_model(model, scheme, skip=("blocks.0.*", "lm_head")).blocks[0].attn.qkv, nn.Linear)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the original is untouched
    assert all(type(m) is nn.Linear for m in model.modules() if "Linear" in type(m).__name__)


def test_tied_head_stays_float_and_tied():
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("gpt-tiny")).eval()  # GPT-2 style: the head is the embedding
    q = quantize_model(model, "int4", skip=())
    assert type(q.lm_head) is nn.Linear and q.lm_head.weight is q.tok_emb.weight
    assert q.tok_emb.weight is not model.tok_emb.weight
    # with biases: Int8Linear keeps them in float
    assert q.blocks[0].attn.qkv.bias.dtype == torch.float32


def test_generate_runs_on_quantized_models():
    from llmbook.generate import generate

    model = _llama()
    q = quantize_model(model, "int8")
    out = generate(q, [[1, 2, 3]], 6, temperature=0.0)
    assert len(out[0]) == 6


def test_model_nbytes_shrinks_the_linears_by_the_expected_factors():
    model = _llama(d_model=128, n_heads=4, n_kv_heads=4, d_ff=256, vocab_size=256)
    shapes = [(m.out_features, m.in_features) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n != "lm_head"]
    n_weights = sum(o * i for o, i in shapes)
    f32 = model_nbytes(model)
    assert f32 == 4 * model.num_params() + sum(b.numel() * b.element_size() for b in model.buffers())
    q8, q4 = quantize_model(model, "int8"), quantize_model(model, "int4", group_size=32)
    head = 4 * model.lm_head.weight.numel()
    assert linear_nbytes(model) == 4 * n_weights + head
    # int8: 1 byte per weight + a float32 scale per row
    assert linear_nbytes(q8) - head == n_weights + 4 * sum(o for o, _ in shapes)
    # int4: half a byte per weight + float16 scale and uint8 zero per group of 32
    assert linear_nbytes(q4) - head == n_weights // 2 + 3 * n_weights // 32
    assert 3.85 < 4 * n_weights / (linear_nbytes(q8) - head) < 4  # 4 / (1 + 4/in_features)
    assert 6.7 < 4 * n_weights / (linear_nbytes(q4) - head) < 6.8  # 32 / 4.75 bits
    assert model_nbytes(q8) == f32 - (linear_nbytes(model) - linear_nbytes(q8))
    assert model_nbytes(q4) < model_nbytes(q8) < f32


# ---------------------------------------------------------------------- PyTorch's quantization


def test_torch_dynamic_int8_agrees_with_ours():
    model = _llama()
    res = torch_dynamic_int8(model)
    if res.model is None:  # a torch without torch.ao.quantization: a clear note instead
        assert res.note.startswith("skipped:")
        pytest.skip(res.note)
    assert res.note is None
    names = {n for n, m in res.model.named_modules() if "DynamicQuantized" in type(m).__name__
             or type(m).__module__.startswith("torch.ao.nn.quantized.dynamic")}
    assert names == {n for n, m in quantize_model(model, "int8").named_modules() if isinstance(m, Int8Linear)}
    assert res.nbytes < 0.7 * serialized_nbytes(model)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    ours = quantize_model(model, "int8")
    agree = agreement(res.model, ours, ids)
    assert agree.max_logit_diff < 0.05 and agree.same_argmax >= 0.9
    assert agreement(model, model, ids).max_logit_diff == 0.0
    from llmbook.generate import generate

    assert len(generate(res.model, [[1, 2, 3]], 4, temperature=0.0)[0]) == 4  # the float cache repair


def test_measure_quantized_table():
    model = _llama(vocab_size=264)
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    texts = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer."]
    threads = torch.get_num_threads()
    rows = measure_quantized(model, tok, texts, new_tokens=8, repeats=1, threads=1)
    assert torch.get_num_threads() == threads
    assert [r["scheme"] for r in rows] == ["fp32", "int8", "int4", "torch-int8"]
    assert rows[0]["delta_bpb"] == 0 and rows[0]["same_argmax"] == 1 and rows[0]["max_logit_diff"] == 0
    assert rows[0]["greedy_prefix"] == 8 and all(0 <= r["greedy_prefix"] <= 8 for r in rows)
    assert rows[1]["same_argmax"] > 0.9 and 0 < rows[1]["max_logit_diff"] < 0.05
    assert abs(rows[1]["delta_bpb"]) < 0.01
    assert rows[2]["bytes"] < rows[1]["bytes"] < rows[0]["bytes"]
    assert all(r["tokens_per_s"] > 0 for r in rows if r["note"] is None)


# ---------------------------------------------------------------------- bad input


def test_bad_input_is_one_clear_line():
    model = _llama()
    with pytest.raises(ValueError, match="unknown scheme 'int3'"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match=r"group_size=32 does not divide in_features=40"):
        quantize_int4(torch.randn(4, 40), 32)
    with pytest.raises(ValueError, match="positive even integer"):
        quantize_model(model, "int4", group_size=7)
    with pytest.raises(ValueError, match="even to pack"):
        quantize_int4(torch.randn(4, 42), 21)
    with pytest.raises(ValueError, match=r"bits must be an integer in 2\.\.8"):
        quantize_per_channel(torch.randn(4, 8), 1)
    with pytest.raises(ValueError, match="float weight matrix"):
        quantize_int8(torch.randn(4))
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="unknown schemes"):
        measure_quantized(model, None, ["x"], schemes=("fp16",))
    with pytest.raises(ValueError, match="unknown scheme"):
        quantization_error(torch.randn(4, 8), "fp8")


def test_quantized_state_dict_round_trips():
    model = _llama()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    for scheme in ("int8", "int4"):
        q = quantize_model(model, scheme)
        torch.manual_seed(1)
        fresh = quantize_model(GPT(ModelConfig.preset("llama-tiny")).eval(), scheme)  # other weights, same layout
        fresh.load_state_dict(q.state_dict())
        assert fresh.blocks[0].mlp.down.qweight.dtype == (torch.int8 if scheme == "int8" else torch.uint8)
        with torch.no_grad():
            assert torch.equal(fresh(ids)[0], q(ids)[0])
