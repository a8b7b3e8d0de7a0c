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
interrupted training never looks finished. It checkpoints at every
evaluation, so the next ``load`` resumes it even after ``kill -9``, losing at
most one evaluation interval. A lock file beside the folder lets one process
train while any other waits for it and then loads the result.

The book's build trains the models before it runs a chapter, so no training
ever runs under a notebook's cell timeout; from the shell:

    python -m llmbook.pretrained shakespeare          # train (or resume) and cache it, with a progress bar
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmbook import checkpoint, data, units
from llmbook.bpe.tokenizer import Tokenizer
from llmbook.data import ChecksumError, DataNotFoundError
from llmbook.errors import Interrupted, RunError
from llmbook.generate import generate as generate_ids
from llmbook.model import GPT
from llmbook.train import TRAIN_PRESETS, TrainConfig, Trainer, load_model, read_jsonl


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
        return read_jsonl(self.run_dir / "metrics.jsonl")

    def samples(self) -> list[dict]:
        """``{"step", "prompt", "text"}``: what the model wrote at each evaluation during training."""
        return read_jsonl(self.run_dir / "samples.jsonl")

    def generate(self, prompt: str, max_new_tokens: int = 200, seed: int | None = None, **kw) -> str:
        """The text the model writes after ``prompt``; ``kw`` as ``llmbook.generate.generate`` (temperature, top_k...).

        ``seed`` makes the sampling repeatable. Text longer than the context
        window is written in pieces: when the window is full, the model goes on
        from the last half of it (it forgets the rest, as it must). Only ids
        the tokenizer has are drawn, never the output layer's padding.
        """
        ids = self.tokenizer.encode_ordinary(prompt)  # "<|endoftext|>" typed in a prompt is text
        if not ids:
            raise ValueError("the prompt must not be empty: the model needs at least one token to continue")
        device = next(self.model.parameters()).device
        if seed is not None and "generator" not in kw:
            kw["generator"] = torch.Generator(device=device).manual_seed(seed)
        kw.setdefault("vocab_size", self.tokenizer.vocab_size)
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
    return recipe_dir(name, TRAIN_PRESETS[name])


def recipe_dir(name: str, cfg: TrainConfig, extra: str = "") -> Path:
    """``<cache>/models/<name>-<sha8>``: the hash of the config (and of ``extra``, e.g. the base model's folder).

    ``parallel`` is left out: how processes share the work (Chapter 8)
    changes the time, not the model.
    """
    recipe = asdict(cfg)
    del recipe["parallel"]
    recipe = json.dumps(recipe, sort_keys=True) + extra
    return data.cache_dir() / "models" / f"{name}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"


def _train_once(name: str, folder: Path, make_trainer: Callable[[Path], Trainer], max_steps: int,
                progress: bool, retrain: bool) -> None:
    """Train into ``<folder>.partial`` (resuming it if a previous try was interrupted), then rename.

    The caller holds the lock: no other process writes these folders meanwhile.
    """
    partial = folder.with_name(folder.name + ".partial")
    if retrain and partial.exists():
        shutil.rmtree(partial)
    resume = (partial / "checkpoint.pt").is_file()
    if resume:
        print(f"resuming the training of the model '{name}' in {partial}")
    else:
        # no up-front estimate: a few probe steps on a busy machine misjudge it badly; the bar shows the time left
        print(f"training the model '{name}' once on this machine ({max_steps} steps, minutes on a laptop; "
              f"interrupt any time, the next call resumes); later calls load it from {folder}")
    # a .partial folder without a checkpoint holds only the logs of a try killed before its first save
    make_trainer(partial).train(resume=resume, overwrite=not resume)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():  # retrain: move the old model aside, then drop it once the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(partial, folder)  # atomic: the folder appears complete or not at all
    shutil.rmtree(old, ignore_errors=True)


def ensure_trained(name: str, folder: Path, make_trainer: Callable[[Path], Trainer], max_steps: int,
                   progress: bool = True, retrain: bool = False) -> Path:
    """``folder``, trained first by ``make_trainer(run_dir).train()`` if it holds no finished run (or ``retrain``).

    The machinery behind ``ensure``, shared with later chapters' cached models
    (Chapter 9's fine-tuned ones): a lock, a ``.partial`` folder renamed when
    complete, resuming after an interruption, the caller's RNG left as it was.
    """
    if not retrain and (folder / "summary.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with data.file_lock(folder.with_name(f".{folder.name}.lock")):  # hidden, beside the folder
        if retrain or not (folder / "summary.json").is_file():  # another process may have trained it meanwhile
            rng, threads = checkpoint.rng_state(), torch.get_num_threads()
            try:
                _train_once(name, folder, make_trainer, max_steps, progress, retrain)
            finally:
                checkpoint.set_rng_state(rng)
                torch.set_num_threads(threads)
    return folder


def ensure(name: str = "shakespeare", progress: bool = True, retrain: bool = False) -> Path:
    """The folder of the reference model ``name``, trained first if it is not cached (or ``retrain``).

    Safe to call from several processes at once: one trains, the others wait
    on the lock and then find the finished folder. An interrupted training
    (Ctrl-C, a killed process) is resumed from its last checkpoint next time.
    Training leaves the caller's random generators and thread count as they were.
    """
    folder = model_dir(name)
    cfg = TRAIN_PRESETS[name]
    return ensure_trained(name, folder, lambda run_dir: Trainer(cfg, run_dir, progress=progress), cfg.max_steps,
                          progress, retrain)


def load(name: str = "shakespeare", device: str | torch.device = "cpu", progress: bool = True,
         retrain: bool = False) -> Pretrained:
    """The reference model ``name`` (a ``TRAIN_PRESETS`` key) in eval mode, trained first if it is not cached.

    Training leaves the caller's random generators as they were, so a chapter
    prints the same numbers whether or not the model had to be trained.
    """
    folder = ensure(name, progress, retrain)
    model, tokenizer = load_model(folder, device)
    config = TrainConfig.from_file(folder / "config.json")
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return Pretrained(model.eval(), tokenizer, config, folder, summary)


def cache_cli(argv: list[str] | None, prog: str, what: str, presets: dict, default: str,
              ensure_fn: Callable[..., Path], describe: Callable[[dict], str]) -> int:
    """The command line that trains (or resumes) and caches one model of ``presets``; Chapter 9's uses it too.

    ``describe(summary)`` is the end of the summary line. Errors are one line
    (exit 2); Ctrl-C keeps the checkpoint and says how to resume.
    """
    parser = argparse.ArgumentParser(prog=prog, description=f"Train (or resume) and cache one of the book's {what}.")
    parser.add_argument("name", nargs="?", default=default, help=f"one of: {', '.join(presets)}")
    parser.add_argument("--retrain", action="store_true", help="train again even if it is cached")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        folder = ensure_fn(args.name, progress=not args.no_progress, retrain=args.retrain)
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except Interrupted as exc:
        print(f"{exc.args[0].replace('--resume', 'the same command')}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except (ValueError, OSError, RunError, DataNotFoundError, ChecksumError, KeyError) as exc:
        message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
        print(f"error: {message.splitlines()[0] if message else type(exc).__name__}", file=sys.stderr)
        return 2
    print(f"{args.name}: {summary['steps']} steps, {describe(summary)}, trained in "
          f"{units.duration(summary['train_seconds'])} -> {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m llmbook.pretrained NAME [--retrain]``: train (or resume) and cache a reference model."""
    return cache_cli(argv, "python -m llmbook.pretrained", "reference models", TRAIN_PRESETS, "shakespeare", ensure,
                     lambda s: f"{units.count(s['params'])} parameters, val loss {s['val_loss']:.3f} nats/token, "
                               f"{s['val_bpb']:.3f} bits per byte")


if __name__ == "__main__":
    raise SystemExit(main())
