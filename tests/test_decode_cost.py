"""llmbook.inference.decode_cost: bytes and FLOPs of a decode step counted by hand, the roofline, the timings."""

from __future__ import annotations

import math

import pytest
import torch

from llmbook.generate import generate
from llmbook.inference import decode_cost as dc
from llmbook.kernels import roofline
from llmbook.model import GPT, ModelConfig


@pytest.fixture(autouse=True)
def one_thread():
    # tiny ops on a shared machine: two threads waiting for each other cost more than they save
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small() -> GPT:
    """GPT-2 style, tied head, learned positions: vocab 32, context 16, width 8, 2 layers of 2 heads of 4 dims."""
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=32, context_length=16, d_model=8, n_layers=2, n_heads=2))


def test_weight_and_kv_bytes_by_hand():
    model = small()
    # tok_emb 32·8 = 256, pos_emb 16·8 = 128, norm_f 16, head tied; per block: 2 LayerNorms 2·16, qkv 8·24+24 = 216,
    # attn proj 8·8+8 = 72, mlp 8·32+32 = 288 and 32·8+8 = 264: 872
    params = 256 + 128 + 16 + 2 * (32 + 216 + 72 + 288 + 264)
    assert model.num_params() == params == 2144
    assert dc.weight_bytes(model) == 4 * 2144
    # a step reads one row of the position table, but all of the token table (it is the output head)
    assert dc.step_weight_bytes(model) == 4 * (2144 - 128 + 8) == 8096
    assert dc.step_weight_bytes(model, batch_size=4) == 8096 + 3 * 8 * 4
    assert dc.kv_bytes_per_token(model) == 2 * 2 * 2 * 4 * 4 == 128  # k and v · layers · heads · head_dim · 4 bytes
    assert dc.kv_bytes_per_token(model, torch.bfloat16) == 64
    assert dc.kv_bytes_per_token(model.to(torch.bfloat16)) == 64  # the model's dtype by default


def test_decode_bytes_with_and_without_cache_by_hand():
    model = small()
    assert dc.decode_bytes_per_token(model, 10) == 8096 + 10 * 128
    # without the cache: weights once, and per layer the naive attention over 10 tokens: q, k, v, out are
    # 2·10·4 values (320 bytes), the scores and probabilities 2·10·10 (800 bytes); scores read 640 write 800,
    # softmax 800 + 800, P @ v read 800 + 320 write 320
    per_layer = (640 + 800) + (800 + 800) + (1120 + 320)
    assert per_layer == roofline.total(roofline.naive_attention_traffic(1, 2, 10, 4)).bytes
    assert dc.decode_bytes_per_token(model, 10, use_cache=False) == 8096 + 2 * per_layer


def test_decode_flops_by_hand():
    model = small()
    # matmul weights: per block qkv 192 + proj 64 + mlp 256 + 256; and the head 256
    assert dc.matmul_weights(model) == 2 * 768 + 256 == 1792
    assert dc.decode_flops_per_token(model, 10) == 2 * 1792 + 2 * 4 * 8 * 10  # q·k and p·v over 10 positions
    # without the cache: 10 tokens through every matmul, the 10 x 10 attention and its softmax (5 FLOPs per score)
    assert dc.decode_flops_per_token(model, 10, use_cache=False) == 10 * 2 * 1792 + 2 * (4 * 8 * 100 + 5 * 2 * 100)


def test_untied_model_reads_one_row_of_its_token_table_and_gqa_shrinks_the_cache():
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("llama-tiny"))  # vocab 256, width 64, 2 layers, 4 heads, 2 k/v heads, RoPE
    assert dc.weight_bytes(model) - dc.step_weight_bytes(model) == (256 - 1) * 64 * 4
    assert dc.kv_bytes_per_token(model) == 2 * 2 * 2 * 16 * 4  # 2 k/v heads, not 4


def test_prediction_follows_the_roofline_formula():
    model = small()
    pred = dc.predicted_tokens_per_s(model, bandwidth=1e9, context_len=10)
    assert pred.bytes_per_step == 9376 and pred.memory_bound == pytest.approx(1e9 / 9376)
    assert pred.compute_bound == math.inf and pred.bound == "memory" and pred.tokens_per_s == pred.memory_bound
    # a batch of 4 shares one read of the weights: 8096 + 3 rows of 32 bytes, and 4 caches of 1280 bytes
    batch = dc.predicted_tokens_per_s(model, bandwidth=1e9, context_len=10, batch_size=4, flops=1e6)
    assert batch.bytes_per_step == 8192 + 4 * 1280
    assert batch.memory_bound == pytest.approx(4 * 1e9 / (8192 + 4 * 1280))
    assert batch.compute_bound == pytest.approx(1e6 / 4224)  # 4 tokens, 4 times the FLOPs
    assert batch.bound == "compute" and batch.tokens_per_s == batch.compute_bound
    assert batch.step_s == pytest.approx(4 / batch.compute_bound)
    no_cache = dc.predicted_tokens_per_s(model, 1e9, 10, flops=1e9, use_cache=False)
    assert no_cache.flops_per_step == 44240 and no_cache.tokens_per_s < pred.tokens_per_s


def test_bad_input_is_refused_with_a_clear_message():
    model = small()
    with pytest.raises(ValueError, match="context_len must be in 1..16"):
        dc.decode_bytes_per_token(model, 17)
    with pytest.raises(ValueError, match="bandwidth and flops must be positive"):
        dc.predicted_tokens_per_s(model, 0, 4)
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        dc.measure_decode(model, 4, 1)
    with pytest.raises(ValueError, match="more than the model's context_length=16"):
        dc.measure_decode(model, 10, 10)


def test_measure_decode_is_sane_and_the_cache_changes_nothing():
    model = small()
    cached = dc.measure_decode(model, prompt_len=5, new_tokens=6, batch_size=2, repeats=2)
    uncached = dc.measure_decode(model, prompt_len=5, new_tokens=6, batch_size=2, repeats=2, use_cache=False)
    for t in (cached, uncached):
        assert t.prefill_s > 0 and t.per_token_s > 0
        assert t.tokens_per_s == pytest.approx(2 / t.per_token_s)
        assert t.prefill_tokens_per_s == pytest.approx(10 / t.prefill_s)
    assert cached.tokens == uncached.tokens
    prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))  # measure_decode's prompt
    assert cached.tokens == generate(model, prompt, 6, temperature=0)
    assert len(cached.tokens) == 2 and all(len(row) == 6 for row in cached.tokens)
    assert model.training  # handed back in the mode it came in


def test_roofline_points_and_the_overhead_fit():
    sizes = (("a", 64, 1), ("b", 128, 2))
    roofs = dc.Roofs(bandwidth=1e10, flops=1e11)
    points = dc.roofline_points(sizes, context_len=8, new_tokens=3, repeats=1, roofs=roofs)
    assert [(p["name"], p["use_cache"]) for p in points] == [("a", True), ("a", False), ("b", True), ("b", False)]
    for p in points:
        assert p["measured_tokens_per_s"] > 0 and p["predicted_tokens_per_s"] > 0
        assert p["ratio"] == pytest.approx(p["measured_tokens_per_s"] / p["predicted_tokens_per_s"])
    assert points[2]["params"] > points[0]["params"]
    # prefill's prediction: one uncached forward over the 8-token prompt, making 8 tokens
    model = dc.sweep_model(64, 1, context_length=11)
    prefill = dc.predicted_tokens_per_s(model, 1e10, 8, flops=1e11, use_cache=False)
    assert points[0]["predicted_prefill_tokens_per_s"] == pytest.approx(8 * prefill.tokens_per_s)
    assert points[0]["prefill_bound"] == prefill.bound
    fit = dc.fit_overhead(points)
    assert fit.n_points == 2 and math.isfinite(fit.overhead_s)


def test_fit_overhead_recovers_a_known_line():
    # measured step = 2 ms + 1.5 x predicted step, exactly; and 0.5 ms per layer + 1.2 x predicted
    pred, layers = [100.0, 20.0, 5.0], [2, 6, 12]
    fixed = [{"use_cache": True, "n_layers": n, "predicted_tokens_per_s": r,
              "measured_tokens_per_s": 1 / (0.002 + 1.5 / r)} for r, n in zip(pred, layers, strict=True)]
    fit = dc.fit_overhead(fixed, kind="fixed")
    assert fit.overhead_s == pytest.approx(0.002) and fit.slowdown == pytest.approx(1.5) and fit.per_layer_s == 0
    assert fit.predict(20.0, 6) == pytest.approx(fixed[1]["measured_tokens_per_s"])
    per_layer = [{**p, "measured_tokens_per_s": 1 / (0.0005 * p["n_layers"] + 1.2 / p["predicted_tokens_per_s"])}
                 for p in fixed]
    fit = dc.fit_overhead(per_layer)
    assert fit.kind == "per_layer" and fit.overhead_s == 0
    assert fit.per_layer_s == pytest.approx(0.0005) and fit.slowdown == pytest.approx(1.2)
    assert fit.predict(5.0, 12) == pytest.approx(per_layer[2]["measured_tokens_per_s"])
    with pytest.raises(ValueError, match="at least two points"):
        dc.fit_overhead(fixed[:1])
    with pytest.raises(ValueError, match="kind must be"):
        dc.fit_overhead(fixed, kind="linear")


def test_prefill_processes_more_tokens_per_second_than_decode():
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("gpt-tiny"))
    row = dc.prefill_vs_decode(model, prompt_len=48, new_tokens=4, repeats=3)
    # 48 tokens in one pass vs one token per pass: the per-pass overhead alone makes prefill faster per token
    assert row["prefill_tokens_per_s"] > row["decode_tokens_per_s"] and row["ratio"] > 1


def test_batch_points_share_the_weights():
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("gpt-tiny"))
    roofs = dc.Roofs(bandwidth=1e10, flops=1e11)
    points = dc.batch_points(model, (1, 4), context_len=8, new_tokens=3, repeats=1, roofs=roofs)
    assert [p["batch_size"] for p in points] == [1, 4]
    one, four = (dc.predicted_tokens_per_s(model, 1e10, 9, batch_size=b, flops=1e11) for b in (1, 4))
    assert [p["predicted_tokens_per_s"] for p in points] == [one.tokens_per_s, four.tokens_per_s]
    assert 1 < four.memory_bound / one.memory_bound < 4  # the weights are read once; the caches are not shared
    assert all(p["measured_tokens_per_s"] > 0 for p in points)
    with pytest.raises(ValueError, match="batch_sizes must be positive"):
        dc.batch_points(model, (0,), roofs=roofs)
