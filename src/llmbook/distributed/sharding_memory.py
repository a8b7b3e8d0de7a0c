"""Memory per rank under DDP, ZeRO-1, ZeRO-2 and FSDP: the ZeRO paper's formulas, and the same thing measured.

Training with AdamW keeps, for each of the Ψ parameters, its weight, its
gradient and K bytes of optimizer state. Rajbhandari et al. (2020, "ZeRO:
Memory Optimizations Toward Training Trillion Parameter Models") count
mixed-precision training as 2 bytes of fp16 weight, 2 of fp16 gradient and
K = 12 of optimizer state (an fp32 master copy of the weights, momentum and
variance, 4 bytes each; their Section 3.1), and give the memory per device
with data parallelism over N_d devices as (quoted, Figure 1 and Section 5):

    baseline (DDP)         (2 + 2 + K)·Ψ
    P_os       (stage 1)   2Ψ + 2Ψ + K·Ψ/N_d
    P_os+g     (stage 2)   2Ψ + (2 + K)·Ψ/N_d
    P_os+g+p   (stage 3)   (2 + 2 + K)·Ψ/N_d

Their Figure 1 example, Ψ = 7.5B, N_d = 64, K = 12 (quoted): 120 GB, 31.4 GB,
16.6 GB and 1.9 GB per device. Stage 3 is what PyTorch calls FSDP.

:func:`per_rank_memory` computes these from Chapter 1's bytes per parameter
(``llmbook.planning.PRECISIONS``: K is ``optimizer + master``), so the same
formulas give fp32 training's 4 + 4 + 8. Padding (each flat buffer rounded up
to a multiple of N_d) and the optimizer's step counters are ignored: a few
bytes per tensor. Activations are not in the formulas; they are not sharded by
any of the four (each rank has its own micro-batch).

:func:`measure_per_rank` checks the formulas on real runs: it spawns ranks,
builds one small GPT, takes a step with the book's DDP, ZeRO-1/2 or FSDP and
counts the bytes of the tensors that hold weights, gradients and optimizer
states on each rank (each storage once, so views and tied weights are not
counted twice).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from llmbook.model import GPT, ModelConfig
from llmbook.planning import PRECISIONS, PRESETS, TrainingMemory, count_params

STRATEGIES = ("ddp", "zero1", "zero2", "fsdp")
SHORT_NAMES = {"7B": "llama2-7B", "13B": "llama2-13B", "70B": "llama2-70B"}  # the planner's Llama 2 shapes

# small enough for seconds on 2 cores, big enough (~0.2M parameters) that padding and step counters are noise
MEASURE_CONFIG = ModelConfig(vocab_size=256, context_length=32, d_model=64, n_layers=4, n_heads=4, dropout=0.0)


def per_rank_memory(n_params: float, world_size: int, strategy: str, precision: str = "fp32") -> TrainingMemory:
    """Bytes per rank of weights, gradients, optimizer states and master weights (the ZeRO paper's formulas).

        >>> m = per_rank_memory(7.5e9, 64, "zero1", precision="mixed")  # P_os: 2Ψ + 2Ψ + 12Ψ/64
        >>> round(m.states / 1e9, 1)
        31.4
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if int(world_size) != world_size or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    b, n = PRECISIONS[precision], float(n_params)
    stage = STRATEGIES.index(strategy)  # 0 = DDP, 1 = optimizer states sharded, 2 = + gradients, 3 = + weights
    # each role is either whole on every rank or cut into world_size equal shards
    shard = lambda role_stage: world_size if stage >= role_stage else 1  # noqa: E731
    return TrainingMemory(
        weights=n * b.weights / shard(3),
        grads=n * b.grads / shard(2),
        optimizer=n * b.optimizer / shard(1),
        master=n * b.master / shard(1),  # the fp32 master copy is optimizer state (part of K): stage 1 shards it
    )


def model_params(model: str) -> tuple[str, int]:
    """``(name, parameter count)`` for a planner shape: ``"7B"`` is ``llama2-7B``, counted by ``count_params``."""
    name = SHORT_NAMES.get(model, model)
    if name not in PRESETS:
        raise ValueError(f"unknown model {model!r}; use {', '.join(SHORT_NAMES)} or a shape of {PRESETS.names()}")
    return name, count_params(PRESETS[name]).total


def memory_table(models: Iterable[str] = ("7B", "70B"), world_size: int = 8, precision: str = "mixed") -> list[dict]:
    """One row per (model, strategy): bytes per rank by role and in total, from the planner's shapes.

    The shapes are Llama 2's (Touvron et al. 2023) as ``llmbook.shapes``
    records them; the counts come from ``count_params`` (6.74e9 and 6.90e10).
    """
    rows = []
    for model in models:
        name, n = model_params(model)
        for strategy in STRATEGIES:
            m = per_rank_memory(n, world_size, strategy, precision)
            rows.append({"model": name, "params": n, "strategy": strategy, "world_size": world_size,
                         "precision": precision, "weights": m.weights, "grads": m.grads,
                         "optimizer": m.optimizer + m.master, "total": m.states})
    return rows


# ---------------------------------------------------------------------------------------- measured


def storage_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors``: a view, a shard's parent or a tied weight counts once."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _optimizer_tensors(opt) -> list[Tensor]:
    inner = getattr(opt, "optimizer", opt)  # ZeroOptimizer wraps an AdamW over its shards
    return [t for s in inner.state.values() for t in s.values() if isinstance(t, Tensor)]


def _report(strategy: str, params: list[Tensor], grads: list[Tensor | None], opt) -> dict:
    out = {"strategy": strategy, "params": storage_bytes(params), "grads": storage_bytes(grads),
           "optimizer": storage_bytes(_optimizer_tensors(opt))}
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


def _batch(cfg: ModelConfig, rank: int, batch_size: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data, as in data parallelism
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.context_length + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _measure_one(strategy: str, cfg: ModelConfig, rank: int, batch_size: int, peak: bool) -> dict:
    """Build, take two steps (the second one measured if ``peak``), report the steady state with gradients present."""
    from llmbook.distributed.ddp import DataParallel
    from llmbook.distributed.fsdp import FullyShardedModel
    from llmbook.distributed.zero import ZeroOptimizer
    from llmbook.optim import AdamW

    torch.manual_seed(0)
    model: nn.Module = GPT(cfg)
    hp = dict(lr=1e-3, weight_decay=0.1)
    if strategy in ("single", "ddp"):
        model = DataParallel(model) if strategy == "ddp" else model
        opt = AdamW(model.parameters(), **hp)
    elif strategy in ("zero1", "zero2"):
        opt = ZeroOptimizer(model.parameters(), stage=int(strategy[-1]), **hp)
    else:
        model = FullyShardedModel(model)
        opt = AdamW(model.parameters(), **hp)
    x, y = _batch(cfg, rank, batch_size)

    def step() -> None:
        _, loss = model(x, y)
        loss.backward()
        opt.step()

    step()  # the first step creates the optimizer states
    opt.zero_grad(set_to_none=True)
    if peak:  # the most bytes alive during a whole step: resident weights and states + what the step allocates
        from llmbook.kernels.memory import peak_memory  # the profiler: seconds to import, only when asked

        resident = storage_bytes(_optimizer_tensors(opt))  # the weights are added below (unchanged by a step)
        _, above = peak_memory(step)
    else:
        step()

    if strategy in ("single", "ddp"):  # every tensor whole on every rank: count them
        params = list(model.parameters())
        out = _report(strategy, params, [p.grad for p in params], opt)
    elif strategy == "fsdp":  # shards, their gradients, the states (and gathered buffers: none after a step)
        r = model.memory_report(opt)
        out = {"strategy": strategy, **{k: r[k] for k in ("params", "grads", "optimizer", "total")}}
    else:  # ZeroOptimizer measures its own flat buffers, the storage behind its shards' gradients, its states
        r = opt.memory_report()
        out = {"strategy": strategy, "params": r["param_bytes"], "grads": r["gradient_bytes"],
               "optimizer": r["state_bytes"]}
        out["total"] = out["params"] + out["grads"] + out["optimizer"]
    if peak:
        out["peak_step"] = resident + out["params"] + above
    return out


def _measure_rank(rank: int, world_size: int, strategies: tuple[str, ...], cfg: ModelConfig,
                  batch_size: int, peak: bool) -> dict:
    out = {}
    for strategy in strategies:
        out[strategy] = _measure_one(strategy, cfg, rank, batch_size, peak)
        gc.collect()
    return out


def measure_strategies(world_size: int, strategies: Iterable[str] = STRATEGIES, cfg: ModelConfig | None = None,
                       batch_size: int = 2, peak: bool = False) -> dict[str, list[dict]]:
    """Measured bytes per rank ``{strategy: [rank 0's report, rank 1's, ...]}``, all strategies in one spawn.

    Each report holds ``params``, ``grads``, ``optimizer`` and ``total`` bytes
    on that rank after a step, gradients still present (the most a step
    keeps between steps), and with ``peak`` also ``peak_step``: the most bytes
    alive during one step (profiler-measured on the CPU, activations and
    gathered buffers included; slower). ``"single"`` is plain training
    without any wrapper: one process's bytes, measured on each rank alike.
    """
    from llmbook.distributed.launcher import spawn

    strategies = tuple(strategies)
    bad = [s for s in strategies if s not in (*STRATEGIES, "single")]
    if bad:
        raise ValueError(f"unknown strategies {bad}; choose from {('single', *STRATEGIES)}")
    cfg = MEASURE_CONFIG if cfg is None else cfg
    # spawned even for one rank: a rank runs one torch thread, and the group DDP, ZeRO and FSDP need
    ranks = spawn(_measure_rank, world_size, strategies, cfg, batch_size, peak)
    return {s: [r[s] for r in ranks] for s in strategies}


def measure_per_rank(strategy: str, world_size: int, cfg: ModelConfig | None = None, batch_size: int = 2,
                     peak: bool = False) -> list[dict]:
    """Measured bytes on each rank for one strategy (see :func:`measure_strategies`)."""
    return measure_strategies(world_size, (strategy,), cfg, batch_size, peak)[strategy]
