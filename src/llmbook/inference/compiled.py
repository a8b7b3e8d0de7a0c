"""``torch.compile`` for decoding: fewer, fused kernels per step, the same tokens.

A decode step of a small model is mostly overhead (``decode_cost``): for every
layer, Python runs the block's code and PyTorch dispatches a dozen small
kernels (a norm, a matmul, a reshape, a softmax, ...), each reading and writing
its tensor. ``torch.compile`` traces a block once into a graph (TorchDynamo),
fuses the elementwise work into a few generated C++ kernels (TorchInductor,
which needs a C++ compiler on the CPU) and replays them without the Python in
between. The arithmetic is the same up to rounding (fused kernels may add in
another order), so greedy decoding gives the same tokens; we check it.

We compile each ``Block`` rather than the whole ``GPT``: ``GPT.forward`` checks
its inputs with ``int(...)`` (data-dependent Python, which splits a graph), and
every block runs the same code, so one compiled graph serves all layers. The
cache length changes every step; Dynamo specializes on the first value it sees,
recompiles once with the length symbolic, and reuses that graph afterwards.
The first run pays for all of it: ``compile_s``. Where compiling fails (no
C++ compiler, an unsupported platform) the result carries ``skipped``, one line
saying why, instead of numbers.

Measured on 2 cores shared by 8 jobs, one thread, 16-token prompt, 32 new
tokens: gpt-tiny 205 → 724 tokens/s (3.5x) after 90 s of compiling; a 10.5M
model (width 256, 12 layers) 27 → 46 tokens/s (1.7x) after 61 s; greedy
tokens identical in both. laptop-llama (RoPE, SwiGLU): 176 → 514 tokens/s
(2.9x), identical tokens, after 72 s of compiling the first time and 6.6 s
the second: Inductor keeps the generated kernels in an on-disk cache
(``/tmp/torchinductor_$USER``), which ``torch._dynamo.reset()`` does not
clear, so ``compile_s`` is a cold compile only on a fresh machine.
``dynamic=True`` compiled no faster (86 s) and ran slower (1.25x on
gpt-tiny). The compile time is why the chapter reads these numbers from the
benchmark's results instead of compiling while it runs.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass

import torch

from llmbook.inference.decode_cost import _greedy_run, _param_dtype
from llmbook.model import GPT


@dataclass(frozen=True)
class CompiledDecode:
    """Eager vs compiled greedy decoding of one model: tokens/s, compile seconds, whether the tokens agree."""

    mode: str | None  # torch.compile's mode (None: the default)
    eager_tokens_per_s: float | None = None
    compiled_tokens_per_s: float | None = None
    compile_s: float | None = None  # the first compiled run's extra time: tracing, code generation, C++ builds
    identical: bool | None = None  # the greedy tokens of both are the same
    skipped: str | None = None  # why there are no numbers, in one line

    @property
    def speedup(self) -> float | None:
        if self.skipped or not self.eager_tokens_per_s:
            return None
        return self.compiled_tokens_per_s / self.eager_tokens_per_s


def _decode(model: GPT, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    """Greedy decoding with the KV cache (``decode_cost``'s loop): the new tokens and the mean seconds per decode
    step (prefill not counted)."""
    _, steps, tokens = _greedy_run(model, prompt, new_tokens, use_cache=True, dtype=_param_dtype(model))
    return tokens[0], statistics.fmean(steps)


def compiler_missing() -> str | None:
    """Why Inductor cannot build CPU kernels here (no C++ compiler on the PATH), or None."""
    if any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        return None
    return "torch.compile skipped: no C++ compiler (g++, c++ or clang++) on the PATH for Inductor's CPU kernels"


def compiled_decode(
    model: GPT, prompt_len: int = 16, new_tokens: int = 32, mode: str | None = None, repeats: int = 3, seed: int = 0,
    dynamic: bool | None = None,
) -> CompiledDecode:
    """Greedy decoding tokens/s with each block compiled by ``torch.compile(mode=mode)`` vs eager, same prompt.

    Eager runs once to warm up, then ``repeats`` times (median); the compiled
    model's first run compiles (``compile_s`` = its time minus a steady run's),
    then ``repeats`` timed runs. Calls ``torch._dynamo.reset()`` first, so the
    compile time is honest (it forgets every graph compiled before in this
    process; Inductor's on-disk kernel cache survives, and makes a repeat
    fast). The model is left as it came (its blocks restored, its mode too).
    Every mode runs on a CPU (measured, gpt-tiny, identical tokens): None
    (the default), "max-autotune-no-cudagraphs" (also times alternative matmul
    kernels: 28 s of compiling, 2.5x) and "reduce-overhead" (its CUDA graphs
    need a GPU, so on a CPU it is the default's kernels: 2.1x). ``dynamic``
    is passed on (True: compile for symbolic shapes at once instead of
    specializing first and recompiling).
    """
    if prompt_len < 1 or new_tokens < 2 or repeats < 1:
        raise ValueError(f"need prompt_len >= 1, new_tokens >= 2 and repeats >= 1; got {prompt_len}, {new_tokens}, "
                         f"{repeats}")
    if prompt_len + new_tokens > model.cfg.context_length:
        raise ValueError(f"prompt_len + new_tokens = {prompt_len + new_tokens} is more than the model's "
                         f"context_length={model.cfg.context_length}")
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), generator=gen)
    was_training = model.training
    model.eval()
    blocks = list(model.blocks)
    try:
        _decode(model, prompt, new_tokens)  # warm-up
        eager = [_decode(model, prompt, new_tokens) for _ in range(repeats)]
        eager_tokens, eager_step = eager[0][0], statistics.median(s for _, s in eager)
        missing = compiler_missing()
        if missing:
            return CompiledDecode(mode, eager_tokens_per_s=1 / eager_step, skipped=missing)
        try:
            torch._dynamo.reset()
            for i, block in enumerate(blocks):
                model.blocks[i] = torch.compile(block, mode=mode, dynamic=dynamic)
            start = time.perf_counter()
            first, _ = _decode(model, prompt, new_tokens)  # compiles: prefill shape, then the decode shapes
            first_s = time.perf_counter() - start
            runs = [_decode(model, prompt, new_tokens) for _ in range(repeats)]
        except Exception as e:  # noqa: BLE001 - any compiler failure means: no numbers here, say why
            line = (str(e).strip().splitlines() or [""])[0][:200]
            return CompiledDecode(mode, eager_tokens_per_s=1 / eager_step,
                                  skipped=f"torch.compile failed here: {type(e).__name__}: {line}")
        step = statistics.median(s for _, s in runs)
        steady_run = step * (new_tokens - 1)
        identical = all(tokens == eager_tokens for tokens, _ in [(first, 0.0), *runs])
        return CompiledDecode(mode, 1 / eager_step, 1 / step, max(first_s - steady_run, 0.0), identical)
    finally:
        for i, block in enumerate(blocks):
            model.blocks[i] = block
        model.train(was_training)
