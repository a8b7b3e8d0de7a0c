"""The book's reference model: trained once on your machine, loaded in a second ever after.

Later chapters (fine-tuning, evaluation, inference) need a trained model but
not another half hour of training each. ``load("shakespeare")`` trains
``TRAIN_PRESETS["shakespeare"]`` the first time and keeps the run folder in
the cache; every later call, from any chapter, just loads it:

    >>> from llmbook import pretrained
    >>> ref = pretrained.load("shakespeare")          # doctest: +SKIP
    >>> print(ref.generate("ROMEO:", 100, seed=0))    # doctest: +SKIP

The folder's name ends in a hash of the training config, so changing the
recipe trains a new model instead of silently loading the old one. Training
happens in a ``.partial`` folder beside it, renamed only when complete: an
interrupted training never looks finished, and the next ``load`` resumes it
from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmbook import checkpoint, data, units
from llmbook.bpe.tokenizer import Tokenizer
from llmbook.generate import generate as generate_ids
from llmbook.model import GPT
from llmbook.train import TRAIN_PRESETS, TrainConfig, Trainer, load_model, steps_for_budget


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class Pretrained:
    """A trained model with its tokenizer, its recipe, and the record of how its training went."""

    model: GPT
    tokenizer: Tokenizer
    config: TrainConfig
    run_dir: Path
    summary: dict  # steps, train_seconds, total_seconds, tokens_per_s, tokens_seen, val_loss, val_bpb, params

    def metrics(self) -> list[dict]:
        """The training log: ``{"step", "lr", "loss", ...}`` every log_interval, ``{"step", "val_loss", ...}`` at evals.

        Plot ``[m["loss"] for m in metrics if "loss" in m]`` for the training curve.
        """
        return _read_jsonl(self.run_dir / "metrics.jsonl")

    def samples(self) -> list[dict]:
        """``{"step", "prompt", "text"}``: what the model wrote at each evaluation during training."""
        return _read_jsonl(self.run_dir / "samples.jsonl")

    def generate(self, prompt: str, max_new_tokens: int = 200, seed: int | None = None, **kw) -> str:
        """The text the model writes after ``prompt``; ``kw`` as ``llmbook.generate.generate`` (temperature, top_k...).

        ``seed`` makes the sampling repeatable. Text longer than the context
        window is written in pieces: when the window is full, the model goes on
        from the last half of it (it forgets the rest, as it must).
        """
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("the prompt must not be empty: the model needs at least one token to continue")
        device = next(self.model.parameters()).device
        if seed is not None and "generator" not in kw:
            kw["generator"] = torch.Generator(device=device).manual_seed(seed)
        ctx = self.model.cfg.context_length
        seq, new = list(ids), []
        while len(new) < max_new_tokens:
            window = seq if len(seq) < ctx else seq[-(ctx // 2):]  # (T,) the tokens the model sees
            n = min(max_new_tokens - len(new), ctx - len(window))
            out = generate_ids(self.model, [window], n, **kw)[0]
            seq += out
            new += out
            if len(out) < n:  # a stop token ended it
                break
        return self.tokenizer.decode(new)


def model_dir(name: str) -> Path:
    """Where the reference model ``name`` is cached: ``<cache>/models/<name>-<sha8 of its TrainConfig>``."""
    if name not in TRAIN_PRESETS:
        raise ValueError(f"no reference model {name!r}; the presets are: {', '.join(TRAIN_PRESETS)}")
    recipe = json.dumps(asdict(TRAIN_PRESETS[name]), sort_keys=True)
    return data.cache_dir() / "models" / f"{name}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"


def _train_once(name: str, folder: Path, progress: bool, retrain: bool) -> None:
    """Train the preset into ``<folder>.partial`` (resuming it if a previous try was interrupted), then rename."""
    cfg = TRAIN_PRESETS[name]
    partial = folder.with_name(folder.name + ".partial")
    if retrain and partial.exists():
        shutil.rmtree(partial)
    estimate = cfg.max_steps * 60.0 / steps_for_budget(cfg, 60.0, probe_steps=5)
    print(f"training the reference model '{name}' once on this machine (about {units.duration(estimate)}); "
          f"later calls load it from {folder}")
    Trainer(cfg, partial, progress=progress).train(resume=True)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():  # retrain: move the old model aside, then drop it once the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(partial, folder)  # atomic: the folder appears complete or not at all
    shutil.rmtree(old, ignore_errors=True)


def load(name: str = "shakespeare", device: str | torch.device = "cpu", progress: bool = True,
         retrain: bool = False) -> Pretrained:
    """The reference model ``name`` (a ``TRAIN_PRESETS`` key) in eval mode, trained first if it is not cached.

    Training leaves the caller's random generators as they were, so a chapter
    prints the same numbers whether or not the model had to be trained.
    """
    folder = model_dir(name)
    if retrain or not (folder / "summary.json").is_file():
        rng, threads = checkpoint.rng_state(), torch.get_num_threads()
        try:
            _train_once(name, folder, progress, retrain)
        finally:
            checkpoint.set_rng_state(rng)
            torch.set_num_threads(threads)
    model, tokenizer = load_model(folder, device)
    config = TrainConfig.from_file(folder / "config.json")
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return Pretrained(model.eval(), tokenizer, config, folder, summary)
