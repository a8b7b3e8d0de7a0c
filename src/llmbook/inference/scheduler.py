"""Continuous batching: a scheduler that admits and retires sequences at every decoding step.

Static batching (``static_batching.py``) takes B requests, pads them, and runs
the batch until its longest request is done: a request that wanted 5 tokens
sits in the batch while its neighbour generates 200, and a request that
arrives meanwhile waits for the whole batch. Continuous batching (Orca, Yu et
al. 2022; vLLM, TGI) schedules per *step* instead of per batch:

    every step:
        1. drop cancelled requests, freeing their slots
        2. admit waiting requests into free slots: prefill each prompt into its slot,
           which gives the request its first token
        3. one decode step for every other busy slot together, each at its own position
        4. retire a request on its stop token or its max_new_tokens; its slot is free the same step

A decode step reads every weight of the model once whatever the batch, so on
a memory-bound machine A sequences cost little more than one: keeping the
slots full is where the throughput comes from. The per-slot KV cache and the
batched decode forward are in ``llmbook.inference.slots`` (with a note on
paged attention, which is how vLLM stores the slots).

Thread safety: ``submit`` and ``cancel`` may be called from any thread (a web
server's event loop); ``step`` / ``run`` from one engine thread. A lock guards
the queue of waiting requests and the cancellations; ``step`` holds its own
lock, so two threads stepping at once take turns.

>>> from llmbook.model import GPT, ModelConfig
>>> _ = torch.manual_seed(0); model = GPT(ModelConfig.preset("gpt-tiny"))
>>> engine = ContinuousBatcher(model, max_batch=2)
>>> a = engine.submit([1, 2, 3], max_new_tokens=4); b = engine.submit([4], max_new_tokens=2)
>>> {rid: len(tokens) for rid, tokens in engine.run().items()}
{0: 4, 1: 2}
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from llmbook.generate import _next_token
from llmbook.inference.slots import SlotKVCache, decode_step, prefill
from llmbook.model import GPT


@contextmanager
def _eval_mode(model: GPT) -> Iterator[None]:
    """No dropout while generating; the model is handed back in the mode it came in."""
    if not model.training:  # the usual case: .eval() walks every module, a noticeable cost per step
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


@dataclass
class Event:
    """What happened to one request in one step: a new token, and whether the request is done and why."""

    request_id: int
    token: int | None  # None only for a cancelled request (or one that asked for 0 tokens)
    finished: bool
    reason: str | None  # "stop" | "length" | "cancelled" when finished, else None


@dataclass
class _Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    stop: frozenset[int]
    generator: torch.Generator | None
    submitted: float  # time.perf_counter() at submit
    tokens: list[int] = field(default_factory=list)
    slot: int | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    reason: str | None = None


class ContinuousBatcher:
    """Serve many generation requests with one model, ``max_batch`` sequences decoding together.

    ``submit`` queues a request and returns its id; each ``step`` returns the
    ``Event`` s of that step (at most one token per running request); ``run``
    steps until nothing is left and returns the new tokens of each request.
    Greedy outputs equal ``llmbook.generate.generate(model, [prompt], n, temperature=0)``
    for each request alone; sampled ones equal it with
    ``generator=torch.Generator().manual_seed(seed)`` (same draws, in the same order).
    ``vocab_size`` (the tokenizer's) keeps padding ids of the output layer from
    being chosen; ``max_len`` is each slot's size (default the context length).
    """

    def __init__(self, model: GPT, max_batch: int = 8, vocab_size: int | None = None, max_len: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if vocab_size is not None and not 0 < vocab_size <= model.cfg.vocab_size:
            raise ValueError(
                f"vocab_size must be in 1..{model.cfg.vocab_size} (the model's output size), got {vocab_size}"
            )
        self.model, self.max_batch, self.vocab_size = model, max_batch, vocab_size
        self.cache = SlotKVCache(model, max_batch, max_len)
        self.max_len = self.cache.max_len
        self._lock = threading.Lock()  # guards _waiting, _cancelled, _next_id, _requests
        self._step_lock = threading.Lock()  # one step at a time
        self._waiting: deque[_Request] = deque()
        self._cancelled: set[int] = set()
        self._requests: dict[int, _Request] = {}  # every request not yet finished, by id
        self._slots: list[_Request | None] = [None] * max_batch
        self._next_id = 0
        self.finished: dict[int, _Request] = {}  # done requests (tokens, times), for measurements; see pop_finished
        self.keep_finished = 10_000  # the most finished requests kept in ``finished``, oldest dropped first
        self.steps = 0  # step() calls that did work
        self.decode_rows = 0  # sum over decode steps of the sequences decoded together

    # --- the API a server calls from its own threads ------------------------------------------------------------------
    def submit(
        self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
        top_p: float | None = None, stop_tokens: Sequence[int] = (), seed: int | None = None,
    ) -> int:
        """Queue a request; its id. ``seed`` makes sampling reproducible (None: drawn from torch's global RNG)."""
        prompt = [int(t) for t in prompt]
        V = self.model.cfg.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token (e.g. the <|endoftext|> id)")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if len(prompt) + max_new_tokens > self.max_len:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) plus max_new_tokens={max_new_tokens} is "
                f"{len(prompt) + max_new_tokens}, more than the {self.max_len} tokens a sequence may hold "
                "(the context length); shorten the prompt or ask for fewer tokens"
            )
        if min(prompt) < 0 or max(prompt) >= V:
            raise ValueError(f"token ids must be in 0..{V - 1}, got ids from {min(prompt)} to {max(prompt)}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        generator = None
        if temperature > 0:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)))
            generator = torch.Generator(device=self.cache.k[0].device).manual_seed(seed)
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            request = _Request(rid, prompt, max_new_tokens, temperature, top_k, top_p,
                               frozenset(int(t) for t in stop_tokens), generator, time.perf_counter())
            self._requests[rid] = request
            self._waiting.append(request)
        return rid

    def cancel(self, request_id: int) -> None:
        """Stop a request: the next step frees its slot and reports ``Event(id, None, True, "cancelled")``.

        A request that has already finished (or was cancelled) is left alone.
        """
        with self._lock:
            if not 0 <= request_id < self._next_id:
                raise ValueError(f"unknown request id {request_id}: ids come from submit()")
            if request_id in self._requests:
                self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        """Whether a request is waiting or running (or a cancellation is still to be reported)."""
        with self._lock:
            return bool(self._requests)

    @property
    def active(self) -> int:
        """Sequences holding a slot now."""
        return sum(r is not None for r in self._slots)

    # --- the engine ---------------------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Cancel, admit (prefill) and decode once; this step's events: cancellations, new requests, running ones."""
        with self._step_lock, _eval_mode(self.model):
            events: list[Event] = []
            # 1. cancellations: a running request frees its slot now, a waiting one never starts
            with self._lock:
                cancelled, self._cancelled = self._cancelled, set()
                if cancelled:
                    self._waiting = deque(r for r in self._waiting if r.id not in cancelled)
            for rid in sorted(cancelled):
                request = self._requests.get(rid)
                if request is not None:  # else it finished on its own before the cancellation got here
                    self._finish(request, "cancelled")
                    events.append(Event(rid, None, True, "cancelled"))
            running = [r for r in self._slots if r is not None]  # decoded in 3., after the new ones are admitted
            # 2. admission: each waiting request that fits takes a free slot; its prefill gives its first token
            with self._lock:
                n_new = min(len(self._waiting), self.max_batch - len(running))
                admitted = [self._waiting.popleft() for _ in range(n_new)]

            for request in admitted:
                if request.max_new_tokens == 0:
                    self._finish(request, "length")
                    events.append(Event(request.id, None, True, "length"))
                    continue
                slot = self._slots.index(None)
                self._slots[slot], request.slot = request, slot
                logits = prefill(self.model, self.cache, slot, request.prompt)  # (V,)
                events.append(self._emit(request, logits[None]))

            # 3. one decode step for all the others together, each slot at its own position
            if running:
                logits = decode_step(self.model, self.cache, [r.slot for r in running], [r.tokens[-1] for r in running])
                self.decode_rows += len(running)
                greedy = _next_token(logits, 0.0, None, None, None, self.vocab_size).tolist()  # (A,): one argmax
                # 4. retirement (in _emit): a stop token or max_new_tokens frees the slot for the next step
                for i, request in enumerate(running):
                    events.append(self._emit(request, logits[i : i + 1], greedy[i]))
            if events:
                self.steps += 1
            return events

    def _emit(self, request: _Request, logits: torch.Tensor, greedy_token: int | None = None) -> Event:
        """Pick the request's next token from ``logits`` ``(1, V)``, record it, retire the request if it is done."""
        if request.temperature == 0 and greedy_token is not None:
            token = greedy_token
        else:
            token = int(_next_token(logits, request.temperature, request.top_k, request.top_p, request.generator,
                                    self.vocab_size)[0])
        now = time.perf_counter()
        if request.first_token_at is None:
            request.first_token_at = now
        request.tokens.append(token)
        reason = None
        if token in request.stop:
            reason = "stop"
        elif len(request.tokens) >= request.max_new_tokens:
            reason = "length"
        if reason is not None:
            self._finish(request, reason)
        return Event(request.id, token, reason is not None, reason)

    def _finish(self, request: _Request, reason: str) -> None:
        if request.slot is not None:
            self.cache.free(request.slot)
            self._slots[request.slot] = None
            request.slot = None
        request.reason, request.finished_at = reason, time.perf_counter()
        with self._lock:
            self._requests.pop(request.id, None)
            self.finished[request.id] = request
            if len(self.finished) > self.keep_finished:  # a server that never calls pop_finished must not grow forever
                del self.finished[next(iter(self.finished))]  # the oldest (dicts keep insertion order)

    def run(self) -> dict[int, list[int]]:
        """Step until no request is left; the new tokens of every request that finished meanwhile, by id."""
        out: dict[int, list[int]] = {}
        while self.has_work:
            for event in self.step():
                tokens = out.setdefault(event.request_id, [])
                if event.token is not None:
                    tokens.append(event.token)
        return out

    def pop_finished(self) -> dict[int, _Request]:
        """The finished requests (with ``tokens``, ``submitted``, ``first_token_at``, ``finished_at``), forgetting them.

        ``finished`` keeps the last ``keep_finished`` requests otherwise.
        """
        with self._lock:
            done, self.finished = self.finished, {}
        return done
