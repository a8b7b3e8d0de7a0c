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

A run is never lost. A checkpoint is written at every evaluation, so even
``kill -9`` costs at most one evaluation interval. Ctrl-C (SIGINT) or SIGTERM
lets the current step finish, saves, and stops. A loss or weight that turns
NaN stops the run before it can be saved over the last good checkpoint. And
the trainer never starts over in a folder that holds a run unless asked to
(``--resume`` continues it, ``--overwrite`` replaces it).
"""

# ruff: noqa: E402 (the lines below run before torch is imported)
from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): a quiet exit, not an import traceback

    def _quit_while_starting(signum, frame):
        print("interrupted while starting; nothing was saved", file=sys.stderr)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, _quit_while_starting)
    signal.signal(signal.SIGTERM, _quit_while_starting)

import argparse
import contextlib
import json
import math
import os
import shutil
import tempfile
import threading
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
from llmbook.errors import CheckpointError, DivergedError, Interrupted, RunError, one_line
from llmbook.generate import generate
from llmbook.losses import bits_per_byte, cross_entropy
from llmbook.model import GPT, ModelConfig
from llmbook.optim import ForeachAdamW, clip_grad_norm, param_groups
from llmbook.schedule import CosineSchedule, set_lr
from llmbook.seeding import seed_everything
from llmbook.train_config import PRECISIONS, TRAIN_PRESETS, TrainConfig  # noqa: F401 (re-exported)

DCP_CHECKPOINT = "checkpoint.dcp"  # the folder a sharded run (Chapter 8) saves with torch.distributed.checkpoint

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
        self.data = self.load_data()
        self.token_lengths = torch.as_tensor(loader.token_byte_lengths(self.data.tokenizer), device=self.device)

        seed_everything(cfg.seed, deterministic=False)  # the initial weights, and dropout from here on
        self.raw_model = self.build_model().to(self.device)
        self.model_config = self.raw_model.cfg
        self.raw_model.activation_checkpointing = cfg.activation_checkpointing
        self.raw_model.use_fused_kernels(cfg.fused_kernels)  # PyTorch's kernels for norms and activations
        self.model = self.wrap_model(self.raw_model)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        # optim.AdamW's arithmetic, one call per line over all the tensors (exactly equal: tests/test_optim.py)
        self.optimizer = ForeachAdamW(param_groups(self.raw_model, cfg.weight_decay), lr=cfg.lr,
                               betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.schedule = CosineSchedule(cfg.lr, cfg.warmup, cfg.decay, cfg.min_lr_ratio)
        # fp16's range ends at 65504 and small gradients underflow to 0: scale the loss up, the gradients back down
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.step = 0  # optimizer steps taken
        self.train_seconds = 0.0  # time in training steps, evaluation excluded; summed over resumes
        self.total_seconds = 0.0  # wall time of the run before this session (resumes add up)
        self.last_eval: dict | None = None
        self.checkpoint_step: int | None = None  # the step checkpoint.pt holds, once this trainer saved or loaded it
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)  # a NaN/inf loss or norm so far
        self._restored = self._updating = self._started = False

    # ------------------------------------------------------------------ what is trained, on what

    def load_data(self) -> loader.PreparedData:
        """The token stream: ``cfg.dataset`` tokenized (cached); Chapter 9's SFT trainer loads examples instead."""
        cfg = self.cfg
        data = loader.prepare_data(cfg.dataset, cfg.tokenizer, cfg.val_fraction)
        for split in ("train", "val"):
            if len(getattr(data, split)) <= cfg.context_length + 1:
                raise ValueError(
                    f"the {split} split of {cfg.dataset!r} has {len(getattr(data, split))} tokens, too few for "
                    f"one window of context_length={cfg.context_length}: use more text or a shorter context"
                )
        return data

    def build_model(self) -> GPT:
        """A new model, randomly initialized (seeded); Chapter 9's SFT trainer starts from a trained one instead."""
        return GPT(self.cfg.model_config(self.data.tokenizer.vocab_size))

    def step_tokens(self) -> int:
        """Tokens one optimizer step trains on, for tokens/s (SFT counts its real tokens, without the padding)."""
        return self.cfg.tokens_per_step

    # ------------------------------------------------------------------ the pieces of a step

    def wrap_model(self, model: GPT) -> nn.Module:
        """The module that training calls: compiled here, wrapped in DDP/FSDP in Chapter 8."""
        return torch.compile(model) if self.cfg.compile else model

    def get_batch(self, step: int, micro: int) -> tuple[Tensor, Tensor]:
        """The ``micro``-th micro-batch of ``step``, the same whenever it is drawn: ``x, y`` ``(B, T)``."""
        rng = np.random.default_rng([self.cfg.seed, step, micro])
        return loader.get_batch(self.data.train, self.cfg.batch_size, self.cfg.context_length, self.device, rng)

    def loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        """The mean loss of a micro-batch ``(x, y)``; SFT's batches also carry an attention mask and positions."""
        x, y = batch
        _, loss = self.model(x, y)  # F.cross_entropy, fused; equal to losses.cross_entropy
        return loss

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
            batch = self.get_batch(step, micro)
            with self.no_sync(micro):
                with autocast(self.device.type, self.cfg.precision):
                    loss = self.loss(batch)
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
        """A continuation of ``sample_prompt`` from its own generator, so the training RNG never moves.

        Only ids the tokenizer has are drawn: the output layer's extra rows (the
        vocabulary is padded to a multiple of 64) stand for no text.
        """
        tok = self.data.tokenizer
        prompt = tok.encode_ordinary(self.cfg.sample_prompt)
        n = min(self.cfg.sample_tokens, self.cfg.context_length - len(prompt))
        if n <= 0:
            return ""
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.step)
        return tok.decode(generate(self.raw_model, [prompt], n, generator=gen, vocab_size=tok.vocab_size)[0])

    def log(self, record: dict, file: str = "metrics.jsonl") -> None:
        """Append one JSON record to a file of the run folder (the main process only)."""
        if self.is_main:
            path = self.run_dir / file
            try:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as exc:
                raise RunError(f"could not write {path} ({exc.strerror or exc}): free disk space or make the "
                               "folder writable, then continue with --resume") from None

    def _evaluate_and_sample(self) -> None:
        self._check_finite()  # NaN weights would give a NaN loss and crash the sampler
        result = self.validate()
        if not math.isfinite(result["loss"]):
            raise self._diverged(f"the validation loss is {result['loss']}")
        self.last_eval = {"step": self.step, "val_loss": result["loss"], "val_bpb": result["bpb"],
                          "elapsed_s": round(self.train_seconds, 3)}
        self.log(self.last_eval)
        if self.cfg.sample_tokens:
            self.log({"step": self.step, "prompt": self.cfg.sample_prompt, "text": self.sample()}, "samples.jsonl")
        if self.is_main and self.progress:
            tqdm.write(f"step {self.step}: val loss {result['loss']:.3f} nats/token, {result['bpb']:.3f} bits per byte")

    # ------------------------------------------------------------------ NaN and infinity

    def _check_finite(self, weights: bool = True) -> None:
        """Raise ``DivergedError`` if a loss or gradient norm so far, or (``weights``) a weight, is NaN or infinite.

        The losses and norms are folded into one flag on the device as training
        goes, so checking costs one sync; it is done before every evaluation,
        every log record and every save, so NaN weights are never written.
        """
        bad = self._nonfinite
        if weights:
            bad = bad | ~self._weights_finite()
        if bool(bad):
            raise self._diverged("a loss, gradient norm or weight is NaN or infinite")

    def _weights_finite(self) -> Tensor:
        """True (a tensor on the device) if every weight is finite; Chapter 8's sharded trainer asks every rank."""
        return torch.stack([torch.isfinite(p).all() for p in self.params]).all()

    def _diverged(self, what: str) -> DivergedError:
        lower = f"lower lr (now {self.cfg.lr:g}) or grad_clip (now {self.cfg.grad_clip:g})"
        if self.checkpoint_step is None:
            advice = f"no checkpoint was saved; {lower} and start over with --overwrite --set lr=..."
        else:
            advice = (f"the last good checkpoint, of step {self.checkpoint_step}, is kept in "
                      f"{self.checkpoint_file}; {lower} and continue with --resume --set lr=..., "
                      "or start over with --overwrite")
        return DivergedError(f"training diverged by step {self.step}: {what}; {advice}")

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

    @property
    def checkpoint_file(self) -> Path:
        """Where this trainer saves: ``checkpoint.pt`` (Chapter 8's sharded runs write a ``checkpoint.dcp`` folder)."""
        return self.run_dir / "checkpoint.pt"

    def resume_file(self) -> Path | None:
        """The checkpoint to resume, ``checkpoint.pt``, or None; Chapter 8's trainer also reads ``checkpoint.dcp``."""
        path = self.run_dir / "checkpoint.pt"
        if not path.is_file() and (self.run_dir / DCP_CHECKPOINT).is_dir():
            raise RunError(f"{self.run_dir} holds a sharded checkpoint ({DCP_CHECKPOINT}) of a parallel='fsdp' run: "
                           "resume it with --set parallel=fsdp (one process, or torchrun with any number of ranks)")
        return path if path.is_file() else None

    def read_training_state(self, path: Path) -> dict:
        """The checkpoint's contents (on the CPU: ``load_state_dict`` copies them to the model's device)."""
        return checkpoint.load_checkpoint(path)

    def load_training_state(self, state: dict, path: Path) -> None:
        """Put a checkpoint's weights and AdamW moments into the model and optimizer (Chapter 8 shards them)."""
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint.pt`` (atomic, checksummed); never NaN weights over a good checkpoint."""
        self._check_finite()
        if not self.is_main:
            return None
        path = checkpoint.save_checkpoint(self.run_dir / "checkpoint.pt", self.state_dict())
        if (self.run_dir / DCP_CHECKPOINT).exists():  # a sharded run's older checkpoint (Chapter 8): this one is newer
            shutil.rmtree(self.run_dir / DCP_CHECKPOINT, ignore_errors=True)
        self.checkpoint_step = self.step
        return path

    def restore(self) -> bool:
        """Load the run folder's checkpoint (``resume_file``) if there is one; False when there is none."""
        path = self.resume_file()
        if self._restored or path is None:
            return self._restored
        state = self.read_training_state(path)
        if state.get("model_config") != asdict(self.model_config):
            raise ValueError(f"{path} holds a different model ({state.get('model_config')}); train it in a new "
                             "folder (another name or --out) or drop --resume")
        try:
            self.load_training_state(state, path)
            if state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])
            self.step = int(state["step"])
            self.train_seconds, self.total_seconds = state["train_seconds"], state["total_seconds"]
            self.last_eval = state["last_eval"]  # resuming a finished run need not evaluate again
            checkpoint.set_rng_state(state["rng_state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path} is not a complete training checkpoint ({reason[:200]}): delete it and "
                                  "start over with --overwrite, or resume from a good copy") from None
        if not bool(self._weights_finite()):
            raise CheckpointError(f"{path} holds NaN or infinite weights: it cannot be resumed; start over with "
                                  "--overwrite (and a lower lr)")
        self._restored = True
        self.checkpoint_step = self.step
        return True

    # ------------------------------------------------------------------ the loop

    RUN_FILES = ("checkpoint.pt", DCP_CHECKPOINT, "model.pt", "metrics.jsonl", "samples.jsonl", "summary.json")

    def _session_seconds(self) -> float:
        return time.perf_counter() - self._session_start if hasattr(self, "_session_start") else 0.0

    def _start(self, resume: bool, overwrite: bool) -> bool:
        """Continue this trainer, resume the folder's checkpoint, or start anew; True if it goes on from a state.

        A folder that holds a run is never started over by accident: that takes
        ``overwrite``. ``resume`` without a checkpoint is refused too, as its
        logs would otherwise be replaced.
        """
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run, overwrite replaces it")
        if self._started:  # a second train() of this trainer goes on where the first stopped
            return True
        found = [name for name in self.RUN_FILES if (self.run_dir / name).exists()]
        if resume:
            if self.resume_file() is None:
                hint = ("use --overwrite instead of --resume to replace its logs with a new run" if found
                        else "drop --resume to start a new run")
                raise RunError(f"nothing to resume: {self.run_dir} has no checkpoint.pt; {hint}")
            return self.restore()
        if found and not overwrite:
            raise RunError(f"{self.run_dir} already holds a run ({', '.join(found)}): continue it with --resume "
                           "(resume=True), replace it with --overwrite (overwrite=True), or choose another --out/name")
        return False

    def _prepare_run_dir(self, resumed: bool) -> None:
        """Write the config and tokenizer; clear a replaced run, or drop records a crash left after the checkpoint."""
        if not self.is_main:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(self.run_dir, os.W_OK):  # root may write anyway; everyone else gets the reason now
                raise PermissionError(13, "Permission denied")
            _write_atomic(self.run_dir / "config.json", json.dumps(asdict(self.cfg), indent=2) + "\n")
            self.data.tokenizer.save(self.run_dir / "tokenizer.json")
            if resumed:
                for name in ("metrics.jsonl", "samples.jsonl"):
                    file = self.run_dir / name
                    if file.is_file():
                        kept = [r for r in read_jsonl(file) if r.get("step", 0) <= self.step]
                        _write_atomic(file, "".join(json.dumps(record) + "\n" for record in kept))
            else:
                for name in self.RUN_FILES:  # a new run, or --overwrite: nothing of an old one stays
                    path = self.run_dir / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        except OSError as exc:
            raise RunError(f"cannot write in the run folder {self.run_dir} ({exc.strerror or exc}): choose another "
                           "--out, or make it writable") from None

    def train(self, resume: bool = False, stop_at: int | None = None, overwrite: bool = False) -> dict:
        """Train to ``cfg.max_steps`` (or stop after step ``stop_at``, keeping the schedule); return the summary.

        ``resume=True`` continues from the run folder's checkpoint (RunError if it
        has none); ``overwrite=True`` replaces a run already in the folder.
        Without either, a folder that holds a run is refused with a RunError.

        A checkpoint is written every ``cfg.checkpoint_every`` steps (every
        evaluation by default) and whenever the loop stops. Ctrl-C (SIGINT) or
        SIGTERM lets the current step finish, saves, and raises ``Interrupted``
        (a KeyboardInterrupt); a second Ctrl-C stops at once. A NaN or infinite
        loss, gradient norm or weight raises ``DivergedError`` and leaves the
        last good checkpoint as it was.
        """
        cfg = self.cfg
        with _StopSignals() as stop:
            resumed = self._start(resume, overwrite)
            self._started = True
            self.total_seconds += self._session_seconds()  # a second train() on the same trainer adds up
            self._session_start = time.perf_counter()
            self._prepare_run_dir(resumed)
            end = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=cfg.name, unit="step", dynamic_ncols=True,
                       disable=not (self.progress and self.is_main))
            if resumed and self.is_main and self.progress:
                bar.write(f"resuming {self.run_dir} at step {self.step}")
            try:
                self._loop(end, stop, bar)
                if self.checkpoint_step != self.step:
                    self.save_checkpoint()
            except BaseException as exc:
                self._save_after_error(exc)
                raise
            finally:
                bar.close()
            if self.step < cfg.max_steps:
                if stop.signum is not None:
                    name = signal.Signals(stop.signum).name
                    raise Interrupted(self.stop_message(f"{name}: stopped"), self.step,
                                      self.checkpoint_file, self.checkpoint_step, stop.signum)
                if self.is_main:
                    print(self.stop_message("stopped").replace("--resume", "resume=True (--resume)"))
                return self._summary(finished=False)
            return self._finish()

    def _loop(self, end: int, stop: _StopSignals, bar: tqdm) -> None:
        """Steps until ``end`` or a stop signal: log, evaluate and checkpoint on their intervals."""
        cfg = self.cfg
        if self.step == 0 and cfg.eval_interval and (self.last_eval or {}).get("step") != 0 and stop.signum is None:
            self._evaluate_and_sample()  # the untrained model: loss ≈ ln(vocab_size)
        window_loss, window_steps, window_seconds = torch.zeros((), device=self.device), 0, 0.0
        window_tokens = 0
        while self.step < end and not self._should_stop(stop):
            start = time.perf_counter()
            loss, norm = self.train_step()
            window_tokens += self.step_tokens()
            # fp16's GradScaler makes an infinite norm on purpose now and then, and skips that step: not a divergence
            check_norm = norm is not None and not self.scaler.is_enabled()
            self._nonfinite |= ~(torch.isfinite(loss) & torch.isfinite(norm)) if check_norm else ~torch.isfinite(loss)
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
                self._check_finite(weights=False)  # a NaN loss is not logged as if it were a result
                record["tokens_per_s"] = round(window_tokens / window_seconds, 1)
                record["elapsed_s"] = round(self.train_seconds, 3)
                self.log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=units.count(record["tokens_per_s"]),
                                lr=f"{record['lr']:.2e}", refresh=False)
                window_loss, window_steps, window_seconds = torch.zeros((), device=self.device), 0, 0.0
                window_tokens = 0
            if (cfg.eval_interval and self.step % cfg.eval_interval == 0) or self.step == cfg.max_steps:
                self._evaluate_and_sample()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < end:
                self.save_checkpoint()
            bar.update(1)

    def _should_stop(self, stop: _StopSignals) -> bool:
        """Whether a signal asked the loop to stop; Chapter 8's ranks agree on it, so all stop after the same step."""
        return stop.signum is not None

    def _save_after_error(self, exc: BaseException) -> None:
        """Keep the steps done when an error (a second Ctrl-C, out of memory) stops the loop, where that is safe.

        Not in the middle of an update (the weights would hold half a step), not
        after a divergence or a failed write, and never raising over ``exc``.
        """
        if self._updating or isinstance(exc, RunError) or self.checkpoint_step == self.step:
            return
        try:
            self.save_checkpoint()
        except BaseException:  # the error already on its way says more than this one
            pass

    def stop_message(self, what: str) -> str:
        """One true line about a stop: which step, and whether (and where) a checkpoint holds it."""
        path = self.checkpoint_file
        if self.checkpoint_step is None:
            return (f"{what} at step {self.step}; no checkpoint was saved: start again (--overwrite if the folder "
                    "holds a run)")
        if self.checkpoint_step == self.step:
            return f"{what} at step {self.step}; checkpoint of step {self.step} saved in {path}; continue with --resume"
        return (f"{what} at step {self.step}, inside a step (not saved); the last checkpoint, of step "
                f"{self.checkpoint_step}, is in {path}; continue with --resume")

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

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole model's weights on the CPU, for ``model.pt`` (a sharded model gathers them from every rank)."""
        return {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}

    def _finish(self) -> dict:
        """The final model and summary, after the last step."""
        if self.last_eval is None or self.last_eval["step"] != self.step:
            self._evaluate_and_sample()
        self._check_finite()
        summary = self._summary(finished=True)
        state_dict = self.full_state_dict()
        if self.is_main:
            checkpoint.save_checkpoint(self.run_dir / "model.pt",
                                       {"model_config": asdict(self.model_config), "state_dict": state_dict})
            try:
                _write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            except OSError as exc:
                raise RunError(f"could not write {self.run_dir / 'summary.json'} ({exc.strerror or exc}): free "
                               "disk space, then run again with --resume") from None
            print(f"trained {summary['steps']} steps in {units.duration(summary['train_seconds'])} "
                  f"({units.count(summary['tokens_per_s'])} tokens/s): val loss {summary['val_loss']:.3f} "
                  f"nats/token, {summary['val_bpb']:.3f} bits per byte -> {self.run_dir}")
        return summary


class _StopSignals:
    """While active, SIGINT and SIGTERM only ask the loop to stop after its step (``signum`` is set).

    A second SIGINT raises KeyboardInterrupt at once, for a reader who really
    wants out. Handlers can only be set in the main thread; elsewhere this does
    nothing and signals behave as usual. The previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _write_atomic(path: Path, text: str) -> None:
    """Write a text file through a unique temporary file and a rename: a crash leaves the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: Path | str) -> list[dict]:
    """The records of a JSON-lines log; a torn last line (a crash or power cut mid-write) is dropped.

    A damaged line anywhere else is not a crash's doing: RunError, naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if number == len(lines):
                break  # torn by the crash that stopped the run
            raise RunError(f"{path}, line {number}, is not a JSON record: delete that line, then run again")
        records.append(record)
    return records


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


def _model_from_file(path: Path, config: object, weights: object) -> GPT:
    """The model a file describes, its config checked against its tensors before a byte is allocated.

    The model is first built on PyTorch's "meta" device, which records shapes
    and allocates nothing, so a damaged or crafted ``model_config`` (say, a
    thousand layers) is refused instead of asking for gigabytes.
    """
    if not isinstance(config, dict) or not isinstance(weights, dict):
        raise CheckpointError(f"{path} holds no model_config and weights: it is not a model.pt or checkpoint.pt")
    try:
        cfg = ModelConfig(**config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} holds an invalid model_config ({exc}): the file is damaged or was not "
                              "written by llmbook; retrain, or use another file") from None
    with torch.device("meta"):
        skeleton = GPT(cfg)
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, Tensor)}
    if want != have:
        first = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        raise CheckpointError(
            f"{path}: its model_config ({units.count(skeleton.num_params())} parameters) does not match the tensors "
            f"it holds (first difference: {first[0]}); the file is damaged or was not written by llmbook: retrain, "
            "or use another file"
        )
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: keep the caller's RNG where it was
        model = GPT(cfg)
    model.load_state_dict(weights)
    return model


def load_tokenizer(path: Path) -> Tokenizer:
    """``Tokenizer.load``, with one line naming the file if it is missing or damaged."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a run folder holds its tokenizer beside model.pt")
    try:
        return Tokenizer.load(path)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunError(f"{path} is damaged ({reason[:200]}): copy a good tokenizer.json there, or retrain") from None


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
    if not path.is_file() and (folder / DCP_CHECKPOINT).is_dir():
        raise FileNotFoundError(f"{folder} holds only a sharded checkpoint ({DCP_CHECKPOINT}): write its model.pt with "
                                f"python -m llmbook.distributed.dcp_checkpoint {folder}")
    state = checkpoint.load_checkpoint(path)
    model = _model_from_file(path, state.get("model_config"), state.get("state_dict", state.get("model")))
    return model.to(device).eval(), load_tokenizer(folder / "tokenizer.json")


def _rank_from_env(name: str = "RANK", default: int = 0) -> int:
    """torchrun's ``RANK`` (or another of its variables) as an int; ``default`` when unset or not a number."""
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmbook.train", description="Pretrain a GPT on a text; files go to OUT/NAME.",
        epilog=f"presets: {', '.join(TRAIN_PRESETS)}; example: --config tiny --set max_steps=50 lr=3e-3",
    )
    parser.add_argument("--config", required=True, help="a preset name or a .toml/.json file")
    parser.add_argument("--out", default="runs", help="folder for run folders (default: runs)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="change settings, values as JSON: --set max_steps=200 model_overrides.d_model=96")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in OUT/NAME from its checkpoint.pt")
    mode.add_argument("--overwrite", action="store_true", help="replace the run in OUT/NAME with a new one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    trainer, received = None, [signal.SIGINT]

    def interrupt(signum, frame):
        received[0] = signum
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # until training starts, SIGTERM stops us as Ctrl-C does: with a line, not silently
        previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    # under torchrun every rank runs this; only rank 0 prints errors, the others exit with the same code quietly
    say = print if _rank_from_env() == 0 else (lambda *a, **k: None)
    try:
        cfg = TrainConfig.resolve(args.config, args.overrides)
        trainer_class = Trainer
        if cfg.parallel != "none" or _rank_from_env("WORLD_SIZE", 1) > 1:  # several processes (Chapter 8)
            from llmbook.distributed.trainer import DistributedTrainer as trainer_class
        trainer = trainer_class(cfg, Path(args.out) / cfg.name, progress=not args.no_progress)
        trainer.train(resume=args.resume, overwrite=args.overwrite)
        if hasattr(trainer, "close"):
            trainer.close()  # leave the process group
    except Interrupted as exc:
        say(exc.args[0], file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        started = trainer is not None and trainer._started
        say(trainer.stop_message("interrupted") if started else "interrupted before training started; nothing "
            "was saved", file=sys.stderr)
        return 128 + received[0]
    except (ValueError, OSError, RunError, DataNotFoundError, ChecksumError, KeyError) as exc:
        say(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        if main_thread:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
