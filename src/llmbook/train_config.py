"""What decides a training run: ``TrainConfig``, its checks, its presets, and config files.

A run is fully described by this dataclass, so it is what ``config.json`` in a
run folder holds, what ``python -m llmbook.train --config`` reads (a preset
name or a .toml/.json file, then ``--set key=value`` overrides), and what the
reference model's cache folder is named after (``llmbook.pretrained``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmbook import loader
from llmbook.model import PRESETS, ModelConfig

PRECISIONS = ("fp32", "bf16", "fp16")
PARALLEL = ("none", "ddp", "fsdp")
_SET_ELSEWHERE = {"vocab_size": "the tokenizer", "context_length": "TrainConfig.context_length"}


@dataclass
class TrainConfig:
    """Everything that decides a training run; ``config.json`` in the run folder is this, as JSON."""

    name: str = "run"  # the run folder's name under --out
    model: str = "laptop-llama"  # a ModelConfig preset name
    model_overrides: dict = field(default_factory=dict)  # e.g. {"d_model": 192, "attention": "sdpa"}
    dataset: str = "tinyshakespeare"  # registry name or path to a .txt
    tokenizer: str = "bytes"  # "bytes" | "bpe-<V>" | "gpt2"
    val_fraction: float = 0.1  # the last 10% of the text, as nanoGPT
    # sequences per micro-batch, over all processes: with parallel="ddp"/"fsdp" each of N ranks takes
    # batch_size // N of them (N must divide it), so N ranks train on the batch one process would
    batch_size: int = 12
    context_length: int = 64  # overrides the preset's
    accumulation_steps: int = 1  # micro-batches per optimizer step: batch_size·accumulation_steps sequences
    max_steps: int = 1000  # optimizer steps
    lr: float = 1e-3  # peak
    warmup_steps: int | None = None  # None: 2% of max_steps
    decay_steps: int | None = None  # None: max_steps
    min_lr_ratio: float = 0.1  # the floor after the cosine, as a fraction of the peak
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99  # 0.99 rather than Adam's 0.999: small batches, noisy gradients (nanoGPT's choice)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    precision: str = "fp32"  # "fp32" | "bf16" (CPU or CUDA autocast) | "fp16" (CUDA only, GradScaler)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more time
    compile: bool = False  # torch.compile the model
    # PyTorch's kernels for the norms and activations: the same functions as the book's (tests/test_layers.py),
    # 1.2-1.45x faster a step at nanoGPT's CPU size (benchmarks/bench_pretraining.py); False: the book's own
    fused_kernels: bool = True
    device: str = "auto"  # "auto": cuda if available, else cpu
    threads: int | None = None  # torch.set_num_threads on CPU
    eval_interval: int = 250  # and at the first and last step; 0: only at the end
    eval_batches: int | None = None  # None: the whole validation split
    eval_batch_size: int = 64
    log_interval: int = 10  # a metrics record (and the only loss .item() sync) every this many steps
    checkpoint_interval: int | None = None  # None: at every evaluation; 0: only when training stops; n: every n steps
    sample_tokens: int = 200  # a sample at each eval (at most what fits in the context); 0: none
    sample_prompt: str = "\n"
    seed: int = 1337
    # how several processes (torchrun --nproc_per_node=N) share the work (Chapter 8): "none", one process;
    # "ddp", PyTorch's DistributedDataParallel (every rank holds the model, gradients are all-reduced);
    # "fsdp", FSDP2's fully_shard per block (parameters, gradients and AdamW's moments sharded over the ranks)
    parallel: str = "none"

    def __post_init__(self) -> None:
        self._check_types()
        self._check_model_overrides()
        for f in dataclasses.fields(self):  # NaN passes every comparison below, so refuse it (and inf) first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\"):
            raise ValueError(f"name must be a plain folder name (no slashes), got {self.name!r}")
        if self.model not in PRESETS:
            raise ValueError(f"unknown model preset {self.model!r}; choose one of {', '.join(PRESETS)}")
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        for key in self.model_overrides:
            if key in _SET_ELSEWHERE:
                raise ValueError(f"model_overrides cannot set {key}: it comes from {_SET_ELSEWHERE[key]}")
            if key not in model_fields:
                raise ValueError(f"model_overrides: {key!r} is not a ModelConfig field; valid: {sorted(model_fields)}")
        loader.check_tokenizer_name(self.tokenizer)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be strictly between 0 and 1, got {self.val_fraction}")
        for name in ("batch_size", "context_length", "accumulation_steps", "max_steps", "eval_batch_size",
                     "log_interval", "eval_batches", "threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("eval_interval", "checkpoint_interval", "sample_tokens", "weight_decay", "grad_clip"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.eps <= 0:
            raise ValueError(f"lr and eps must be positive, got lr={self.lr}, eps={self.eps}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup < 0 or self.decay < self.warmup:
            raise ValueError(
                f"need 0 <= warmup_steps <= decay_steps, got warmup {self.warmup} and decay {self.decay}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}: 'none' for one "
                             "process, 'ddp' or 'fsdp' under torchrun --nproc_per_node=N")
        try:
            device = torch.device(self.resolved_device)
        except RuntimeError:
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from None
        if self.precision == "fp16" and device.type != "cuda":
            raise ValueError("precision='fp16' needs a CUDA GPU (its GradScaler); use 'bf16' on a CPU")
        if self.precision == "fp16" and self.parallel == "fsdp":  # each rank would skip steps on its own shard's inf
            raise ValueError("precision='fp16' is not supported with parallel='fsdp' (its GradScaler sees only this "
                             "rank's shard); use precision='bf16'")
        if self.sample_tokens and not self.sample_prompt:
            raise ValueError("sample_prompt must not be empty when sample_tokens > 0 (the model needs a first token)")
        self.model_config(256)  # the preset with these overrides must be a valid model

    def _check_types(self) -> None:
        """"max_steps=abc" on the command line should fail here, with the field's name, not deep in training."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), typing.get_args(hints[f.name]) or (hints[f.name],)
            if float in allowed and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # lr=1 and lr=1.0 are the same run (and the same cache hash)
                setattr(self, f.name, value)
            if not any(value is None if t is type(None) else type(value) is t for t in allowed):
                want = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
                raise ValueError(f"{f.name} must be {want}, got {value!r}")

    def _check_model_overrides(self) -> None:
        """Each override's type, as ``_check_types`` does for our own fields; and no NaN or inf."""
        hints = typing.get_type_hints(ModelConfig)
        for key, value in self.model_overrides.items():
            if key in _SET_ELSEWHERE or key not in hints:
                continue  # __post_init__ explains these
            args = typing.get_args(hints[key])
            if typing.get_origin(hints[key]) is typing.Literal:
                allowed = tuple({type(a) for a in args})
            else:
                allowed = args or (hints[key],)
            if float in allowed and isinstance(value, int) and not isinstance(value, bool):
                value = self.model_overrides[key] = float(value)
            if not any(value is None if t is type(None) else type(value) is t for t in allowed):
                want = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
                raise ValueError(f"model_overrides.{key} must be {want}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"model_overrides.{key} must be a finite number, got {value}")

    @property
    def checkpoint_every(self) -> int:
        """Steps between checkpoints: ``checkpoint_interval``, or ``eval_interval`` when that is None (0: none)."""
        return self.eval_interval if self.checkpoint_interval is None else self.checkpoint_interval

    @property
    def warmup(self) -> int:
        return round(0.02 * self.max_steps) if self.warmup_steps is None else self.warmup_steps

    @property
    def decay(self) -> int:
        return self.max_steps if self.decay_steps is None else self.decay_steps

    @property
    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_length * self.accumulation_steps

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model preset with the overrides, this run's context length, and a vocabulary for ``vocab_size`` ids.

        Above 256 the vocabulary is padded up to a multiple of 64 (1000 -> 1024,
        GPT-2's 50257 -> 50304): matrix multiplies run faster on round sizes,
        and the extra rows are tokens that never occur.
        """
        padded = vocab_size if vocab_size <= 256 else 64 * math.ceil(vocab_size / 64)
        try:
            return ModelConfig.preset(self.model, **{**self.model_overrides, "vocab_size": padded,
                                                     "context_length": self.context_length})
        except TypeError as exc:  # a value of the wrong type deep in the model's checks
            raise ValueError(f"model_overrides {self.model_overrides} do not make a valid model: {exc}") from None

    # ------------------------------------------------------------------ files and the command line

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(_field_names())}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """A config from a ``.toml`` or ``.json`` file (the run folder's ``config.json`` works too)."""
        return cls.from_dict(_read_config_file(Path(path)))

    @classmethod
    def resolve(cls, spec: str, overrides: list[str] = ()) -> TrainConfig:
        """A preset name or a file, then ``key=value`` overrides: ``resolve("tiny", ["lr=3e-3", "name=fast"])``.

        Values are parsed as JSON (``3e-3``, ``null``, ``true``, ``{"d_model": 96}``),
        anything else is a string. ``model_overrides.KEY=VALUE`` sets one model field.
        """
        if spec in TRAIN_PRESETS:
            values = asdict(TRAIN_PRESETS[spec])
        elif Path(spec).suffix in (".toml", ".json") or Path(spec).exists():
            values = _read_config_file(Path(spec))
        else:
            presets = ", ".join(TRAIN_PRESETS)
            raise ValueError(f"unknown config {spec!r}: give a preset ({presets}) or a .toml/.json file")
        for item in overrides:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"overrides are key=value, got {item!r}")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            if key.startswith("model_overrides."):
                values.setdefault("model_overrides", {})[key.removeprefix("model_overrides.")] = value
            elif key in _field_names():
                values[key] = value
            else:
                raise ValueError(f"unknown setting {key!r}; valid: {', '.join(_field_names())}")
        return cls.from_dict(values)


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found; give a preset name ({', '.join(TRAIN_PRESETS)}) "
                                "or the path to a .toml/.json file")
    if path.suffix not in (".toml", ".json"):
        raise ValueError(f"{path}: a config file must end in .toml or .json")
    try:
        text = path.read_text(encoding="utf-8")
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise ValueError(f"{path} is not valid {kind} ({exc}): fix the file") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a table of settings (key = value), not a {type(values).__name__}")
    return values


TRAIN_PRESETS: dict[str, TrainConfig] = {
    # the book's reference model (llmbook.pretrained.load("shakespeare")).
    # Sized for the 5-minute target on 2 CPU cores, with margin: 1,500 steps took about 4 minutes on a 2-core machine
    # that ran this trainer at 9.6 K tokens/s, the slowest seen (benchmarks/results/pretraining.json has the latest
    # measurement; a busy machine takes longer, and Chapter 7 prints the truth). BPE-1024 tokens carry ~2.2 bytes
    # each, so a context of 128 tokens sees ~280 characters. The 2.3 M tokens are ~5 passes over the 1 MB of text,
    # and light dropout pays: 1,500-step runs measured 2.159 bits per byte with dropout 0.05 and 2.193 with 0.1
    # (lr 3e-3), 2.168 without dropout; with dropout 0.05, lr 1.5e-3 gave 2.136, 2e-3 2.144, 3e-3 2.159, and
    # 1,300 steps at 2e-3 2.174. No dropout on the attention probabilities: with it SDPA leaves its fast CPU
    # kernel, and the step is ~1.27x slower (benchmarks/bench_pretraining.py).
    "shakespeare": TrainConfig(
        name="shakespeare", model="laptop-llama",
        model_overrides={"attention": "sdpa", "dropout": 0.05, "attention_dropout": 0.0},
        tokenizer="bpe-1024", batch_size=12, context_length=128, max_steps=1500, lr=1.5e-3, eval_interval=250,
    ),
    # nanoGPT's CPU configuration for shakespeare_char (its README: 4 layers, 4 heads, width 128, context 64,
    # batch 12, dropout 0), with byte tokens instead of its 65 characters. Its README, quoted: "decrease the number
    # of iterations to 2000" and "This still runs in about ~3 minutes, but gets us a loss of only 1.88".
    # max_steps=2000 follows that run (cosine decay over the 2000 steps); what this run reaches is measured, not quoted.
    "shakespeare-nanogpt": TrainConfig(
        name="shakespeare-nanogpt", model="nanogpt-char-cpu", tokenizer="bytes",
        model_overrides={"dropout": 0.0, "attention": "sdpa"},  # nanoGPT's attention is PyTorch's SDPA too
        context_length=64, batch_size=12, lr=1e-3, max_steps=2000, warmup_steps=100, min_lr_ratio=0.1,
        beta2=0.99, weight_decay=0.1, eval_interval=500,
    ),
    # the post-training base model (Chapter 9; llmbook.pretrained.load("english")): the reference model's shape on
    # 1.9 MB of English (Shakespeare, Pride and Prejudice, CS336's prose; loader.MIXTURES), with a BPE of 2,048
    # tokens that reserves the chat special tokens. Context 256: an Alpaca prompt with its response needs it.
    # 700 steps of 16 x 256 tokens (2.9 M tokens, ~5 passes over the 0.59 M training tokens) took about 6 minutes
    # at the 7.8 K tokens/s a 2-core machine ran it; the ceiling is 10.
    "english": TrainConfig(
        name="english", model="laptop-llama", dataset="english", tokenizer="bpe-2048+chat",
        model_overrides={"attention": "sdpa", "dropout": 0.05, "attention_dropout": 0.0},
        batch_size=16, context_length=256, max_steps=700, lr=2e-3, eval_interval=100,
    ),
    # the draft model of speculative decoding (Chapter 11; llmbook.inference.speculative): the "english" recipe's
    # data and tokenizer, so its token ids are the target's, in a model one layer deep instead of four. On a CPU a
    # decoding step of these small models costs mostly per-layer overhead, so one layer makes a draft step about a
    # third of a target step (0.37 vs 1.15 ms measured); how often it agrees with the target is what the chapter
    # measures (about half of the greedy tokens). 2 M tokens: about 2 minutes on 2 idle cores, estimated from the
    # target's speed (measured only on a machine shared with 8 other jobs: 25 minutes at 1.4 K tokens/s, val loss
    # 4.44 nats vs the target's 3.91). lr higher than the target's, as it is shallower.
    "english-draft": TrainConfig(
        name="english-draft", model="laptop-llama", dataset="english", tokenizer="bpe-2048+chat",
        model_overrides={"attention": "sdpa", "dropout": 0.05, "attention_dropout": 0.0, "n_layers": 1},
        batch_size=16, context_length=256, max_steps=500, lr=3e-3, eval_interval=100,
    ),
    # seconds: tests and a smoke test of the command line; one thread, as tensors this small only lose by sharing
    "tiny": TrainConfig(
        name="tiny", model="gpt-tiny", tokenizer="bytes", context_length=32, batch_size=4, max_steps=20,
        eval_interval=10, eval_batches=4, log_interval=5, sample_tokens=24, threads=1,
    ),
}
