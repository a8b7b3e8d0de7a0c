"""Pretraining benchmark: the reference recipe against its target, and our AdamW against PyTorch's.

    .venv/bin/python benchmarks/bench_pretraining.py              # from the repository root
    .venv/bin/python benchmarks/bench_pretraining.py --baseline   # also train nanoGPT's recipe (minutes more)
    .venv/bin/python benchmarks/bench_pretraining.py --speed-only # only the interleaved speed comparisons

Measures on this machine, with nothing else running:

* the book's reference recipe (``TRAIN_PRESETS["shakespeare"]``), trained from
  scratch in a temporary folder: training seconds (evaluations excluded),
  tokens per second, and the held-out bits per byte of Tiny Shakespeare.
  Target: at most 2.2 bits per byte within 5 minutes of training;
* with ``--baseline``, nanoGPT's character-level CPU recipe
  (``shakespeare-nanogpt``: 4 × 128, context 64, batch 12, 2,000 steps) for
  the same measurements;
* the time of one optimizer step of our from-scratch ``AdamW`` (a loop over the
  parameters) against ``torch.optim.AdamW`` (foreach, and fused) on the reference
  model's parameters: the ratio says what clarity costs;
* our ``Trainer`` against a bare loop over the same model built from PyTorch's
  own parts (``nn.LayerNorm``, ``F.gelu``, ``F.scaled_dot_product_attention``,
  ``torch.optim.AdamW(foreach=True)``, ``F.cross_entropy``, nanoGPT's batches) at
  nanoGPT's CPU configuration (``shakespeare-nanogpt``: 4 x 128, context 64,
  batch 12, bytes, with SDPA attention as nanoGPT has). Target: the trainer at
  >= 0.95x the bare loop's tokens per second;
* the reference recipe's step time with the norms and activations from scratch
  against PyTorch's fused kernels (``GPT.use_fused_kernels``).

Both comparisons alternate blocks of steps of each contender for several
rounds in one process and take medians, so that a busy machine slows both
alike. The trainer's time is its ``train()`` calls' wall time less its
checkpoint writes (one at the end of every block, an artefact of the blocks).

The script exits with status 1 when a target is missed. Results, with the
hardware, the date and the library versions, go to
benchmarks/results/pretraining.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "pretraining.json"
TARGET_BPB = 2.2
TARGET_SECONDS = 300.0

# Offline by default: use the repository's shared data folder when none is set.
_SHARED = ROOT.parent / "shared" / "data"
if "LLMBOOK_DATA_DIR" not in os.environ and _SHARED.is_dir():
    os.environ["LLMBOOK_DATA_DIR"] = str(_SHARED)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from llmbook.model import GPT, ModelConfig  # noqa: E402
from llmbook.notebook import machine_summary  # noqa: E402
from llmbook.optim import AdamW, param_groups  # noqa: E402
from llmbook.train import TRAIN_PRESETS, TrainConfig, Trainer  # noqa: E402


def train_preset(name: str) -> dict:
    """Train a preset from scratch in a temporary folder; the run's summary."""
    with tempfile.TemporaryDirectory() as tmp:
        return Trainer(TRAIN_PRESETS[name], Path(tmp) / name).train()


def optimizer_step_ms(optimizer_cls, model: GPT, repeats: int = 50, **kw) -> float:
    """Median milliseconds of one ``optimizer.step()`` over the model's parameters, random gradients."""
    optimizer = optimizer_cls(param_groups(model, 0.1), lr=1e-3, **kw)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    times = []
    for _ in range(repeats + 5):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    times = sorted(times[5:])
    return 1000 * times[len(times) // 2]


# ---------------------------------------------------------------------- the trainer against a bare loop

SPEED_TARGET = 0.95  # the trainer's tokens/s at least this fraction of the bare loop's


class BareBlock(nn.Module):
    """A GPT-2 block from PyTorch's parts, parameter names as ``llmbook.model.Block`` (GPT-2 style only)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, bias = cfg.d_model, cfg.bias
        self.n_heads = cfg.n_heads
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps, bias=bias)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps, bias=bias)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d, bias=bias), "proj": nn.Linear(d, d, bias=bias)})
        self.mlp = nn.ModuleDict({"fc": nn.Linear(d, cfg.ff_dim, bias=bias),
                                  "proj": nn.Linear(cfg.ff_dim, d, bias=bias)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.attn["qkv"](self.norm1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn["proj"](y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp["proj"](F.gelu(self.mlp["fc"](self.norm2(x)), approximate="tanh"))


class BareGPT(nn.Module):
    """nanoGPT's model from PyTorch's parts; loads an ``llmbook.model.GPT`` state dict of the same config."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        style = (cfg.norm, cfg.mlp, cfg.positions, cfg.prenorm, cfg.tied_embeddings, cfg.n_kv_heads or cfg.n_heads)
        if style != ("layernorm", "gelu", "learned", True, True, cfg.n_heads) or cfg.dropout:
            raise ValueError("the bare loop builds GPT-2 style models only (pre-norm, tied, no dropout)")
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        self.blocks = nn.ModuleList(BareBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def bare_loop(trainer: Trainer) -> tuple[Callable[[int], None], BareGPT]:
    """``run(n)``: n steps of nanoGPT's loop over ``trainer``'s data, model and recipe, PyTorch's parts only."""
    cfg, data = trainer.cfg, trainer.data.train
    model = BareGPT(trainer.model_config).to(trainer.device)
    model.load_state_dict(trainer.raw_model.state_dict())  # the same initial weights
    decay = [p for p in model.parameters() if p.dim() >= 2]  # nanoGPT's rule: matrices decay
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)
    B, T, step = cfg.batch_size, cfg.context_length, 0

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:  # nanoGPT's get_batch
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        return x.to(trainer.device), y.to(trainer.device)

    def run(n: int) -> None:
        nonlocal step
        for _ in range(n):
            for group in optimizer.param_groups:
                group["lr"] = trainer.schedule(step)
            x, y = get_batch()
            loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.log_interval == 0:
                loss.item()  # logging reads the loss, as the trainer does every log_interval steps

    return run, model


def trainer_blocks(trainer: Trainer) -> Callable[[int], tuple[float, float]]:
    """``run(n)``: n more steps of ``trainer.train()``; (wall, CPU) seconds they took, less checkpoint writes."""
    saving = [0.0, 0.0]
    save = trainer.save_checkpoint

    def timed_save():  # train() saves when it stops: the end of every block here, not part of training
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return save()
        finally:
            saving[0] += time.perf_counter() - wall
            saving[1] += time.process_time() - cpu

    trainer.save_checkpoint = timed_save

    def run(n: int) -> tuple[float, float]:
        saving[:] = [0.0, 0.0]
        wall, cpu = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):  # "stopped at step ..." after every block
            trainer.train(stop_at=trainer.step + n)
        return time.perf_counter() - wall - saving[0], time.process_time() - cpu - saving[1]

    return run


def interleaved(contenders: dict[str, Callable[[int], tuple[float, float] | None]], steps: int, rounds: int) -> dict:
    """Blocks of ``steps`` of each contender in turn, the order reversed every other round, for ``rounds`` rounds.

    Returns per contender the wall and CPU seconds per step of every block, and
    their medians. Wall time is what tokens/s means; with one thread the CPU
    time is steadier on a busy machine (a block that waits for a core is not charged).
    """
    for run in contenders.values():
        run(5)  # warm up: first allocations
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in contenders}
    for r in range(rounds):
        for name in list(contenders)[:: 1 if r % 2 == 0 else -1]:
            wall, cpu = time.perf_counter(), time.process_time()
            measured = contenders[name](steps)
            wall, cpu = measured or (time.perf_counter() - wall, time.process_time() - cpu)
            times[name]["wall"].append(wall / steps)
            times[name]["cpu"].append(cpu / steps)
    return {name: {**t, "wall_median": statistics.median(t["wall"]), "cpu_median": statistics.median(t["cpu"])}
            for name, t in times.items()}


def paired_ratio(times: dict, slow: str, fast: str, clock: str = "wall") -> float:
    """``slow``'s speed relative to ``fast``'s: the median over rounds of their seconds' ratio in the same round."""
    return statistics.median(f / s for s, f in zip(times[slow][clock], times[fast][clock], strict=True))


def speed_config(name: str, **changes) -> TrainConfig:
    """A preset for timing: no evaluations or samples (their time is not training), steps as the preset's."""
    return dataclasses.replace(TRAIN_PRESETS[name], eval_interval=0, sample_tokens=0, **changes)


def trainer_vs_bare(steps: int, rounds: int) -> dict:
    """Our Trainer against the bare loop at nanoGPT's CPU configuration, tokens per second of each."""
    preset = TRAIN_PRESETS["shakespeare-nanogpt"]
    # nanoGPT uses PyTorch's SDPA (flash) attention; the preset's model must too, to be the same computation
    cfg = speed_config("shakespeare-nanogpt", model_overrides={**preset.model_overrides, "attention": "sdpa"})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "trainer", progress=False)
        bare, bare_model = bare_loop(trainer)
        x, y = trainer.get_batch(0, 0)
        with torch.no_grad():  # the same model: the same first loss
            ours_loss, bare_loss = trainer.raw_model(x, y)[1].item(), bare_model(x, y).item()
        if abs(ours_loss - bare_loss) > 1e-4:
            raise AssertionError(f"the bare model is not the trainer's: first loss {bare_loss} vs {ours_loss}")
        contenders = {"trainer": trainer_blocks(trainer), "bare": bare}
        fused = all(m.fused for m in trainer.raw_model.modules() if hasattr(m, "fused"))
        if not fused:  # the trainer does not turn on the fused kernels itself: time it with them too
            with_fused = Trainer(cfg, Path(tmp) / "trainer-fused", progress=False)
            with_fused.raw_model.use_fused_kernels()
            contenders["trainer_fused"] = trainer_blocks(with_fused)
        per_step = interleaved(contenders, steps, rounds)
    tokens = cfg.tokens_per_step
    result = {"config": "shakespeare-nanogpt + attention=sdpa, no evaluations", "threads": torch.get_num_threads(),
              "trainer_fused_kernels": fused, "steps_per_block": steps, "rounds": rounds,
              "first_loss": {"trainer": round(ours_loss, 5), "bare": round(bare_loss, 5)}}
    for name, t in per_step.items():
        result[name] = {"ms_per_step": round(1000 * t["wall_median"], 2),
                        "tokens_per_s": round(tokens / t["wall_median"]),
                        "cpu_ms_per_step": round(1000 * t["cpu_median"], 2),
                        "ms_per_step_by_block": [round(1000 * x, 1) for x in t["wall"]]}
    # the trainer's tokens/s as a fraction of the bare loop's: per round (both saw the same load), then the median
    ratio = paired_ratio(per_step, "trainer", "bare")
    result.update(ratio=round(ratio, 3), ratio_cpu=round(paired_ratio(per_step, "trainer", "bare", "cpu"), 3),
                  target_at_least=SPEED_TARGET, met=ratio >= SPEED_TARGET)
    if not fused:
        result["ratio_with_fused_kernels"] = round(paired_ratio(per_step, "trainer_fused", "bare"), 3)
        result["ratio_cpu_with_fused_kernels"] = round(paired_ratio(per_step, "trainer_fused", "bare", "cpu"), 3)
    return result


def reference_kernels(steps: int, rounds: int) -> dict:
    """The reference recipe's step time, norms and activations from scratch against PyTorch's fused kernels."""
    cfg = speed_config("shakespeare")
    with tempfile.TemporaryDirectory() as tmp:
        contenders = {}
        for fused in (False, True):
            trainer = Trainer(cfg, Path(tmp) / f"fused-{fused}", progress=False)
            trainer.raw_model.use_fused_kernels(fused)
            contenders["fused" if fused else "from_scratch"] = trainer_blocks(trainer)
        per_step = interleaved(contenders, steps, rounds)
    return {
        "config": "shakespeare, no evaluations", "threads": torch.get_num_threads(), "steps_per_block": steps,
        "rounds": rounds, "from_scratch_ms_per_step": round(1000 * per_step["from_scratch"]["wall_median"], 2),
        "fused_ms_per_step": round(1000 * per_step["fused"]["wall_median"], 2),
        "speedup": round(paired_ratio(per_step, "fused", "from_scratch"), 3),
        "speedup_cpu": round(paired_ratio(per_step, "fused", "from_scratch", "cpu"), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", action="store_true", help="also train nanoGPT's character-level recipe")
    parser.add_argument("--speed-only", action="store_true", help="only the interleaved speed comparisons")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for everything (default: torch's)")
    parser.add_argument("--steps", type=int, default=50, help="steps per block of the speed comparisons")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of blocks of the speed comparisons")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    result = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.is_file() else {}
    machine = {**machine_summary(), "platform": platform.platform()}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    speed = {"date": now, "machine": machine, "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
             "trainer_vs_bare": trainer_vs_bare(args.steps, args.rounds),
             "reference_kernels": reference_kernels(max(10, args.steps // 2), args.rounds)}
    result["speed"] = speed
    met = speed["trainer_vs_bare"]["met"]

    if not args.speed_only:
        runs = {"shakespeare": train_preset("shakespeare")}
        if args.baseline:
            runs["shakespeare-nanogpt"] = train_preset("shakespeare-nanogpt")
        model = GPT(TRAIN_PRESETS["shakespeare"].model_config(1024))
        ours = optimizer_step_ms(AdamW, model)
        foreach = optimizer_step_ms(torch.optim.AdamW, model, foreach=True)
        fused = optimizer_step_ms(torch.optim.AdamW, model, fused=True)
        ref = runs["shakespeare"]
        recipe_met = ref["val_bpb"] <= TARGET_BPB and ref["train_seconds"] <= TARGET_SECONDS
        met = met and recipe_met
        result.update({
            "date": now, "machine": machine,
            "runs": {
                name: {key: summary[key] for key in ("steps", "train_seconds", "tokens_per_s", "tokens_seen",
                                                      "val_loss", "val_bpb", "params")}
                for name, summary in runs.items()
            },
            "target": {"val_bpb_at_most": TARGET_BPB, "train_seconds_at_most": TARGET_SECONDS, "met": recipe_met},
            "adamw_step_ms": {"llmbook": round(ours, 3), "torch_foreach": round(foreach, 3),
                              "ratio": round(ours / foreach, 2), "torch_fused": round(fused, 3)},
        })
        for name, summary in result["runs"].items():
            print(f"{name}: {summary['steps']} steps in {summary['train_seconds']:.0f} s of training, "
                  f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['val_bpb']:.3f} bits per byte")
        print(f"AdamW step: ours {ours:.2f} ms, torch foreach {foreach:.2f} ms (ratio {ours / foreach:.2f}x), "
              f"torch fused {fused:.2f} ms")
        verdict = "met" if recipe_met else "MISSED"
        print(f"target (<= {TARGET_BPB} bits per byte within {TARGET_SECONDS:.0f} s): {verdict}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tvb, ker = speed["trainer_vs_bare"], speed["reference_kernels"]
    print(f"nanoGPT's CPU config, {tvb['threads']} thread(s): trainer {tvb['trainer']['tokens_per_s']:,} tokens/s "
          f"({tvb['trainer']['ms_per_step']} ms/step), bare PyTorch loop {tvb['bare']['tokens_per_s']:,} tokens/s "
          f"({tvb['bare']['ms_per_step']} ms/step): {tvb['ratio']:.3f}x (CPU time {tvb['ratio_cpu']:.3f}x; "
          f"target >= {SPEED_TARGET}: {'met' if tvb['met'] else 'MISSED'}; "
          f"trainer's kernels fused: {tvb['trainer_fused_kernels']})")
    if "ratio_with_fused_kernels" in tvb:
        print(f"  with GPT.use_fused_kernels() (a change to the trainer): {tvb['trainer_fused']['tokens_per_s']:,} "
              f"tokens/s, {tvb['ratio_with_fused_kernels']:.3f}x the bare loop (CPU time "
              f"{tvb['ratio_cpu_with_fused_kernels']:.3f}x)")
    print(f"reference recipe: {ker['from_scratch_ms_per_step']} ms/step with norms and activations from scratch, "
          f"{ker['fused_ms_per_step']} ms/step fused: {ker['speedup']:.3f}x (CPU time {ker['speedup_cpu']:.3f}x) "
          f"-> {RESULTS}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
