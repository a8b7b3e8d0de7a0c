"""A synthetic stream of requests, replayed against static and continuous batching.

Serving is judged by two kinds of number that pull against each other:

    throughput         generated tokens per second, over the whole stream: what the machine costs per token
    latency            per request, from its arrival to its last token (mean and 90th percentile)
    time to first token  from arrival to the first token: what a user staring at a chat window feels

``request_stream`` draws requests the way traffic looks to a server: arrivals
a Poisson process (exponential gaps, ``rate`` requests per second), prompt and
output lengths uniform in ranges, all from one seed. ``serve_stream`` replays
them against an engine, submitting each request when the clock passes its
arrival time:

    static      ``StaticEngine``: when it is idle, takes up to ``batch_size`` waiting requests and runs
                them as one left-padded batch until the longest is done (``static_generate``)
    continuous  ``ContinuousBatcher``: admits requests into free slots and retires them at every step

The clock is either ``"compute"`` (default): the measured time of each step
or batch, skipping forward over the gaps when there is nothing to do, so a
replay takes only as long as its computing; or ``"wall"``: real time, sleeping
through the gaps. Both engines see the same clock, so their numbers compare.

``compare_batching(demo_model())`` with the defaults (a laptop-llama shape:
d_model 128, 4 layers, vocab 4096, random weights; 48 requests arriving over
about a second, 1441 tokens to generate) took 3 s of wall time with one torch
thread, and ``throughput_by_batch_size`` 1.2 s. Outputs are the same under
both engines (greedy), which ``compare_batching`` checks. On a machine shared
with other busy processes, use ``torch.set_num_threads(1)``: the same run with
two threads spinning against other work took 40x longer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llmbook.inference.scheduler import ContinuousBatcher
from llmbook.inference.static_batching import static_generate
from llmbook.model import GPT, ModelConfig


@dataclass(frozen=True)
class Request:
    arrival: float  # seconds after the stream starts
    prompt: tuple[int, ...]
    max_new_tokens: int


def request_stream(
    n: int = 48, rate: float = 50.0, prompt_len: tuple[int, int] = (4, 64), new_tokens: tuple[int, int] = (4, 64),
    vocab_size: int = 4096, seed: int = 0,
) -> list[Request]:
    """``n`` requests arriving as a Poisson process of ``rate`` per second; lengths uniform in the closed ranges."""
    if n < 1 or rate <= 0:
        raise ValueError(f"need n >= 1 requests and a positive rate, got n={n}, rate={rate}")
    for name, (lo, hi) in (("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} must be a range (low, high) with 1 <= low <= high, got {(lo, hi)}")
    g = torch.Generator().manual_seed(seed)
    gaps = torch.empty(n, dtype=torch.float64).exponential_(rate, generator=g)  # mean 1/rate seconds
    arrivals = (gaps.cumsum(0) - gaps[0]).tolist()  # the first request at 0
    lengths = torch.randint(prompt_len[0], prompt_len[1] + 1, (n,), generator=g).tolist()
    outputs = torch.randint(new_tokens[0], new_tokens[1] + 1, (n,), generator=g).tolist()
    return [
        Request(a, tuple(torch.randint(0, vocab_size, (t,), generator=g).tolist()), m)
        for a, t, m in zip(arrivals, lengths, outputs, strict=True)
    ]


def demo_model(preset: str = "laptop-llama", seed: int = 0) -> GPT:
    """The book's reference shape with random weights, in eval mode: serving cost does not depend on what it learned."""
    torch.manual_seed(seed)
    return GPT(ModelConfig.preset(preset)).eval()


class StaticEngine:
    """Static batching as an engine for ``serve_stream``: fixed batches of up to ``batch_size``, run to completion."""

    def __init__(self, model: GPT, batch_size: int = 8, vocab_size: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.batch_size, self.vocab_size = model, batch_size, vocab_size


@dataclass
class StreamResult:
    """One replay of a request stream; times in seconds of the replay's clock, per request in stream order."""

    engine: str
    outputs: list[list[int]]
    arrivals: list[float]
    first_token: list[float]  # when the first new token was ready
    finished: list[float]
    busy: float  # seconds spent computing (the rest was waiting for requests)
    steps: int  # decode steps (continuous) or batch steps (static)
    wasted_slots: int = 0  # static: pad tokens fed plus decode slots of finished rows (continuous wastes none)
    latencies: list[float] = field(init=False)
    ttft: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.latencies = [f - a for f, a in zip(self.finished, self.arrivals, strict=True)]
        self.ttft = [f - a for f, a in zip(self.first_token, self.arrivals, strict=True)]

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def makespan(self) -> float:
        """From the first arrival to the last token."""
        return max(self.finished) - min(self.arrivals)

    @property
    def throughput(self) -> float:
        """Generated tokens per second over the whole stream."""
        return self.tokens / self.makespan

    @property
    def mean_latency(self) -> float:
        return sum(self.latencies) / len(self.latencies)

    @property
    def p90_latency(self) -> float:
        return percentile(self.latencies, 90)

    @property
    def mean_ttft(self) -> float:
        return sum(self.ttft) / len(self.ttft)

    @property
    def p90_ttft(self) -> float:
        return percentile(self.ttft, 90)

    def summary(self) -> dict[str, float | int | str]:
        """The numbers a table wants: tokens/s, latencies and times to first token in ms."""
        return {
            "engine": self.engine, "requests": len(self.outputs), "tokens": self.tokens,
            "tokens_per_s": round(self.throughput, 1), "makespan_s": round(self.makespan, 3),
            "mean_latency_ms": round(1000 * self.mean_latency, 1), "p90_latency_ms": round(1000 * self.p90_latency, 1),
            "mean_ttft_ms": round(1000 * self.mean_ttft, 1), "p90_ttft_ms": round(1000 * self.p90_ttft, 1),
            "steps": self.steps, "wasted_slots": self.wasted_slots,
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class _Clock:
    """Compute clock: advances by measured work and jumps over idle gaps; wall clock: real time, sleeping."""

    def __init__(self, kind: str):
        if kind not in ("compute", "wall"):
            raise ValueError(f"clock must be 'compute' or 'wall', got {kind!r}")
        self.kind, self.t, self.start, self.busy = kind, 0.0, time.perf_counter(), 0.0

    def now(self) -> float:
        return self.t if self.kind == "compute" else time.perf_counter() - self.start

    def worked(self, seconds: float) -> None:
        self.busy += seconds
        if self.kind == "compute":
            self.t += seconds

    def wait_until(self, t: float) -> None:
        if self.kind == "compute":
            self.t = max(self.t, t)
        else:
            time.sleep(max(0.0, t - self.now()))


def serve_stream(engine: ContinuousBatcher | StaticEngine, requests: Sequence[Request], clock: str = "compute"
                 ) -> StreamResult:
    """Replay ``requests`` (sorted by arrival) against ``engine``; every request's tokens and times."""
    requests = sorted(requests, key=lambda r: r.arrival)
    if not requests:
        raise ValueError("no requests: give at least one (request_stream makes some)")
    if isinstance(engine, StaticEngine):
        return _serve_static(engine, requests, _Clock(clock))
    if isinstance(engine, ContinuousBatcher):
        return _serve_continuous(engine, requests, _Clock(clock))
    raise ValueError(f"engine must be a ContinuousBatcher or a StaticEngine, got {type(engine).__name__}")


def _serve_continuous(engine: ContinuousBatcher, requests: list[Request], clock: _Clock) -> StreamResult:
    if engine.has_work:
        raise ValueError("the engine already has requests; give serve_stream an idle one")
    n = len(requests)
    outputs: list[list[int]] = [[] for _ in range(n)]
    first, done = [math.nan] * n, [math.nan] * n
    index: dict[int, int] = {}  # request id -> position in the stream
    nxt, steps = 0, 0
    while nxt < n or engine.has_work:
        while nxt < n and requests[nxt].arrival <= clock.now():
            r = requests[nxt]
            index[engine.submit(r.prompt, r.max_new_tokens)] = nxt
            nxt += 1
        if not engine.has_work:
            clock.wait_until(requests[nxt].arrival)
            continue
        t0 = time.perf_counter()
        events = engine.step()
        clock.worked(time.perf_counter() - t0)
        steps += 1
        now = clock.now()
        for e in events:
            i = index[e.request_id]
            if e.token is not None:
                if not outputs[i]:
                    first[i] = now
                outputs[i].append(e.token)
            if e.finished:
                done[i] = now
    engine.pop_finished()
    return StreamResult("continuous", outputs, [r.arrival for r in requests], first, done, clock.busy, steps)


def _serve_static(engine: StaticEngine, requests: list[Request], clock: _Clock) -> StreamResult:
    n = len(requests)
    outputs: list[list[int]] = [[] for _ in range(n)]
    first, done = [math.nan] * n, [math.nan] * n
    queue: list[int] = []
    nxt, steps, wasted = 0, 0, 0
    while nxt < n or queue:
        while nxt < n and requests[nxt].arrival <= clock.now():
            queue.append(nxt)
            nxt += 1
        if not queue:
            clock.wait_until(requests[nxt].arrival)
            continue
        batch, queue = queue[: engine.batch_size], queue[engine.batch_size :]
        start = clock.now()
        result = static_generate(engine.model, [requests[i].prompt for i in batch],
                                 [requests[i].max_new_tokens for i in batch], len(batch), vocab_size=engine.vocab_size)
        clock.worked(result.elapsed)
        if clock.kind == "wall":
            start = clock.now() - result.elapsed
        steps, wasted = steps + result.steps, wasted + result.wasted_slots
        for j, i in enumerate(batch):
            outputs[i] = result.tokens[j]
            first[i], done[i] = start + result.first_token_times[j], start + result.finish_times[j]
    return StreamResult("static", outputs, [r.arrival for r in requests], first, done, clock.busy, steps, wasted)


def compare_batching(
    model: GPT, requests: Sequence[Request] | None = None, batch_size: int = 8, clock: str = "compute",
    vocab_size: int | None = None,
) -> dict[str, StreamResult]:
    """The same stream served by static and by continuous batching with the same batch size; outputs checked equal.

    ``requests`` defaults to ``request_stream(vocab_size=...)`` for the model's vocabulary.
    """
    if requests is None:
        requests = request_stream(vocab_size=vocab_size or model.cfg.vocab_size)
    static = serve_stream(StaticEngine(model, batch_size, vocab_size), requests, clock)
    continuous = serve_stream(ContinuousBatcher(model, batch_size, vocab_size), requests, clock)
    if static.outputs != continuous.outputs:
        raise RuntimeError("static and continuous batching generated different tokens; one of them has a bug")
    return {"static": static, "continuous": continuous}


def throughput_by_batch_size(
    model: GPT, sizes: Sequence[int] = (1, 2, 4, 8, 16), prompt_len: int = 16, new_tokens: int = 32, seed: int = 0,
    repeats: int = 2,
) -> list[dict[str, float]]:
    """Decode throughput of the continuous batcher with ``B`` equal requests at once, for each B in ``sizes``.

    Each point: B requests of ``prompt_len`` random tokens generating
    ``new_tokens`` each, all admitted in the first step, so every later step
    decodes B sequences together. ``tokens_per_s`` counts generated tokens over
    the whole run (prefill included); ``ms_per_step`` is the mean decode step.
    On a memory-bound machine a step costs about the same for any small B
    (the weights are read once per step), so tokens/s grows almost linearly
    with B until compute takes over. Each point is the fastest of ``repeats`` runs
    (other work on the machine only ever slows a run down).
    """
    g = torch.Generator().manual_seed(seed)
    points = []
    warm = ContinuousBatcher(model, 1, max_len=prompt_len + new_tokens)
    warm.submit([0] * prompt_len, 2)
    warm.run()  # first calls allocate and pick kernels
    for B in sizes:
        prompts = [torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(B)]
        best: tuple[float, float] | None = None  # (prefill seconds, decode seconds) of the fastest run
        for _ in range(max(1, repeats)):
            engine = ContinuousBatcher(model, B, max_len=prompt_len + new_tokens)
            for prompt in prompts:
                engine.submit(prompt, new_tokens)
            t0 = time.perf_counter()
            engine.step()  # B prefills, each giving its request's first token
            t1 = time.perf_counter()
            engine.run()  # new_tokens - 1 decode steps of B sequences
            t2 = time.perf_counter()
            if best is None or t2 - t0 < sum(best):
                best = (t1 - t0, t2 - t1)
        prefill_s, decode_s = best
        tokens = B * new_tokens
        points.append({
            "batch_size": B, "tokens_per_s": tokens / (prefill_s + decode_s),
            "decode_tokens_per_s": B * (new_tokens - 1) / decode_s,
            "ms_per_step": 1000 * decode_s / max(1, new_tokens - 1), "prefill_ms": 1000 * prefill_s,
        })
    return points
