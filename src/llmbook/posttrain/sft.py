"""Supervised fine-tuning on Chapter 7's ``Trainer``: the same loop, a dataset of conversations instead of a text.

What changes from pretraining is small, and this module is the whole of it:

    data      examples (``masking.tokenize_example``): ids, and labels that are -100 except on the responses
    batches   packed rows (``packing.pack``: block-diagonal attention) or padded ones (``collate.collate``)
    model     starts from a trained base (``pretrained.load``), all of it trained or only LoRA adapters (``lora``)
    measure   validation loss on the response tokens only, and a reply to a fixed prompt at each evaluation

Everything else, the optimizer, the schedule, clipping, checkpoints that
resume exactly, Ctrl-C, the progress bar, the run folder, is the
``Trainer``'s. The fine-tuned models the chapters use are cached like the
reference model (``load("sft-full")``), trained once by the book's build:

    python -m llmbook.posttrain.sft sft-full          # train (or resume) and cache it
"""

from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from llmbook import checkpoint, units
from llmbook.bpe.tokenizer import Tokenizer
from llmbook.losses import bits_per_byte
from llmbook.model import GPT
from llmbook.posttrain.collate import collate
from llmbook.posttrain.instructions import instruction_split
from llmbook.posttrain.lora import apply_lora, lora_state_dict, merge_lora
from llmbook.posttrain.masking import IGNORE_INDEX, Example, tokenize_example
from llmbook.posttrain.order import EpochOrder
from llmbook.posttrain.packing import first_fit, pack
from llmbook.posttrain.tasks import TaskSplit, make_task_split
from llmbook.posttrain.templates import Message, Template, from_alpaca, get_template
from llmbook.posttrain.vocab import add_special_tokens, resize_token_embeddings
from llmbook.pretrained import Pretrained, cache_cli, ensure_trained, recipe_dir
from llmbook.pretrained import ensure as ensure_base
from llmbook.train import TrainConfig, Trainer, load_model, read_jsonl

DATA = ("task", "instructions", "mixed")
ADAPTER_FILE = "adapter.pt"


@dataclass
class SFTConfig(TrainConfig):
    """A fine-tuning run: ``TrainConfig``'s settings (optimizer, steps, evaluation) plus what SFT adds.

    ``model``, ``model_overrides``, ``dataset`` and ``tokenizer`` are not used:
    the model and its tokenizer are the base's, and ``context_length`` must
    be the base's. ``batch_size`` counts rows: packed rows of
    ``context_length`` tokens, or single examples padded to the batch's longest.
    """

    base: str = "english"  # a llmbook.pretrained preset, or a run folder with model.pt and tokenizer.json
    data: str = "mixed"  # "task" (the verifiable task), "instructions" (instruction-data.json) or "mixed" (both)
    template: str = "chatml"  # "chatml" or "alpaca" (llmbook.posttrain.templates)
    train_on_prompt: bool = False  # True: every token carries loss, the prompt too (the ablation)
    packing: bool = True  # False: one example per row, padded to the batch's longest
    lora_r: int = 0  # 0: full fine-tuning; r > 0: LoRA adapters of rank r, the base frozen
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ""  # comma-separated linear names ("qkv,proj"); "": attention and MLP (lora.DEFAULT_TARGETS)
    task_seed: int = 0  # make_task_split's seed; the test set the chapters report depends on it
    n_task_train: int = 2000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data not in DATA:
            raise ValueError(f"data must be one of {', '.join(DATA)}, got {self.data!r}")
        get_template(self.template)  # one line naming the templates if unknown
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0: full fine-tuning), got {self.lora_r}")
        if self.parallel != "none":
            raise ValueError("SFT runs in one process here (parallel='none'); Chapter 8's trainers pretrain")

    @property
    def targets(self) -> tuple[str, ...] | None:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()) or None


# ---------------------------------------------------------------------- examples


@functools.lru_cache(maxsize=4)
def _task_split(seed: int, n_train: int) -> TaskSplit:
    """``make_task_split``, once per process for each setting: the train and validation examples share it."""
    return make_task_split(seed, n_train=n_train)


def conversations(cfg: SFTConfig, split: str) -> list[list[Message]]:
    """The conversations of one split (``"train"`` or ``"val"``): task items, instruction records, or both."""
    out: list[list[Message]] = []
    if cfg.data in ("instructions", "mixed"):
        train, val, _ = instruction_split()
        out += [from_alpaca(r) for r in (train if split == "train" else val)]
    if cfg.data in ("task", "mixed"):
        tasks = _task_split(cfg.task_seed, cfg.n_task_train)
        out += [item.messages() for item in (tasks.train if split == "train" else tasks.val)]
    return out


def tokenize_all(
    tokenizer: Tokenizer, convs: list[list[Message]], template: Template, max_len: int, train_on_prompt: bool = False,
) -> tuple[list[Example], int]:
    """The examples that fit ``max_len`` tokens, and how many were dropped for being longer.

    An over-long example is dropped, not truncated: cut, it would lose its end
    token and teach the model not to stop.
    """
    examples, dropped = [], 0
    for messages in convs:
        try:
            examples.append(tokenize_example(tokenizer, messages, template, max_len, train_on_prompt))
        except ValueError as exc:
            if "more than max_len" not in str(exc):
                raise
            dropped += 1
    return examples, dropped


@dataclass
class Rows:
    """The training set as rows of the context: each row's examples (indices into ``examples``)."""

    examples: list[Example]
    rows: list[list[int]]

    def tokens(self, row: int) -> int:
        return sum(len(self.examples[i]) for i in self.rows[row])


# ---------------------------------------------------------------------- the base model


def load_base(base: str, device: str | torch.device = "cpu", progress: bool = True) -> tuple[GPT, Tokenizer, Path]:
    """The base model, its tokenizer and its folder: a pretrained preset (trained once, then cached) or a run folder."""
    from llmbook.train import TRAIN_PRESETS

    if base in TRAIN_PRESETS:
        folder = ensure_base(base, progress=progress)
    else:
        folder = Path(base).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"base {base!r} is neither a pretrained preset ({', '.join(TRAIN_PRESETS)}) nor "
                                    "a run folder: give one of those")
    model, tokenizer = load_model(folder, device)
    return model, tokenizer, folder


def load_sft(base: str, device: str | torch.device = "cpu", progress: bool = True) -> tuple[GPT, Tokenizer, Path]:
    """A fine-tuned model to start from (Chapter 10), its tokenizer and folder: an ``SFT_PRESETS`` name (trained
    once, then cached) or a run folder. A fresh copy every call: the trainers that start from it train it in place."""
    if base in SFT_PRESETS:
        folder = ensure(base, progress=progress)
    else:
        folder = Path(base).expanduser()
        if not (folder / "model.pt").is_file():
            raise FileNotFoundError(f"base {base!r} is neither an SFT preset ({', '.join(SFT_PRESETS)}) nor a run "
                                    "folder with model.pt: give one of those")
    model, tokenizer = load_model(folder, device)
    return model, tokenizer, folder


# ---------------------------------------------------------------------- the trainer


class _SFTData:
    """What ``Trainer`` reads of its data (``tokenizer``), plus the examples."""

    def __init__(self, tokenizer: Tokenizer, train: Rows, val: list[Example], dropped: int):
        self.tokenizer, self.train_rows, self.val_examples, self.dropped = tokenizer, train, val, dropped


class SFTTrainer(Trainer):
    """``Trainer`` with conversations for data and a trained model to start from; see the module docstring.

    ``SFTTrainer(SFT_PRESETS["sft-full"], "runs/sft").train()``; resume,
    overwrite, Ctrl-C and checkpoints behave exactly as in pretraining.
    """

    cfg: SFTConfig

    def load_data(self) -> _SFTData:  # type: ignore[override]
        cfg = self.cfg
        if not isinstance(cfg, SFTConfig):
            raise TypeError(f"SFTTrainer needs an SFTConfig, got {type(cfg).__name__}")
        self.template = get_template(cfg.template)
        base, tokenizer, self.base_dir = load_base(cfg.base, progress=self.progress)
        if base.cfg.context_length != cfg.context_length:
            raise ValueError(f"context_length={cfg.context_length} differs from the base model's "
                             f"{base.cfg.context_length}: set context_length={base.cfg.context_length}")
        missing = [t for t in self.template.special_tokens if t not in tokenizer.special_tokens]
        if missing:  # a base whose tokenizer lacks the template's tokens: add them, and rows for them
            old_size = tokenizer.vocab_size
            tokenizer = add_special_tokens(tokenizer, self.template.special_tokens)
            resize_token_embeddings(base, tokenizer.vocab_size, n_used=old_size)  # new rows: the mean of the old
        self.base = base
        train, dropped = tokenize_all(tokenizer, conversations(cfg, "train"), self.template, cfg.context_length,
                                      cfg.train_on_prompt)
        val, dropped_val = tokenize_all(tokenizer, conversations(cfg, "val"), self.template, cfg.context_length)
        if not train or not val:
            raise ValueError(f"no {'training' if not train else 'validation'} example fits context_length="
                             f"{cfg.context_length}")
        if cfg.packing:
            rows = first_fit([len(e) for e in train], cfg.context_length)
        else:
            rows = [[i] for i in range(len(train))]
        if len(rows) < cfg.batch_size:
            raise ValueError(f"the training set fills {len(rows)} rows, fewer than batch_size={cfg.batch_size}")
        self.pad_id = tokenizer.special_tokens.get("<|endoftext|>", 0)
        self._order = EpochOrder(len(rows), cfg.seed)
        return _SFTData(tokenizer, Rows(train, rows), val, dropped + dropped_val)

    def build_model(self) -> GPT:
        """The base model; with ``lora_r`` > 0, LoRA adapters on its linears (seeded) and the rest frozen."""
        model = self.base
        del self.base
        cfg = self.cfg
        model.train()
        if cfg.lora_r:
            apply_lora(model, cfg.targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        return model

    # ------------------------------------------------------------------ batches

    def _rows_of(self, step: int, micro: int) -> list[int]:
        """The rows of one micro-batch: epochs of a permutation seeded by (seed, epoch), so resuming needs no state."""
        cfg = self.cfg
        return self._order.take((step * cfg.accumulation_steps + micro) * cfg.batch_size, cfg.batch_size)

    def get_batch(self, step: int, micro: int) -> tuple[Tensor, ...]:
        rows_data = self.data.train_rows
        rows = [rows_data.rows[r] for r in self._rows_of(step, micro)]
        if self.cfg.packing:
            x, y, mask, positions, _, _ = pack(rows_data.examples, self.cfg.context_length, self.pad_id, rows=rows)
            batch = (x, y, mask, positions)
        else:
            # right padding: causal attention already keeps every real token from seeing the pads after it
            x, y, _, positions = collate([rows_data.examples[row[0]] for row in rows], self.pad_id)
            batch = (x, y, None, positions)
        return tuple(t.to(self.device) if t is not None else None for t in batch)

    def loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        x, y, mask, positions = batch
        return self.model(x, y, positions=positions, mask=mask)[1]

    def step_tokens(self) -> int:
        """Real tokens (no padding) of the step just taken: what tokens/s counts for SFT."""
        step = self.step - 1
        return sum(self.data.train_rows.tokens(r) for micro in range(self.cfg.accumulation_steps)
                   for r in self._rows_of(step, micro))

    # ------------------------------------------------------------------ measuring

    @torch.no_grad()
    def validate(self) -> dict:
        """Loss on the validation examples' response tokens only, in nats per token and bits per byte."""
        return response_loss(self.raw_model, self.data.val_examples, self.token_lengths, self.pad_id,
                             self.cfg.eval_batch_size, self.device)

    def sample(self) -> str:
        """The model's greedy reply to ``sample_prompt`` in the template: how the answers change as SFT goes."""
        from llmbook.posttrain.chat import reply

        was_training = self.raw_model.training
        try:
            return reply(self.raw_model, self.data.tokenizer, [Message("user", self.cfg.sample_prompt)],
                         self.template, max_new_tokens=min(self.cfg.sample_tokens, self.cfg.context_length // 2),
                         temperature=0.0)
        finally:
            self.raw_model.train(was_training)

    # ------------------------------------------------------------------ what a finished run keeps

    def full_state_dict(self) -> dict[str, Tensor]:
        """``model.pt``'s weights: a plain GPT's, the adapters merged in, so every loader reads it as any model."""
        if not self.cfg.lora_r:
            return super().full_state_dict()
        merged = merge_lora(copy.deepcopy(self.raw_model))
        return {k: v.detach().cpu() for k, v in merged.state_dict().items()}

    def _finish(self) -> dict:
        summary = super()._finish()
        if self.cfg.lora_r and self.is_main:  # the adapter alone: what one shares, kilobytes instead of the model
            checkpoint.save_checkpoint(self.run_dir / ADAPTER_FILE, {
                "lora": {"r": self.cfg.lora_r, "alpha": self.cfg.lora_alpha, "targets": self.cfg.lora_targets},
                "state_dict": {k: v.detach().cpu() for k, v in lora_state_dict(self.raw_model).items()}})
        return summary

    def _summary(self, finished: bool) -> dict:
        summary = super()._summary(finished)
        rows = self.data.train_rows
        tokens = sum(rows.tokens(r) for s in range(self.step) for m in range(self.cfg.accumulation_steps)
                     for r in self._rows_of(s, m))
        summary.update(tokens_seen=tokens, tokens_per_s=tokens / self.train_seconds if self.train_seconds else 0.0,
                       trainable_params=sum(p.numel() for p in self.params), examples=len(rows.examples),
                       rows=len(rows.rows), dropped_examples=self.data.dropped)
        return summary


@torch.no_grad()
def response_loss(model: GPT, examples: list[Example], token_lengths: Tensor, pad_id: int, batch_size: int = 32,
                  device: str | torch.device = "cpu") -> dict:
    """Mean loss over the response tokens of ``examples`` (every one scored once), and bits per byte of them.

    The examples are right-padded one per row (no packing), so each is scored
    exactly as alone; ``token_lengths`` gives the bytes behind each target.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, n_tokens, n_bytes = 0.0, 0, 0
    lengths = token_lengths.to(device)
    try:
        for start in range(0, len(examples), batch_size):
            x, y, _, _ = collate(examples[start:start + batch_size], pad_id)
            x, y = x.to(device), y.to(device)
            logits, _ = model(x)
            keep = y != IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[keep].float(), y[keep], reduction="sum").item()
            n_tokens += int(keep.sum())
            n_bytes += int(lengths[y[keep]].sum())
    finally:
        model.train(was_training)
    return {"loss": total / n_tokens, "bpb": bits_per_byte(total, n_bytes) if n_bytes else math.nan,
            "tokens": n_tokens, "bytes": n_bytes}


# ---------------------------------------------------------------------- the book's fine-tuned models

_COMMON = dict(base="english", context_length=256, data="mixed", eval_interval=40, log_interval=10,
               sample_tokens=48, sample_prompt="Write the last word of this line.\n\nIt is a truth universally "
               "acknowledged.", warmup_steps=20, min_lr_ratio=0.1, grad_clip=1.0, seed=1337)

SFT_PRESETS: dict[str, SFTConfig] = {
    # Full fine-tuning: every weight trains, at a quarter of the base's peak learning rate, no weight decay (a few
    # epochs on small data; decay would pull the weights towards 0, away from the base). 240 steps of 16 packed rows
    # are about 6 epochs of the 3,000 examples. On a 2-core machine: ~2.5 minutes.
    "sft-full": SFTConfig(name="sft-full", batch_size=16, max_steps=240, lr=5e-4, weight_decay=0.0, **_COMMON),
    # LoRA on every linear of attention and MLP, the base frozen, at two ranks (the "LoRA, 2 ranks"):
    # adapters start at zero (B = 0), so they take a higher learning rate, as the LoRA paper's runs do: 20x full
    # fine-tuning's here. Measured for r=8 (240 steps): lr 3e-3 reached answer loss 4.05 and 25% on the task,
    # 1e-2 reached 3.94 and 31% (full fine-tuning: 3.49 and 50%).
    # LoRA's A and B are not weight-decayed (optim.param_groups decays nn.Linear weights only; weight_decay=0 anyway).
    "sft-lora": SFTConfig(name="sft-lora", batch_size=16, max_steps=240, lr=1e-2, weight_decay=0.0, lora_r=8,
                          lora_alpha=16.0, **_COMMON),
    "sft-lora-r2": SFTConfig(name="sft-lora-r2", batch_size=16, max_steps=240, lr=1e-2, weight_decay=0.0, lora_r=2,
                             lora_alpha=4.0, **_COMMON),
    # seconds: tests
    "sft-tiny": SFTConfig(name="sft-tiny", batch_size=4, max_steps=6, lr=1e-3, eval_interval=3, eval_batch_size=16,
                          log_interval=2, sample_tokens=8, base="english", context_length=256, data="task",
                          n_task_train=40),
}


def run_dir(name: str) -> Path:
    """Where the fine-tuned model ``name`` is cached: named by its recipe and by the base model it starts from."""
    if name not in SFT_PRESETS:
        raise ValueError(f"no fine-tuned model {name!r}; the presets are: {', '.join(SFT_PRESETS)}")
    cfg = SFT_PRESETS[name]
    from llmbook.pretrained import model_dir
    from llmbook.train import TRAIN_PRESETS

    base = model_dir(cfg.base).name if cfg.base in TRAIN_PRESETS else str(Path(cfg.base).resolve())
    return recipe_dir(name, cfg, extra=f"|base={base}")


def ensure(name: str = "sft-full", progress: bool = True, retrain: bool = False) -> Path:
    """The folder of the fine-tuned model ``name``, trained first (with its base, if need be) if it is not cached."""
    folder = run_dir(name)  # ValueError naming the presets for an unknown name
    cfg = SFT_PRESETS[name]
    return ensure_trained(name, folder, lambda d: SFTTrainer(cfg, d, progress=progress), cfg.max_steps, progress,
                          retrain)


def load(name: str = "sft-full", device: str | torch.device = "cpu", progress: bool = True,
         retrain: bool = False) -> Pretrained:
    """The fine-tuned model ``name`` (an ``SFT_PRESETS`` key) in eval mode, with its tokenizer, recipe and logs."""
    folder = ensure(name, progress, retrain)
    model, tokenizer = load_model(folder, device)
    config = SFTConfig.from_file(folder / "config.json")
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return Pretrained(model.eval(), tokenizer, config, folder, summary)


def metrics(name: str) -> list[dict]:
    """The training log of a cached fine-tuned model (``metrics.jsonl``)."""
    return read_jsonl(run_dir(name) / "metrics.jsonl")


def main(argv: list[str] | None = None) -> int:
    """``python -m llmbook.posttrain.sft NAME [--retrain]``: train (or resume) and cache a fine-tuned model."""
    return cache_cli(argv, "python -m llmbook.posttrain.sft", "SFT models", SFT_PRESETS, "sft-full", ensure,
                     lambda s: f"{units.count(s['trainable_params'])} trainable parameters, response loss "
                               f"{s['val_loss']:.3f} nats/token")


if __name__ == "__main__":
    raise SystemExit(main())

