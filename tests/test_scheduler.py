"""Continuous batching gives exactly what one-at-a-time generation gives, whatever joins or leaves the batch when."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from llmbook.generate import generate
from llmbook.inference.scheduler import ContinuousBatcher, Event
from llmbook.inference.slots import SlotKVCache
from llmbook.inference.workload import (
    Request,
    StaticEngine,
    compare_batching,
    percentile,
    request_stream,
    serve_stream,
    throughput_by_batch_size,
)
from llmbook.model import GPT, ModelConfig

CONFIGS = {
    "llama-gqa": ModelConfig.preset("llama-tiny"),  # RoPE, 4 query heads sharing 2 k/v heads, RMSNorm, SwiGLU
    "gpt2": ModelConfig.preset("gpt-tiny"),  # learned positions, LayerNorm, GELU, tied head
    "gpt2-postnorm": ModelConfig.preset("gpt-tiny", prenorm=False, n_layers=1),
}


def _model(name: str) -> GPT:
    torch.manual_seed(0)
    # float64: one-at-a-time and batched sums differ only in rounding, far below any gap between two logits
    model = GPT(CONFIGS[name]).double().eval()
    with torch.no_grad():  # at its init scale a tied GPT-2 only repeats its input token: make the layers matter
        for n, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in n:
                p.mul_(10)
    return model


def _requests(n: int, seed: int = 1, max_prompt: int = 12, max_new: int = 15) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = int(torch.randint(1, max_prompt + 1, (1,), generator=g))
        n = int(torch.randint(1, max_new + 1, (1,), generator=g))
        out.append((torch.randint(0, 256, (t,), generator=g).tolist(), n))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_one_at_a_time_with_requests_arriving_between_steps(name):
    model = _model(name)
    reqs = _requests(12)
    engine = ContinuousBatcher(model, max_batch=4)
    ids, events = [], []
    for i, (prompt, n) in enumerate(reqs):  # a new request every other step, while others run
        ids.append(engine.submit(prompt, n))
        if i % 2:
            events += engine.step()
    while engine.has_work:
        events += engine.step()
    for rid, (prompt, n) in zip(ids, reqs, strict=True):
        expected = generate(model, [prompt], n, temperature=0)[0]
        assert [e.token for e in events if e.request_id == rid] == expected
        assert engine.finished[rid].tokens == expected
        finals = [e for e in events if e.request_id == rid and e.finished]
        assert finals == [Event(rid, expected[-1], True, "length")]
    assert len({t for e in events for t in [e.token]}) > 15  # varied outputs, not one token again and again
    assert engine.active == 0 and all(n == 0 for n in engine.cache.lengths)
    assert engine.decode_rows > engine.steps  # several sequences really decoded together


def test_sampling_equals_generate_with_the_same_seed():
    model = _model("llama-gqa")
    reqs = _requests(6, seed=2)
    engine = ContinuousBatcher(model, max_batch=3, vocab_size=200)
    opts = dict(temperature=0.8, top_k=40, top_p=0.9)
    ids = [engine.submit(p, n, seed=100 + i, **opts) for i, (p, n) in enumerate(reqs)]
    out = engine.run()
    for i, (rid, (prompt, n)) in enumerate(zip(ids, reqs, strict=True)):
        g = torch.Generator().manual_seed(100 + i)
        assert out[rid] == generate(model, [prompt], n, generator=g, vocab_size=200, **opts)[0]
        assert max(out[rid]) < 200


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_stop_tokens_end_a_request_and_free_its_slot(name):
    model = _model(name)
    reqs = _requests(5, seed=3, max_new=20)
    # stop on a token that the first request's greedy continuation produces midway
    stop = generate(model, [reqs[0][0]], 20, temperature=0)[0][5]
    engine = ContinuousBatcher(model, max_batch=2)
    ids = [engine.submit(p, 20, stop_tokens=[stop]) for p, _ in reqs]
    out = engine.run()
    assert engine.finished[ids[0]].reason == "stop" and out[ids[0]][-1] == stop
    for rid, (prompt, _) in zip(ids, reqs, strict=True):
        assert out[rid] == generate(model, [prompt], 20, temperature=0, stop_tokens=[stop])[0]
        assert engine.finished[rid].reason == ("stop" if out[rid][-1] == stop else "length")


def test_cancel_mid_generation_frees_the_slot_for_the_next_request():
    model = _model("llama-gqa")
    engine = ContinuousBatcher(model, max_batch=1)
    long = engine.submit([1, 2, 3], 40)
    waiting = engine.submit([4, 5], 6)
    for _ in range(3):
        assert [e.request_id for e in engine.step()] == [long]
    engine.cancel(long)
    events = engine.step()
    # the cancellation and the waiting request's first token in the same step
    assert events[0] == Event(long, None, True, "cancelled")
    assert [e.request_id for e in events[1:]] == [waiting]
    assert engine.finished[long].reason == "cancelled" and len(engine.finished[long].tokens) == 3
    out = engine.run()
    assert [events[1].token, *out[waiting]] == generate(model, [[4, 5]], 6, temperature=0)[0]
    engine.cancel(long)  # already finished: nothing happens
    assert not engine.has_work and engine.step() == []


def test_cancel_a_waiting_request():
    engine = ContinuousBatcher(_model("gpt2"), max_batch=1)
    first, second = engine.submit([1], 3), engine.submit([2], 3)
    engine.cancel(second)
    out = engine.run()
    assert out[second] == [] and engine.finished[second].reason == "cancelled"
    assert len(out[first]) == 3


def test_submit_from_another_thread_while_stepping():
    model = _model("gpt2")
    reqs = _requests(10, seed=4)
    ids: dict[int, int] = {}
    engine = ContinuousBatcher(model, max_batch=3)
    tokens: dict[int, list[int]] = {}
    submitted = threading.Event()

    def client():
        for i, (prompt, n) in enumerate(reqs):
            ids[i] = engine.submit(prompt, n)
            time.sleep(0.002)
        submitted.set()

    thread = threading.Thread(target=client)
    thread.start()
    while not (submitted.is_set() and not engine.has_work):
        for e in engine.step():
            tokens.setdefault(e.request_id, []).append(e.token)
    thread.join()
    for i, (prompt, n) in enumerate(reqs):
        assert tokens[ids[i]] == generate(model, [prompt], n, temperature=0)[0]


def test_max_batch_one_and_zero_new_tokens():
    model = _model("llama-gqa")
    reqs = _requests(4, seed=5)
    engine = ContinuousBatcher(model, max_batch=1)
    ids = [engine.submit(p, n) for p, n in reqs]
    none = engine.submit([7], 0)
    model.train()  # generation runs in eval mode and hands the model back as it came
    out = engine.run()
    assert model.training
    model.eval()
    for rid, (prompt, n) in zip(ids, reqs, strict=True):
        assert out[rid] == generate(model, [prompt], n, temperature=0)[0]
    assert out[none] == [] and engine.finished[none].reason == "length"


def test_a_request_may_fill_its_whole_slot():
    model = _model("gpt2")
    ctx = model.cfg.context_length
    engine = ContinuousBatcher(model, max_batch=2)
    a, b = engine.submit(list(range(ctx - 5)), 5), engine.submit([3], ctx - 1)
    out = engine.run()
    assert out[a] == generate(model, [list(range(ctx - 5))], 5, temperature=0)[0]
    assert out[b] == generate(model, [[3]], ctx - 1, temperature=0)[0]


def test_bad_input_is_one_clear_line():
    model = _model("gpt2")
    engine = ContinuousBatcher(model, max_batch=2)
    ctx = model.cfg.context_length
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.submit([], 5)
    with pytest.raises(ValueError, match=rf"plus max_new_tokens=10 is {ctx + 10}, more than the {ctx} tokens"):
        engine.submit([1] * ctx, 10)
    with pytest.raises(ValueError, match="token ids must be in 0..255"):
        engine.submit([1, 256], 3)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        engine.submit([1], 3, temperature=-1)
    with pytest.raises(ValueError, match="top_p must be in"):
        engine.submit([1], 3, temperature=1, top_p=0)
    with pytest.raises(ValueError, match="unknown request id 5"):
        engine.cancel(5)
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        ContinuousBatcher(model, max_batch=0)
    with pytest.raises(ValueError, match="max_len must be in"):
        SlotKVCache(model, 2, max_len=ctx + 1)
    for message in ("the prompt is empty", "more than the"):
        assert "\n" not in message
    assert not engine.has_work  # nothing bad was queued


def test_short_slots_bound_the_requests():
    engine = ContinuousBatcher(_model("llama-gqa"), max_batch=2, max_len=16)
    assert engine.cache.k[0].shape[2] == 16
    with pytest.raises(ValueError, match="more than the 16 tokens"):
        engine.submit([1] * 10, 7)
    engine.submit([1] * 10, 6)
    assert len(engine.run()[0]) == 6


# --- the synthetic request stream (workload.py) ---------------------------------------------------------------------
def test_request_stream_is_seeded_poisson_with_lengths_in_range():
    a, b = request_stream(n=2000, rate=50.0, seed=3), request_stream(n=2000, rate=50.0, seed=3)
    assert a == b and a != request_stream(n=2000, rate=50.0, seed=4)
    arrivals = [r.arrival for r in a]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals)
    assert abs(arrivals[-1] / 1999 - 1 / 50) < 0.1 / 50  # mean gap 1/rate, within 10%
    assert {len(r.prompt) for r in a} == set(range(4, 65)) and {r.max_new_tokens for r in a} == set(range(4, 65))
    assert max(max(r.prompt) for r in a) < 4096


@pytest.mark.parametrize("clock", ["compute", "wall"])
def test_serve_stream_static_and_continuous_give_one_at_a_time_outputs(clock):
    model = _model("llama-gqa")
    reqs = request_stream(n=10, rate=2000.0, prompt_len=(1, 10), new_tokens=(1, 12), vocab_size=256, seed=1)
    results = compare_batching(model, reqs, batch_size=3, clock=clock)
    for r in results.values():
        assert r.outputs == [generate(model, [list(q.prompt)], q.max_new_tokens, temperature=0)[0] for q in reqs]
        assert all(a <= f <= d for a, f, d in zip(r.arrivals, r.first_token, r.finished, strict=True))
        s = r.summary()
        assert s["tokens"] == sum(q.max_new_tokens for q in reqs) and s["tokens_per_s"] > 0
        assert min(r.latencies) <= r.p90_latency <= max(r.latencies) and r.mean_ttft <= r.mean_latency


def test_a_burst_takes_fewer_steps_with_continuous_batching():
    # every request at t=0: static runs 3 batches each as long as its longest request; continuous refills slots
    model = _model("gpt2")
    stream = request_stream(n=12, prompt_len=(1, 8), new_tokens=(1, 20), vocab_size=256, seed=2)
    reqs = [Request(0.0, r.prompt, r.max_new_tokens) for r in stream]
    results = compare_batching(model, reqs, batch_size=4)
    static, continuous = results["static"], results["continuous"]
    longest = [max(q.max_new_tokens for q in reqs[b : b + 4]) for b in range(0, 12, 4)]
    assert static.steps == sum(longest)
    batches = [reqs[b : b + 4] for b in range(0, 12, 4)]
    padding = sum(max(len(q.prompt) for q in qs) - len(q.prompt) for qs in batches for q in qs)
    idle = sum(max(q.max_new_tokens for q in qs) - q.max_new_tokens for qs in batches for q in qs)
    assert static.wasted_slots == padding + idle > 0 and continuous.wasted_slots == 0
    assert continuous.steps < static.steps


def test_percentile_and_throughput_by_batch_size():
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    assert percentile(values, 90) == pytest.approx(float(np.percentile(values, 90)))
    assert percentile(values, 50) == pytest.approx(float(np.median(values)))
    points = throughput_by_batch_size(_model("gpt2"), sizes=(1, 2), prompt_len=4, new_tokens=5)
    assert [p["batch_size"] for p in points] == [1, 2] and all(p["tokens_per_s"] > 0 for p in points)


def test_workload_bad_input():
    with pytest.raises(ValueError, match="no requests"):
        serve_stream(StaticEngine(_model("gpt2")), [])
    with pytest.raises(ValueError, match="clock must be 'compute' or 'wall'"):
        serve_stream(StaticEngine(_model("gpt2")), request_stream(n=1, vocab_size=256), clock="cpu")
    with pytest.raises(ValueError, match="prompt_len must be a range"):
        request_stream(prompt_len=(0, 4))
    with pytest.raises(ValueError, match="engine must be a ContinuousBatcher or a StaticEngine"):
        serve_stream(object(), request_stream(n=1))


def test_cancel_from_another_thread_while_stepping():
    model = _model("llama-gqa")
    engine = ContinuousBatcher(model, max_batch=2)
    ids = [engine.submit([1, 2, 3], 120), engine.submit([4], 8), engine.submit([5, 6], 8)]
    started = threading.Event()

    def client():
        started.wait()
        engine.cancel(ids[0])

    thread = threading.Thread(target=client)
    thread.start()
    events: list[Event] = []
    while engine.has_work:
        events += engine.step()
        started.set()
    thread.join()
    assert Event(ids[0], None, True, "cancelled") in events and len(engine.finished[ids[0]].tokens) < 120
    for rid, prompt in zip(ids[1:], ([4], [5, 6]), strict=True):
        assert [e.token for e in events if e.request_id == rid] == generate(model, [prompt], 8, temperature=0)[0]
