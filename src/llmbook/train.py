"""The training loop, its configuration, and the command line that runs it.

One optimizer step, the whole of pretraining repeated a few thousand times:

    for micro in range(accumulation_steps):        # one big batch, in pieces that fit in memory
        x, y = get_batch(step, micro)               # (B, T) windows of the training split
        loss = model(x, y) / accumulation_steps     # mean cross-entropy of the next token
        loss.backward()                             # gradients add up over the micro-batches
    clip_grad_norm(params, grad_clip)              # one bad batch cannot throw the weights far
    set_lr(optimizer, schedule(step))              # warmup, then cosine decay
    optimizer.step(); optimizer.zero_grad()

Around it, the ``Trainer`` measures (loss, tokens per second, validation loss
and bits per byte), keeps a checkpoint it can resume from exactly, and writes
everything a chapter plots into a run folder:

    config.json  metrics.jsonl  samples.jsonl  checkpoint.pt  model.pt  tokenizer.json  summary.json

The batch of step s is drawn from a generator seeded with (seed, s, micro),
so the data position is the step itself and resuming needs no loader state.
From the shell: ``python -m llmbook.train --config tiny --out runs``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmbook import checkpoint, loader, units
from llmbook.bpe.tokenizer import Tokenizer
from llmbook.data import ChecksumError, DataNotFoundError
from llmbook.generate import generate
from llmbook.losses import bits_per_byte, cross_entropy
from llmbook.model import GPT, ModelConfig
from llmbook.optim import AdamW, clip_grad_norm, param_groups
from llmbook.schedule import CosineSchedule, set_lr
from llmbook.seeding import seed_everything
from llmbook.train_config import PRECISIONS, TRAIN_PRESETS, TrainConfig  # noqa: F401 (re-exported)

# ---------------------------------------------------------------------- evaluation


def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision: matmuls in bf16/fp16 under autocast, weights (the master copy) stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(
    model: nn.Module, tokens: np.ndarray, token_lengths: np.ndarray | Tensor, batch_size: int, context_length: int,
    device: torch.device | str, max_batches: int | None = None, precision: str = "fp32",
) -> dict:
    """Loss over a token array, every target scored once: ``{"loss": nats per token, "bpb": bits per byte}``.

    The bytes behind the targets come from ``token_lengths`` (``loader.token_byte_lengths``),
    so bits per byte compares models with different tokenizers on the same text.
    """
    device = torch.device(device)
    lengths = torch.as_tensor(token_lengths, device=device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = torch.zeros((), dtype=torch.int64, device=device)
    n_tokens = 0
    was_training = model.training
    model.eval()  # no dropout
    try:
        for x, y in loader.sequential_batches(tokens, batch_size, context_length, device, max_batches):
            with autocast(device.type, precision):
                logits, _ = model(x)  # (B, T, V)
            total_nats += cross_entropy(logits, y, reduction="sum").double()
            n_bytes += lengths[y].sum()
            n_tokens += y.numel()
    finally:
        model.train(was_training)
    total, n_bytes = total_nats.item(), int(n_bytes.item())  # the only syncs of the whole evaluation
    return {"loss": total / n_tokens, "bpb": bits_per_byte(total, n_bytes), "tokens": n_tokens, "bytes": n_bytes}


# ---------------------------------------------------------------------- the trainer


class Trainer:
    """Trains ``cfg`` into ``run_dir``: ``Trainer(TRAIN_PRESETS["tiny"], "runs/tiny").train()``.

    The pieces a distributed trainer changes are separate methods (Chapter 8
    subclasses this for DDP and FSDP): ``wrap_model``, ``get_batch``,
    ``no_sync``, ``optimizer_step``, ``validate`` and ``log``; ``is_main`` says
    whether this process writes files and prints.
    """

    is_main = True

    def __init__(self, cfg: TrainConfig, run_dir: Path | str, progress: bool = True):
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.device = torch.device(cfg.resolved_device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r} asks for CUDA, which this machine lacks; use device='auto'")
        if cfg.threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.threads)
        self.data = loader.prepare_data(cfg.dataset, cfg.tokenizer, cfg.val_fraction)
        for split in ("train", "val"):
            if len(getattr(self.data, split)) <= cfg.context_length + 1:
                raise ValueError(
                    f"the {split} split of {cfg.dataset!r} has {len(getattr(self.data, split))} tokens, too few for "
                    f"one window of context_length={cfg.context_length}: use more text or a shorter context"
                )
        self.token_lengths = torch.as_tensor(loader.token_byte_lengths(self.data.tokenizer), device=self.device)
        self.model_config = cfg.model_config(self.data.tokenizer.vocab_size)

        seed_everything(cfg.seed, deterministic=False)  # the initial weights, and dropout from here on
        self.raw_model = GPT(self.model_config).to(self.device)
        self.raw_model.activation_checkpointing = cfg.activation_checkpointing
        self.model = self.wrap_model(self.raw_model)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.optimizer = AdamW(param_groups(self.raw_model, cfg.weight_decay), lr=cfg.lr,
                               betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.schedule = CosineSchedule(cfg.lr, cfg.warmup, cfg.decay, cfg.min_lr_ratio)
        # fp16's range ends at 65504 and small gradients underflow to 0: scale the loss up, the gradients back down
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.step = 0  # optimizer steps taken
        self.train_seconds = 0.0  # time in training steps, evaluation excluded; summed over resumes
        self.total_seconds = 0.0  # wall time of the run before this session (resumes add up)
        self.last_eval: dict | None = None
        self._restored = self._updating = False

    # ------------------------------------------------------------------ the pieces of a step

    def wrap_model(self, model: GPT) -> nn.Module:
        """The module that training calls: compiled here, wrapped in DDP/FSDP in Chapter 8."""
        return torch.compile(model) if self.cfg.compile else model

    def get_batch(self, step: int, micro: int) -> tuple[Tensor, Tensor]:
        """The ``micro``-th micro-batch of ``step``, the same whenever it is drawn: ``x, y`` ``(B, T)``."""
        rng = np.random.default_rng([self.cfg.seed, step, micro])
        return loader.get_batch(self.data.train, self.cfg.batch_size, self.cfg.context_length, self.device, rng)

    def no_sync(self, micro: int) -> contextlib.AbstractContextManager:
        """Nothing here; DDP returns ``model.no_sync()`` for all but the last micro-batch (one all-reduce per step)."""
        return contextlib.nullcontext()

    def forward_backward(self, step: int) -> Tensor:
        """The gradient of step ``step``'s whole batch, summed over its micro-batches; returns the mean loss.

        Each micro-batch's loss is divided by their number, so k micro-batches of
        b sequences give the gradient of one batch of k·b. The loss stays a tensor:
        reading it (``.item()``) would make a GPU wait, so only logging does.
        """
        k = self.cfg.accumulation_steps
        total = torch.zeros((), device=self.device)
        for micro in range(k):
            x, y = self.get_batch(step, micro)
            with self.no_sync(micro):
                with autocast(self.device.type, self.cfg.precision):
                    _, loss = self.model(x, y)  # F.cross_entropy, fused; equal to losses.cross_entropy
                loss = loss / k
                self.scaler.scale(loss).backward()
            total += loss.detach()
        return total

    def optimizer_step(self, lr: float) -> Tensor | None:
        """Clip, step with learning rate ``lr``, clear the gradients; returns the norm before clipping."""
        set_lr(self.optimizer, lr)
        norm = None
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            norm = clip_grad_norm(self.params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def train_step(self) -> tuple[Tensor, Tensor | None]:
        """One optimizer step: ``(mean loss, gradient norm)``, both still tensors."""
        loss = self.forward_backward(self.step)  # only gradients change: safe to stop in here
        self._updating = True  # the weights are changing: a checkpoint now would hold half a step
        norm = self.optimizer_step(self.schedule(self.step))
        self.step += 1
        self._updating = False
        return loss, norm

    # ------------------------------------------------------------------ measuring

    def validate(self) -> dict:
        """Validation loss and bits per byte (the uncompiled model: eval batches have other shapes)."""
        cfg = self.cfg
        return evaluate(self.raw_model, self.data.val, self.token_lengths, cfg.eval_batch_size, cfg.context_length,
                        self.device, cfg.eval_batches, cfg.precision)

    def sample(self) -> str:
        """A continuation of ``sample_prompt`` from its own generator, so the training RNG never moves."""
        tok = self.data.tokenizer
        prompt = tok.encode(self.cfg.sample_prompt)
        n = min(self.cfg.sample_tokens, self.cfg.context_length - len(prompt))
        if n <= 0:
            return ""
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.step)
        return tok.decode(generate(self.raw_model, [prompt], n, generator=gen)[0])

    def log(self, record: dict, file: str = "metrics.jsonl") -> None:
        """Append one JSON record to a file of the run folder (the main process only)."""
        if self.is_main:
            with open(self.run_dir / file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _evaluate_and_sample(self) -> None:
        result = self.validate()
        self.last_eval = {"step": self.step, "val_loss": result["loss"], "val_bpb": result["bpb"],
                          "elapsed_s": round(self.train_seconds, 3)}
        self.log(self.last_eval)
        if self.cfg.sample_tokens:
            self.log({"step": self.step, "prompt": self.cfg.sample_prompt, "text": self.sample()}, "samples.jsonl")
        if self.is_main and self.progress:
            tqdm.write(f"step {self.step}: val loss {result['loss']:.3f} nats/token, {result['bpb']:.3f} bits per byte")

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """What resuming needs: weights, AdamW's moments, the step, every RNG, the fp16 scaler."""
        return {
            "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
            "rng_state": checkpoint.rng_state(), "config": asdict(self.cfg),
            "model_config": asdict(self.model_config), "scaler": self.scaler.state_dict(),
            "train_seconds": self.train_seconds, "total_seconds": self.total_seconds + self._session_seconds(),
            "last_eval": self.last_eval,
        }

    def save_checkpoint(self) -> Path | None:
        if self.is_main:
            return checkpoint.save_checkpoint(self.run_dir / "checkpoint.pt", self.state_dict())
        return None

    def restore(self) -> bool:
        """Load ``checkpoint.pt`` of the run folder if there is one; False when there is none."""
        path = self.run_dir / "checkpoint.pt"
        if self._restored or not path.is_file():
            return self._restored
        state = checkpoint.load_checkpoint(path)  # on the CPU: load_state_dict copies to the model's device
        if state["model_config"] != asdict(self.model_config):
            raise ValueError(f"{path} holds a different model ({state['model_config']}); train it in a new "
                             "folder (another name or --out) or drop --resume")
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.train_seconds, self.total_seconds = state["train_seconds"], state["total_seconds"]
        self.last_eval = state["last_eval"]  # resuming a finished run need not evaluate again
        checkpoint.set_rng_state(state["rng_state"])
        self._restored = True
        return True

    # ------------------------------------------------------------------ the loop

    def _session_seconds(self) -> float:
        return time.perf_counter() - self._session_start if hasattr(self, "_session_start") else 0.0

    def _prepare_run_dir(self, resumed: bool) -> None:
        """Write the config and the tokenizer; start fresh logs, or drop records a crash left after the checkpoint."""
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(self.data.dir / "tokenizer.json", self.run_dir / "tokenizer.json")
        for name in ("metrics.jsonl", "samples.jsonl"):
            file = self.run_dir / name
            lines = file.read_text(encoding="utf-8").splitlines() if resumed and file.is_file() else []
            kept = [record for record in map(json.loads, lines) if record["step"] <= self.step]
            file.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")

    def train(self, resume: bool = False, stop_at: int | None = None) -> dict:
        """Train to ``cfg.max_steps`` (or stop after step ``stop_at``, keeping the schedule); return the summary.

        ``resume=True`` continues from the run folder's checkpoint when there is
        one. A checkpoint is always written when the loop stops, even on Ctrl-C.
        """
        cfg = self.cfg
        resumed = self.restore() if resume else False
        self.total_seconds += self._session_seconds()  # a second train() on the same trainer adds up
        self._session_start = time.perf_counter()
        self._prepare_run_dir(resumed)
        end = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=cfg.name, unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.is_main))
        if resumed and self.is_main and self.progress:
            bar.write(f"resuming {self.run_dir} at step {self.step}")
        if self.step == 0 and cfg.eval_interval:
            self._evaluate_and_sample()  # the untrained model: loss ≈ ln(vocab_size)

        window_loss, window_steps, window_seconds = torch.zeros((), device=self.device), 0, 0.0
        try:
            while self.step < end:
                start = time.perf_counter()
                loss, norm = self.train_step()
                window_loss += loss
                window_steps += 1
                record = None
                if self.step % cfg.log_interval == 0 or self.step == end:
                    record = {"step": self.step, "lr": self.schedule(self.step - 1),
                              "loss": (window_loss / window_steps).item()}  # waits for the GPU: timing is true
                    if norm is not None:
                        record["grad_norm"] = norm.item()
                seconds = time.perf_counter() - start
                self.train_seconds += seconds
                window_seconds += seconds
                if record is not None:
                    record["tokens_per_s"] = round(window_steps * cfg.tokens_per_step / window_seconds, 1)
                    record["elapsed_s"] = round(self.train_seconds, 3)
                    self.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=units.count(record["tokens_per_s"]),
                                    lr=f"{record['lr']:.2e}", refresh=False)
                    window_loss, window_steps, window_seconds = torch.zeros((), device=self.device), 0, 0.0
                if (cfg.eval_interval and self.step % cfg.eval_interval == 0) or self.step == cfg.max_steps:
                    self._evaluate_and_sample()
                if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0 and self.step < end:
                    self.save_checkpoint()
                bar.update(1)
        finally:  # Ctrl-C or an error: keep what was done, unless it struck in the middle of an update
            bar.close()
            if not self._updating:
                self.save_checkpoint()
        if self.step < cfg.max_steps:
            if self.is_main:
                print(f"stopped at step {self.step} of {cfg.max_steps}; checkpoint in {self.run_dir}, "
                      "continue with resume=True (--resume)")
            return self._summary(finished=False)
        return self._finish()

    def _summary(self, finished: bool) -> dict:
        tokens_seen = self.step * self.cfg.tokens_per_step
        last = self.last_eval or {}
        return {
            "steps": self.step, "train_seconds": self.train_seconds,
            "total_seconds": self.total_seconds + self._session_seconds(),
            "tokens_per_s": tokens_seen / self.train_seconds if self.train_seconds else 0.0,
            "tokens_seen": tokens_seen, "val_loss": last.get("val_loss"), "val_bpb": last.get("val_bpb"),
            "params": self.raw_model.num_params(), "finished": finished,
        }

    def _finish(self) -> dict:
        """The final model and summary, after the last step."""
        if self.last_eval is None or self.last_eval["step"] != self.step:
            self._evaluate_and_sample()
        summary = self._summary(finished=True)
        if self.is_main:
            state_dict = {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}
            checkpoint.save_checkpoint(self.run_dir / "model.pt",
                                       {"model_config": asdict(self.model_config), "state_dict": state_dict})
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
            print(f"trained {summary['steps']} steps in {units.duration(summary['train_seconds'])} "
                  f"({units.count(summary['tokens_per_s'])} tokens/s): val loss {summary['val_loss']:.3f} "
                  f"nats/token, {summary['val_bpb']:.3f} bits per byte -> {self.run_dir}")
        return summary


# ---------------------------------------------------------------------- helpers around the trainer


def steps_for_budget(cfg: TrainConfig, seconds: float, probe_steps: int = 20) -> int:
    """How many optimizer steps of ``cfg`` fit in ``seconds`` on this machine, from ``probe_steps`` timed steps.

    Three untimed steps first: the first steps allocate memory (and compile,
    with ``compile=True``). Use it to compare configurations at equal wall time.
    """
    if seconds <= 0 or probe_steps <= 0:
        raise ValueError(f"seconds and probe_steps must be positive, got {seconds}, {probe_steps}")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, progress=False)
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        for _ in range(3):
            trainer.train_step()
        sync()
        start = time.perf_counter()
        for _ in range(probe_steps):
            trainer.train_step()
        sync()
        per_step = (time.perf_counter() - start) / probe_steps
    return max(1, int(seconds / per_step))


def load_model(run_dir_or_model_pt: Path | str, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """The trained model (in eval mode) and its tokenizer, from a run folder or its ``model.pt``.

    A folder without ``model.pt`` (a run that was stopped) gives the model of its ``checkpoint.pt``.
    """
    path = Path(run_dir_or_model_pt)
    if path.is_dir():
        folder = path
        path = path / "model.pt" if (path / "model.pt").is_file() else path / "checkpoint.pt"
    else:
        folder = path.parent
    state = checkpoint.load_checkpoint(path)
    weights = state["state_dict"] if "state_dict" in state else state["model"]
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: keep the caller's RNG where it was
        model = GPT(ModelConfig(**state["model_config"]))
    model.load_state_dict(weights)
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{tok_file} not found: a run folder holds its tokenizer beside model.pt")
    return model.to(device).eval(), Tokenizer.load(tok_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmbook.train", description="Pretrain a GPT on a text; files go to OUT/NAME.",
        epilog=f"presets: {', '.join(TRAIN_PRESETS)}; example: --config tiny --set max_steps=50 lr=3e-3",
    )
    parser.add_argument("--config", required=True, help="a preset name or a .toml/.json file")
    parser.add_argument("--out", default="runs", help="folder for run folders (default: runs)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="change settings, values as JSON: --set max_steps=200 model_overrides.d_model=96")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/NAME/checkpoint.pt if present")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        cfg = TrainConfig.resolve(args.config, args.overrides)
        trainer = Trainer(cfg, Path(args.out) / cfg.name, progress=not args.no_progress)
        if args.resume:
            trainer.restore()
    except (ValueError, FileNotFoundError, DataNotFoundError, ChecksumError, KeyError) as exc:
        message = exc.args[0] if exc.args else repr(exc)
        print(f"error: {message}", file=sys.stderr)
        return 2
    try:
        trainer.train(resume=args.resume)
    except KeyboardInterrupt:
        print(f"interrupted at step {trainer.step}; checkpoint saved in {trainer.run_dir}, continue with --resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
