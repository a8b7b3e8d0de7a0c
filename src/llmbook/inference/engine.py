"""The engine: one thread runs the continuous-batching scheduler, every web request waits for its own tokens.

A web server handles many requests at once on one asyncio event loop, but the
model must see them together, as one batch, to be fast (see ``scheduler.py``).
So the two are split:

    request handlers (event loop)             engine thread
    ------------------------------            ---------------------------------------
    submit(prompt) -> id, queue  --------->   batcher.submit   (under the batcher's lock)
                                              while batcher.has_work:
                                                  events = batcher.step()   # one token for every running request
    await queue.get()            <---------       each Event -> its request's asyncio.Queue
    client gone: cancel(id)      --------->   batcher.cancel   (its KV-cache slot is freed next step)

The thread sleeps on a ``threading.Event`` when there is no work, so an idle
server uses no CPU, and wakes the moment a request is submitted. An
``asyncio.Queue`` may only be touched from its own loop's thread, so the
engine thread hands each event over with ``loop.call_soon_threadsafe``.

Why a thread and not ``await`` in the handlers: ``step()`` is a forward pass
of the model (milliseconds to seconds) that would block the event loop and
with it every other client; in a thread it runs while the loop keeps
accepting connections and streaming bytes (PyTorch releases the GIL inside
its kernels).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmbook.model import GPT


@dataclass
class EngineError:
    """Put in a request's queue instead of an ``Event`` when the scheduler failed: the handler answers 500."""

    message: str


class Engine:
    """Runs ``batcher`` (a ``ContinuousBatcher``: ``submit``/``cancel``/``step``/``has_work``) in a background thread.

    ``start()`` / ``stop()`` the thread (``create_app`` does it in the server's
    lifespan). ``submit`` must be called from a running event loop; it returns
    the request id and the ``asyncio.Queue`` that receives the request's
    ``Event``s, the last one with ``finished=True``. ``cancelled`` lists the ids
    cancelled while still running (a client that went away, a stop string
    that matched), which the tests check.
    """

    def __init__(self, batcher: Any, context_length: int, vocab_size: int | None = None, idle_wait: float = 0.5):
        self.batcher = batcher
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.idle_wait = idle_wait  # seconds between checks of `running` while idle (wake-ups come sooner)
        self.cancelled: list[int] = []
        self.steps = 0  # scheduler steps run, for the curious
        self._sinks: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _sinks; held across batcher.submit so no event can miss its queue
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False

    @classmethod
    def from_model(cls, model: GPT, max_batch: int = 8, vocab_size: int | None = None) -> Engine:
        """An engine over the book's ``ContinuousBatcher`` for ``model`` (at most ``max_batch`` requests per step)."""
        from llmbook.inference.scheduler import ContinuousBatcher

        batcher = ContinuousBatcher(model.eval(), max_batch=max_batch, vocab_size=vocab_size)
        return cls(batcher, model.cfg.context_length, vocab_size)

    # ------------------------------------------------------------------ the thread

    @property
    def running(self) -> bool:
        return self._running

    def start(self) -> None:
        """Start the engine thread (a daemon: it never keeps the process alive)."""
        if self._running:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="llmbook-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current step; waiting requests get an ``EngineError``."""
        self._running = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            sinks, self._sinks = self._sinks, {}
        for rid, sink in sinks.items():
            self._cancel_in_batcher(rid)
            self._deliver(sink, EngineError("the server is shutting down"))

    def _loop(self) -> None:
        while self._running:
            self._wake.clear()  # clear before looking, so a submit between the look and the wait still wakes us
            if not self.batcher.has_work:
                self._wake.wait(self.idle_wait)
                continue
            try:
                events = self.batcher.step()
            except Exception as exc:  # a scheduler bug must not hang every client: fail the requests it held
                self._fail_all(f"the scheduler failed: {type(exc).__name__}: {exc}")
                self._wake.wait(0.05)  # should it fail again at once, do not spin
                continue
            self.steps += 1
            if hasattr(self.batcher, "pop_finished"):  # the batcher keeps finished requests for measurements
                self.batcher.pop_finished()  # a server that runs for days must forget them
            with self._lock:
                for event in events:
                    sink = self._sinks.get(event.request_id)
                    if event.finished:
                        self._sinks.pop(event.request_id, None)
                    if sink is not None:  # None: a request cancelled meanwhile; its last events go nowhere
                        self._deliver(sink, event)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            sinks, self._sinks = self._sinks, {}
        for rid, sink in sinks.items():
            self._cancel_in_batcher(rid)
            self._deliver(sink, EngineError(message))

    def _cancel_in_batcher(self, request_id: int) -> None:
        try:
            self.batcher.cancel(request_id)
        except Exception:  # already finished or unknown: nothing to free
            pass

    @staticmethod
    def _deliver(sink: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item: object) -> None:
        loop, queue = sink
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server stopped and nobody waits any more
            pass

    # ------------------------------------------------------------------ called from request handlers

    def submit(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
               top_p: float | None = None, top_k: int | None = None, stop_tokens: Sequence[int] = (),
               seed: int | None = None) -> tuple[int, asyncio.Queue]:
        """Queue a request; ``(request_id, queue)``.

        The scheduler's ``ValueError`` (an empty prompt, one too long for the context) passes through.
        """
        if not self._running:
            raise RuntimeError("the engine is not running: call Engine.start() (create_app's lifespan does)")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            rid = self.batcher.submit(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                      stop_tokens=stop_tokens, seed=seed)
            self._sinks[rid] = (loop, queue)
        self._wake.set()
        return rid, queue

    def cancel(self, request_id: int) -> None:
        """Stop generating for ``request_id`` (its client went away or a stop string matched); idempotent."""
        with self._lock:
            known = self._sinks.pop(request_id, None) is not None
        if known:
            self.cancelled.append(request_id)
            self._cancel_in_batcher(request_id)
            self._wake.set()
