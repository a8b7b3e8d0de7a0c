"""An OpenAI-compatible HTTP API for the book's models: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Speaking OpenAI's wire format means every tool written for it (the official
``openai`` client, LangChain, lm-eval's ``local-completions``, curl scripts)
works against a model of this book unchanged: point its ``base_url`` at
``http://127.0.0.1:8000/v1``. vLLM, llama.cpp's server, Ollama and TGI all do
the same.

The pieces:

- **Requests** are validated by pydantic models; whatever is wrong (a missing
  field, a string where a number goes, a prompt longer than the context,
  ``n > 1``) is a 400 with OpenAI's error body
  ``{"error": {"message", "type", "param", "code"}}``, so clients raise their
  usual ``BadRequestError`` with our message. An unknown model name is a 404.
- **Generation** goes through the ``Engine`` (``engine.py``): one thread runs
  the continuous-batching scheduler for all requests; each handler awaits its
  own tokens on an ``asyncio.Queue``.
- **Text** is decoded incrementally: a token is a run of bytes and a UTF-8
  character may be split across two tokens, so an incremental decoder holds
  the incomplete bytes back and every piece sent is whole characters. OpenAI's
  ``stop`` strings are matched on the text; text that could be the start of a
  stop string is held back until it is clear that it is not. Streamed pieces
  therefore join to exactly the non-streamed text.
- **Streaming** is server-sent events: ``data: {chunk json}\\n\\n`` per piece,
  then ``data: [DONE]\\n\\n``. A client that disconnects is noticed (Starlette
  cancels the response) and its request is cancelled in the scheduler, which
  frees its batch slot for others.

From Python (a notebook, a test), ``serve_in_background(create_app(model,
tokenizer, "name"))`` runs the server in a thread and yields its base URL;
``measure_load(url, "name", prompts, concurrency=8)`` sends requests through
the official client, several at a time, and returns the tokens per second,
latencies and times to first token that a user of the server would see.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import socket
import statistics
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmbook.bpe.tokenizer import Tokenizer
from llmbook.inference.engine import Engine, EngineError
from llmbook.model import GPT
from llmbook.posttrain.masking import encode_prompt
from llmbook.posttrain.templates import ENDOFTEXT, Message, Template, get_template

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class APIError(Exception):
    """An error answered in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# ---------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    """Fields both endpoints share; unknown fields (user, logit_bias...) are accepted and ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)  # the chat API's newer name for max_tokens
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's default and range; 0 is greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    seed: StrictInt | None = None
    n: StrictInt = 1
    logprobs: StrictBool | StrictInt | None = None  # asked for: a clear 400 rather than a silent null


class CompletionBody(_Body):
    prompt: StrictStr | list[StrictInt] | list[StrictStr]
    echo: StrictBool = False
    best_of: StrictInt | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[dict[str, Any]]


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)


# ---------------------------------------------------------------------- text out of tokens


class StopStrings:
    """OpenAI's ``stop``: text ends before the first stop string; text that might begin one is held back.

    >>> s = StopStrings(["END"])
    >>> s.feed("abcE"), s.feed("N"), s.feed("D more")
    (('abc', False), ('', False), ('', True))
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """``(text that is safe to send, whether a stop string was found)``."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = 0  # the longest end of `pending` that is the start of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        """What was held back, at the end of generation (it never became a stop string)."""
        out, self.pending = self.pending, ""
        return out


class Generation:
    """One request's tokens turned into text pieces: ``async for piece in gen.pieces(): ...``.

    After the loop, ``finish_reason`` is "stop" or "length" and
    ``completion_tokens`` counts the tokens the model generated (an end token
    included, as it was computed). If the loop is left early (a client that
    disconnected) the request is cancelled in the engine.
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer, prompt: list[int], max_tokens: int, temperature: float,
                 top_p: float, seed: int | None, stop_ids: Sequence[int], stop: Sequence[str]):
        self.engine, self.tokenizer = engine, tokenizer
        self.prompt_tokens = len(prompt)
        self.stop_ids = set(stop_ids)
        self.stop = StopStrings(stop)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        try:
            self.request_id, self.queue = engine.submit(
                prompt, max_tokens, temperature=temperature, top_p=None if top_p >= 1.0 else top_p,
                stop_tokens=sorted(self.stop_ids), seed=seed)
        except ValueError as exc:  # the scheduler's one-line reason (empty prompt, too long for the context)
            raise APIError(400, str(exc).splitlines()[0]) from None

    async def pieces(self) -> AsyncIterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds an unfinished character back
        try:
            while self.finish_reason is None:
                event = await self.queue.get()
                if isinstance(event, EngineError):
                    self.finish_reason = "error"
                    raise APIError(500, event.message, type="server_error")
                if event.token is not None:
                    self.completion_tokens += 1
                    if event.token not in self.stop_ids:
                        text, hit = self.stop.feed(decoder.decode(self.tokenizer.token_bytes(event.token)))
                        if text:
                            yield text
                        if hit:
                            self.finish_reason = "stop"
                            self.engine.cancel(self.request_id)  # no more tokens needed: free the slot
                            return
                if event.finished:
                    self.finish_reason = "length" if event.reason == "length" else "stop"
            text, hit = self.stop.feed(decoder.decode(b"", final=True))  # an unfinished character becomes U+FFFD
            text += "" if hit else self.stop.flush()
            if text:
                yield text
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the request if it has not finished (the client is gone); harmless after the end."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
            self.engine.cancel(self.request_id)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class _SSEResponse(StreamingResponse):
    """A ``StreamingResponse`` that always closes its generator, so a disconnect cancels the request at once.

    Starlette cancels the response when the client disconnects; if that
    happens while the generator waits in ``send``, the generator would stay
    suspended until garbage collection. Closing it runs its ``finally``.
    """

    def __init__(self, content, on_close=None, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close  # called at the end however it ends, even if the stream never started

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            if self.on_close is not None:
                self.on_close()


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------- the app

_EXPECTED = {"prompt": "a string or a list of token ids", "stop": "a string or a list of strings",
             "content": "a string or a list of text parts", "logprobs": "a boolean or an integer"}


def _is_union_branch(part: object) -> bool:
    """Whether a pydantic error location part names a union's branch ("str", "list[int]"), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "bool", "float") or "[" in part)



def create_app(engine_or_model: Engine | GPT, tokenizer: Tokenizer, model_name: str,
               template: Template | str = "chatml", max_batch: int = 8) -> FastAPI:
    """The FastAPI app serving ``engine_or_model`` as ``model_name``; run it with uvicorn.

    Given a ``GPT``, the app builds an ``Engine`` over the ``ContinuousBatcher``
    (``max_batch`` requests per step). The engine thread starts and stops with
    the app (its lifespan). Chat requests are rendered with ``template``
    ("chatml" by default, the template of the book's SFT); a tokenizer without
    its special tokens serves completions only.
    """
    if isinstance(engine_or_model, Engine):
        engine = engine_or_model
    else:
        engine = Engine.from_model(engine_or_model, max_batch=max_batch, vocab_size=tokenizer.vocab_size)
    template = get_template(template) if isinstance(template, str) else template
    context = engine.context_length
    eot = tokenizer.special_tokens.get(ENDOFTEXT)
    chat_ok = all(t in tokenizer.special_tokens for t in template.special_tokens)
    chat_stops = [tokenizer.special_tokens[t] for t in dict.fromkeys([template.end_token, ENDOFTEXT])
                  if t in tokenizer.special_tokens]
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        started_here = not engine.running
        engine.start()
        try:
            yield
        finally:
            if started_here:
                engine.stop()

    app = FastAPI(title="llmbook OpenAI-compatible server", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        # a union (prompt: str | list[int]) puts the branch's type in the location: "prompt.str"; drop it
        loc = [str(part) for part in err.get("loc", ()) if part != "body" and not _is_union_branch(part)]
        param = ".".join(loc) or None
        got = repr(err.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        if err.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {err.get('msg')}"
        elif err.get("type") == "missing":
            message = f"the field '{param}' is required"
        elif len(loc) < sum(1 for part in err.get("loc", ()) if part != "body"):
            message = f"{param} must be {_EXPECTED.get(loc[-1], 'of another type')} (got {got})"
        else:
            message = f"{param or 'the request body'}: {err.get('msg')} (got {got})"
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind).response()

    def check_common(body: _Body) -> None:
        if body.model != model_name:
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{model_name}'",
                           type="not_found_error", param="model", code="model_not_found")
        unsupported = [name for name in ("logprobs", "echo") if getattr(body, name, None) not in (None, False, 0)]
        if getattr(body, "best_of", None) not in (None, 1):
            unsupported.append("best_of")
        if unsupported:
            raise APIError(400, f"{unsupported[0]} is not supported by this server (it returns text only); "
                                "score text with llmbook.evaluation or lm-eval's llmbook model instead",
                           param=unsupported[0])
        if body.n != 1:
            raise APIError(400, f"n={body.n} is not supported: this server returns one choice per request (n=1); "
                                "send several requests instead", param="n")

    def check_length(prompt: list[int], max_tokens: int | None, default: int | None) -> int:
        if not prompt:
            raise APIError(400, "the prompt is empty: give at least one token of text", param="prompt")
        room = context - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt)} tokens but the model's context holds {context}, "
                                f"with at least one token left for the reply; shorten the prompt", param="prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            return min(default, room) if default is not None else room
        if max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} is too large: the prompt has {len(prompt)} tokens and the "
                                f"model's context holds {context}, so max_tokens can be at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def stops_of(body: _Body) -> list[str]:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"at most 4 stop strings (OpenAI's limit), got {len(stop)}", param="stop")
        return stop

    async def respond(body: _Body, request: Request, gen: Generation, kind: str):
        """The JSON response, or the SSE stream, of one generation; ``kind`` is "text" or "chat"."""
        rid = f"{'cmpl' if kind == 'text' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        obj = "text_completion" if kind == "text" else "chat.completion"

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if kind == "text":
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            out = {"id": rid, "object": obj if kind == "text" else "chat.completion.chunk", "created": now,
                   "model": model_name, "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            async def events() -> AsyncIterator[str]:
                pieces = gen.pieces()
                try:
                    if kind == "chat":
                        yield _sse(chunk([choice(None, None, first=True)]))
                    async for text in pieces:
                        yield _sse(chunk([choice(text, None)]))
                    yield _sse(chunk([choice(None, gen.finish_reason)]))
                    if include_usage:
                        yield _sse(chunk([], gen.usage()))
                except APIError as exc:  # headers are sent: the error goes in the stream, as OpenAI does
                    yield _sse({"error": {"message": exc.message, "type": exc.type, "param": None, "code": None}})
                finally:
                    await pieces.aclose()
                    gen.close()  # a disconnect lands here (even before the first token): the request is cancelled
                yield _sse("[DONE]")

            return _SSEResponse(events(), on_close=gen.close, media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        text = await collect(gen, request)
        if kind == "text":
            choices = [{"index": 0, "text": text, "logprobs": None, "finish_reason": gen.finish_reason}]
        else:
            choices = [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": gen.finish_reason}]
        return {"id": rid, "object": obj, "created": now, "model": model_name, "choices": choices,
                "usage": gen.usage()}

    async def collect(gen: Generation, request: Request) -> str:
        """All the text of a non-streamed generation; cancelled if the client disconnects while it waits."""
        parts: list[str] = []

        async def run() -> None:
            async for piece in gen.pieces():
                parts.append(piece)

        task = asyncio.ensure_future(run())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    raise APIError(499, "the client closed the request")
            task.result()
        finally:
            if not task.done():
                task.cancel()
            gen.close()
        return "".join(parts)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llmbook", "max_model_len": context}]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str):
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           type="not_found_error", param="model", code="model_not_found")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "llmbook"}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        check_common(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, f"a list of {len(prompt)} prompts is not supported: send one prompt per "
                                    "request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tokenizer.encode_ordinary(prompt)  # "<|endoftext|>" typed in a prompt is text, never the token
        else:
            bad = [i for i in prompt if not 0 <= i < tokenizer.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is not in the vocabulary (0..{tokenizer.vocab_size - 1})",
                               param="prompt")
            ids = list(prompt)
        max_tokens = check_length(ids, body.max_tokens, DEFAULT_COMPLETION_TOKENS)
        gen = Generation(engine, tokenizer, ids, max_tokens, body.temperature, body.top_p, body.seed,
                         [eot] if eot is not None else [], stops_of(body))
        return await respond(body, request, gen, "text")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        check_common(body)
        if not chat_ok:
            raise APIError(400, f"this model's tokenizer lacks the {template.name} template's special tokens "
                                f"{template.special_tokens}: it was not fine-tuned for chat; use /v1/completions")
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if not isinstance(content, str):  # OpenAI's content parts: [{"type": "text", "text": ...}, ...]
                if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                    raise APIError(400, f"messages.{i}.content: only text parts are supported",
                                   param=f"messages.{i}.content")
                content = "".join(part["text"] for part in content)
            messages.append(Message("system" if m.role == "developer" else m.role, content))
        try:
            # what a user typed is text, never markup: "<|im_end|>" in a message cannot close it (no injection)
            ids = encode_prompt(tokenizer, messages, template, special_in_content="ordinary")
        except ValueError as exc:
            raise APIError(400, str(exc).splitlines()[0], param="messages") from None
        max_tokens = check_length(ids, body.max_completion_tokens or body.max_tokens, None)
        gen = Generation(engine, tokenizer, ids, max_tokens, body.temperature, body.top_p, body.seed, chat_stops,
                         stops_of(body))
        return await respond(body, request, gen, "chat")

    return app


# ---------------------------------------------------------------------- running it from Python, and measuring it


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread; yields the base URL (``http://127.0.0.1:PORT/v1``).

    ``port=0`` takes a free port. Leaving the ``with`` block stops the server
    (and, through the app's lifespan, its engine). For notebooks and tests;
    from a shell use ``python -m llmbook.serve``.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="llmbook-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {host}:{port} did not start")
            time.sleep(0.01)
        yield f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@dataclass
class LoadResult:
    """What ``measure_load`` measured: per request, the latency and the time to its first token."""

    concurrency: int
    seconds: float  # wall time of the whole run
    completion_tokens: int  # generated by all requests together
    latency: list[float] = field(default_factory=list)  # seconds from sending a request to its last byte
    first_token: list[float] = field(default_factory=list)  # seconds from sending a request to its first text

    @property
    def requests(self) -> int:
        return len(self.latency)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    def summary(self) -> dict:
        """Numbers for a table: throughput, mean and 95th-percentile latency, mean time to first token."""
        p95 = statistics.quantiles(self.latency, n=20, method="inclusive")[-1] if self.requests > 1 else self.latency[0]
        return {"requests": self.requests, "concurrency": self.concurrency, "seconds": self.seconds,
                "tokens_per_s": self.tokens_per_s, "requests_per_s": self.requests_per_s,
                "mean_latency_s": statistics.fmean(self.latency), "p95_latency_s": p95,
                "mean_first_token_s": statistics.fmean(self.first_token)}


def measure_load(base_url: str, model: str, prompts: Sequence[str], max_tokens: int = 32, concurrency: int = 8,
                 temperature: float = 0.0, timeout: float = 120.0) -> LoadResult:
    """Send every prompt to ``/v1/completions`` (streamed), ``concurrency`` at a time, with the official client.

    What a user of the server feels: each request's latency and time to its
    first token, and the tokens per second of all of them together. The
    server must be on this machine or trusted: this sends requests to ``base_url``.
    """
    if not prompts:
        raise ValueError("measure_load needs at least one prompt")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=timeout)

    def one(prompt: str) -> tuple[float, float, int]:
        start = time.perf_counter()
        first, tokens = None, 0
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                                           stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        latency = time.perf_counter() - start
        return latency, latency if first is None else first, tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, prompts))
    seconds = time.perf_counter() - start
    return LoadResult(concurrency, seconds, sum(r[2] for r in results), [r[0] for r in results],
                      [r[1] for r in results])
