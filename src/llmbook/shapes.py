"""Named model shapes: the one registry that the planner, the model and the trainer all read.

A shape is the handful of numbers that decide a decoder-only transformer's
size (``ModelShape``). Chapter 1 plans with them (``planning.PRESETS`` is this
module's ``SHAPES``), Chapter 5 builds models from them
(``model.PRESETS`` is ``SHAPES`` turned into ``ModelConfig`` objects), and
Chapter 7's recipes name them (``TrainConfig.model``). Keeping one registry
means a name means one model everywhere:

    >>> SHAPES["nanogpt-char-cpu"].d_model, SHAPES["shakespeare-char"] is SHAPES["nanogpt-char-cpu"]
    (128, True)
    >>> "shakespeare-char" in list(SHAPES)  # an alias resolves, but is not listed twice
    False

Symbols follow the book's notation table (``book/notation.md``): d = d_model,
L = n_layers, H = n_heads, H_kv = n_kv_heads, d_h = head_dim, d_ff = ff_dim,
V = vocab_size, and the context length is the largest T.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar


class DerivedSizes:
    """Sizes that follow from a shape's fields, and the rules they obey; for ModelShape and ModelConfig."""

    vocab_size: int
    context_length: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None
    d_ff: int | None

    @property
    def kv_heads(self) -> int:
        """H_kv: key/value heads; as many as query heads unless the shape asks for fewer (GQA, MQA)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ff_dim(self) -> int:
        """d_ff: the MLP's hidden width, 4·d unless given."""
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def head_dim(self) -> int:
        """d_h = d / H: each head's slice of the model width."""
        return self.d_model // self.n_heads

    def check_sizes(self, prefix: str = "") -> None:
        """The size rules every shape obeys, checked once for both classes; ``prefix`` names the shape in errors."""
        for attr in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads"):
            if getattr(self, attr) <= 0:
                raise ValueError(f"{prefix}{attr} must be positive, got {getattr(self, attr)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"{prefix}d_model={self.d_model} is not divisible by n_heads={self.n_heads}: every head gets "
                "d_model // n_heads dimensions; choose n_heads that divides d_model"
            )
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ValueError(
                f"{prefix}n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}: each key/value "
                "head serves a whole group of query heads; choose n_kv_heads that divides n_heads"
            )


@dataclass(frozen=True)
class ModelShape(DerivedSizes):
    """The hyperparameters that decide a decoder-only transformer's size.

    GPT-2 style: learned positions, LayerNorm with bias, GELU MLP with
    ``d_ff = 4·d_model``, biases everywhere, input and output embeddings tied.
    Llama style: RoPE (no position parameters), RMSNorm (weight only), SwiGLU
    MLP (three matrices), no biases, untied output head, and optionally fewer
    key/value heads than query heads (grouped-query attention).
    """

    name: str
    vocab_size: int  # V
    context_length: int  # the largest sequence length T the model accepts
    d_model: int  # d, the width of the residual stream
    n_layers: int  # L
    n_heads: int  # H
    n_kv_heads: int | None = None  # H_kv; None: one K/V head per query head (plain MHA)
    d_ff: int | None = None  # None: 4 * d_model, GPT-2's choice
    mlp: Literal["gelu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    positions: Literal["learned", "rope"] = "learned"
    bias: bool = True
    tied_embeddings: bool = True
    note: str = field(default="", compare=False, repr=False)  # where the shape comes from, for tables

    def __post_init__(self) -> None:
        self.check_sizes(f"{self.name}: ")
        if self.mlp not in ("gelu", "swiglu") or self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"{self.name}: mlp must be gelu|swiglu and norm layernorm|rmsnorm")
        if self.positions not in ("learned", "rope"):
            raise ValueError(f"{self.name}: positions must be 'learned' or 'rope'")


T = TypeVar("T")
U = TypeVar("U")


class Registry(Mapping[str, T], Generic[T]):
    """Named entries plus aliases: ``reg[alias]`` and ``alias in reg`` work, iteration lists each entry once.

    An alias is an old or shorter name kept so that code written against it
    keeps working (``"shakespeare-char"`` for ``"nanogpt-char-cpu"``).
    """

    def __init__(self, entries: Mapping[str, T], aliases: Mapping[str, str] | None = None):
        self._entries = dict(entries)
        self.aliases = dict(aliases or {})
        for alias, target in self.aliases.items():
            if target not in self._entries or alias in self._entries:
                raise ValueError(f"alias {alias!r} must name an entry and not shadow one, got -> {target!r}")

    def canonical(self, name: str) -> str:
        """The registered name behind ``name`` (itself, or what an alias stands for)."""
        name = self.aliases.get(name, name)
        if name not in self._entries:
            raise KeyError(name)
        return name

    def __getitem__(self, name: str) -> T:
        return self._entries[self.aliases.get(name, name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> str:
        """Every accepted name, for error messages: ``"gpt-tiny, ..., shakespeare-char (= nanogpt-char-cpu)"``."""
        return ", ".join([*self._entries, *(f"{a} (= {t})" for a, t in self.aliases.items())])

    def map(self, fn: Callable[[T], U]) -> Registry[U]:
        """The same names and aliases with every entry transformed: ``SHAPES.map(ModelConfig.from_shape)``."""
        return Registry({name: fn(entry) for name, entry in self._entries.items()}, self.aliases)


def _gpt2(name: str, d: int, layers: int, heads: int, vocab: int = 50257, ctx: int = 1024, **kw) -> ModelShape:
    return ModelShape(name, vocab, ctx, d, layers, heads, **kw)


def _llama(name: str, d: int, layers: int, heads: int, kv_heads: int | None, d_ff: int,
           vocab: int = 32000, ctx: int = 4096, **kw) -> ModelShape:
    return ModelShape(
        name, vocab, ctx, d, layers, heads, kv_heads, d_ff,
        mlp="swiglu", norm="rmsnorm", positions="rope", bias=False, tied_embeddings=False, **kw,
    )


SHAPES: Registry[ModelShape] = Registry(
    {
        s.name: s
        for s in [
            # the book's own small shapes: unit tests, demos, and the reference model
            _gpt2("gpt-tiny", 64, 2, 4, vocab=256, ctx=64, note="book: unit tests and quick demos"),
            _llama("llama-tiny", 64, 2, 4, 2, 172, vocab=256, ctx=128,
                   note="book: unit tests, Llama style"),
            # nanoGPT's Shakespeare character models (Karpathy, config/train_shakespeare_char.py): 65
            # characters, no biases (nanoGPT's train.py defaults to bias=False); the CPU one is the
            # README's CPU run (4 layers, width 128, context 64), the GPU one the config itself
            _gpt2("nanogpt-char-cpu", 128, 4, 4, vocab=65, ctx=64, bias=False,
                  note="nanoGPT characters, README's CPU run"),
            _gpt2("laptop-gpt", 128, 4, 4, vocab=4096, ctx=256,
                  note="book: GPT-2 twin of the reference"),
            # 344 ≈ 8/3·128, so its SwiGLU costs what laptop-gpt's GELU MLP costs (8·d² per layer)
            _llama("laptop-llama", 128, 4, 4, None, 344, vocab=4096, ctx=256,
                   note="book: the reference model"),
            _gpt2("nanogpt-char-gpu", 384, 6, 6, vocab=65, ctx=256, bias=False,
                  note="nanoGPT characters, GPU config"),
            # OpenAI's GPT-2 family (Radford et al. 2019), loadable with llmbook.hf_convert
            _gpt2("gpt2-124M", 768, 12, 12, note="GPT-2 small"),
            _gpt2("gpt2-355M", 1024, 24, 16, note="GPT-2 medium"),
            _gpt2("gpt2-774M", 1280, 36, 20, note="GPT-2 large"),
            _gpt2("gpt2-1.5B", 1600, 48, 25, note="GPT-2 XL"),
            _llama("tinyllama-1.1B", 2048, 22, 32, 4, 5632, ctx=2048, note="TinyLlama"),
            _llama("llama2-7B", 4096, 32, 32, None, 11008, note="Llama 2"),
            _llama("llama2-13B", 5120, 40, 40, None, 13824, note="Llama 2"),
            _llama("llama2-70B", 8192, 80, 64, 8, 28672, note="Llama 2"),
        ]
    },
    aliases={"shakespeare-char": "nanogpt-char-cpu"},  # the name train_config's nanoGPT recipe used first
)
