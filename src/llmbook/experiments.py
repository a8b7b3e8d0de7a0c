"""Short training runs and the sweeps practitioners run before a long one (Chapter 7).

A long run is expensive, so its settings are chosen from many short ones: a
learning-rate sweep up to the rate where training diverges, batch sizes
compared at the same number of tokens, and ablations that change one part of
the model at a matched parameter count, over several seeds. Each short run is
``Trainer.train_step`` in a loop, with every step's loss kept:

    >>> cfg = short_config(max_steps=20)                  # gpt-tiny on bytes, one thread
    >>> result = run(cfg, label="lr 1e-3")                # seconds
    >>> result.final_loss < result.initial_loss           # it learned something
    True

A run *diverges* when a loss turns NaN or infinite, or when its final loss
(the mean of its last steps, to smooth the noise of single batches) ends
above the loss it started from. A run stops as soon as it has diverged,
and gets no validation loss.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from llmbook import planning
from llmbook.model import ModelConfig
from llmbook.train import Trainer
from llmbook.train_config import TrainConfig

TAIL_STEPS = 10  # the final loss is the mean of this many last steps: one batch is too noisy to compare runs


@dataclass
class RunResult:
    """What one short run measured: every step's training loss, the validation loss, and what it cost."""

    label: str
    cfg: TrainConfig
    losses: list[float]  # training loss of each step taken, nats per token
    val_loss: float | None  # nats per token on the validation batches; None if the run diverged
    val_bpb: float | None
    seconds: float  # wall time of the training steps (evaluation excluded)
    cpu_seconds: float  # process CPU time of the same steps: on one thread, barely moved by other programs
    params: int

    @property
    def initial_loss(self) -> float:
        return self.losses[0]

    @property
    def final_loss(self) -> float:
        """Mean training loss of the last ``TAIL_STEPS`` steps (NaN or inf if one of them was)."""
        return float(np.mean(self.losses[-TAIL_STEPS:]))

    @property
    def diverged(self) -> bool:
        """NaN/inf anywhere, or a final loss above the initial one: the run made the model worse."""
        return not all(map(math.isfinite, self.losses)) or self.final_loss > self.initial_loss

    @property
    def tokens_per_s(self) -> float:
        return len(self.losses) * self.cfg.tokens_per_step / self.seconds if self.seconds else 0.0


def short_config(base: TrainConfig | None = None, **changes) -> TrainConfig:
    """A config for a run of seconds: ``base`` (default: gpt-tiny on bytes) with ``changes``.

    Whatever the base, a short run samples no text, writes no checkpoints,
    evaluates only at the end on ``eval_batches`` batches, and runs on one
    thread (tensors this small only lose by being shared between threads).
    """
    if base is None:
        base = TrainConfig(name="short", model="gpt-tiny", tokenizer="bytes", batch_size=16, context_length=64,
                           max_steps=100, lr=3e-3)
    quiet = dict(sample_tokens=0, eval_interval=0, checkpoint_interval=0, eval_batches=8, threads=1)
    return dataclasses.replace(base, **{**quiet, **changes})


def run(cfg: TrainConfig, label: str = "") -> RunResult:
    """Train ``cfg`` for ``cfg.max_steps`` steps; validate unless it diverged.

    A run that diverges stops there: once a loss is NaN or infinite, or the
    mean of its last ``TAIL_STEPS`` losses is above the first loss.
    """
    with tempfile.TemporaryDirectory() as tmp:  # the trainer wants a folder; a short run writes nothing there
        trainer = Trainer(cfg, tmp, progress=False)
        losses: list[float] = []
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(cfg.max_steps):
            loss, _ = trainer.train_step()
            losses.append(loss.item())
            tail = losses[-TAIL_STEPS:]
            if not math.isfinite(losses[-1]) or (len(tail) == TAIL_STEPS and np.mean(tail) > losses[0]):
                break  # diverged: NaN from here on, or worse than the untrained model; the rest would only cost time
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        result = RunResult(label or cfg.name, cfg, losses, None, None, wall, cpu, trainer.raw_model.num_params())
        if not result.diverged:
            evaluation = trainer.validate()
            result.val_loss, result.val_bpb = evaluation["loss"], evaluation["bpb"]
    return result


# ---------------------------------------------------------------------- the learning rate


def lr_sweep(cfg: TrainConfig, lrs: Iterable[float], stop_after_diverged: int = 1) -> list[RunResult]:
    """One run per learning rate, in increasing order; stops once ``stop_after_diverged`` in a row diverged.

    Everything else (the seed, hence the initial weights and the batches) is the
    same for every rate, so the runs differ in the learning rate alone.
    """
    results, diverged_in_a_row = [], 0
    for lr in sorted(lrs):
        result = run(dataclasses.replace(cfg, lr=float(lr)), label=f"lr {lr:g}")
        results.append(result)
        diverged_in_a_row = diverged_in_a_row + 1 if result.diverged else 0
        if diverged_in_a_row >= stop_after_diverged:
            break
    return results


def best_run(results: Sequence[RunResult]) -> RunResult:
    """The run with the lowest final training loss among those that did not diverge."""
    healthy = [r for r in results if not r.diverged]
    if not healthy:
        raise ValueError("every run diverged: sweep smaller learning rates")
    return min(healthy, key=lambda r: r.final_loss)


def first_divergence(results: Sequence[RunResult]) -> RunResult | None:
    """The diverged run with the smallest learning rate above the best run's, or None if none diverged."""
    best_lr = best_run(results).cfg.lr
    above = [r for r in results if r.diverged and r.cfg.lr > best_lr]
    return min(above, key=lambda r: r.cfg.lr) if above else None


# ---------------------------------------------------------------------- the batch size


def steps_for_tokens(token_budget: int, batch_size: int, context_length: int) -> int:
    """Optimizer steps that spend ``token_budget`` tokens on batches of ``batch_size`` x ``context_length``.

        >>> steps_for_tokens(65_536, 16, 64)
        64
    """
    steps = token_budget // (batch_size * context_length)
    if steps < 1:
        raise ValueError(f"{token_budget} tokens do not fill one batch of {batch_size} x {context_length}")
    return steps


def batch_sweep(cfg: TrainConfig, batch_sizes: Iterable[int], token_budget: int) -> list[RunResult]:
    """One run per batch size, each training on the same ``token_budget`` tokens (fewer steps for larger batches).

    The warmup is the same share of every run (the config's default, 2% of the steps).
    """
    results = []
    for b in batch_sizes:
        steps = steps_for_tokens(token_budget, b, cfg.context_length)
        changed = dataclasses.replace(cfg, batch_size=b, max_steps=steps, warmup_steps=None, decay_steps=None)
        results.append(run(changed, label=f"batch {b}"))
    return results


# ---------------------------------------------------------------------- ablations


def count_params(model_cfg: ModelConfig) -> int:
    """Parameters of a model config, counted by Chapter 1's planner (equal to ``GPT(cfg).num_params()``)."""
    return planning.count_params(model_cfg.to_shape()).total


def matched_d_ff(model_cfg: ModelConfig, target_params: int) -> int:
    """The MLP width ``d_ff`` that brings ``model_cfg`` closest to ``target_params`` parameters.

    The count is linear in ``d_ff`` (every MLP matrix has one side of that
    width), so two counts give the slope; the rounded solution and its
    neighbours are checked. A SwiGLU MLP has three matrices where a GELU MLP
    has two, so matching a GELU MLP of width 4d takes a SwiGLU of about 8d/3.
    """
    def params(d_ff: int) -> int:
        return count_params(dataclasses.replace(model_cfg, d_ff=d_ff))

    slope = params(2) - params(1)
    guess = max(1, round(1 + (target_params - params(1)) / slope))
    return min(range(max(1, guess - 2), guess + 3), key=lambda d_ff: abs(params(d_ff) - target_params))


def seed_runs(cfg: TrainConfig, seeds: Iterable[int], label: str = "") -> list[RunResult]:
    """The same config once per seed: new initial weights and new batches each time."""
    return [run(dataclasses.replace(cfg, seed=s), label=f"{label or cfg.name}, seed {s}") for s in seeds]


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """The mean and half the range of ``values``: the error bar of a handful of seeds.

    With two or three seeds a standard deviation is itself a guess; the range
    shows every run. ``[2.0, 2.2] -> (2.1, 0.1)``.
    """
    if not values:
        raise ValueError("no values")
    return float(np.mean(values)), (max(values) - min(values)) / 2


# ---------------------------------------------------------------------- the hardware's side


def cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n x n fp32 matmul per second of this thread's CPU time: the best of ``repeats``.

    ``planning.measure_matmul_flops`` divides by wall time, which grows when other
    programs share the cores; with one torch thread the matmul runs on the
    calling thread, and its CPU time is what the work itself cost. That makes it
    the peak to divide a run's CPU-time rate by (its MFU).
    """
    return planning.measure_matmul_flops(n, repeats, clock=time.thread_time)
