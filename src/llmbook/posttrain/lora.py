"""LoRA: train a few low-rank matrices beside a frozen model instead of the model itself.

Full fine-tuning updates every weight ``W`` (out × in) of the model and keeps
AdamW's two moments for each of them. Hu et al. (2021, "LoRA: Low-Rank
Adaptation of Large Language Models", arXiv:2106.09685) observed that the
update ``ΔW`` a fine-tuning run makes has low "intrinsic rank", and wrote it as
a product of two thin matrices:

    W' = W + ΔW,   ΔW = (alpha / r) · B A,   A: (r × in),  B: (out × r),  r << min(in, out)

so a linear layer becomes

    y = x Wᵀ + b  +  (alpha / r) · dropout(x) Aᵀ Bᵀ        (W, b frozen; only A and B train)

For a 64 × 192 projection and r = 4 that is 4·(64 + 192) = 1,024 trainable
numbers instead of 12,288. The base weights get no gradient and no optimizer
state, and what is saved after training is only the adapter (``lora_state_dict``).
After training ``merge()`` folds ``ΔW`` into ``W``, so the deployed model is a
plain ``GPT`` with no extra cost at inference (``merge_lora``).

The initialisation and the arithmetic follow Hugging Face ``peft`` (its
``tuners/lora/layer.py``, as installed: peft 0.21.2), which
tests/test_lora.py proves equal to this module on the book's GPT-2 and Llama
style models: same outputs, same gradients of A and B, same merged weights.

    model = apply_lora(GPT.from_preset("gpt-tiny"), targets=("qkv", "proj"), r=4, alpha=8)
    count_trainable(model)       # ParamCount(trainable=5632, total=126208): 4.5% of the numbers train
    ...train...
    torch.save(lora_state_dict(model), "adapter.pt")   # kilobytes, not the whole model
    plain = merge_lora(model)    # a GPT again, W' = W + (alpha / r) B A
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

# The linears of llmbook's GPT (Chapter 5) by their last name: attention's fused q/k/v projection and its
# output projection, GPT-2's MLP (fc, proj) and Llama's SwiGLU (gate, up, down). lm_head is left out: it is
# vocab × d (large), and in GPT-2 style models it is the embedding matrix itself (tied), which merging would change.
DEFAULT_TARGETS = ("qkv", "proj", "fc", "gate", "up", "down")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``base(x) + dropout(x) Aᵀ Bᵀ · alpha / r``.

    Why the two initialisations differ:

    - **B starts at zero**, so ``ΔW = B A = 0`` and the wrapped model computes
      exactly what the base model computed: fine-tuning starts from the
      pretrained function, not from a random perturbation of it.
    - **A starts random** (kaiming-uniform with a = √5, i.e. uniform in
      ±1/√in, the default init of ``nn.Linear``; peft does this, citing
      Microsoft's loralib; the paper says "random Gaussian"). If A were zero
      too, both gradients would be zero forever (g = ∂L/∂y):
      ``∂L/∂B = scale · gᵀ (x Aᵀ)`` needs A ≠ 0, and ``∂L/∂A = scale · (g B)ᵀ x``
      needs B ≠ 0. With A random, B moves on the first step and A from the second.

    ``alpha / r`` keeps the size of the update roughly independent of the rank:
    Adam moves every entry of B by about the learning rate, and each entry of
    ``B A`` sums r such products, so ``B A`` grows with r and the 1/r undoes
    that. Changing r then needs no new learning rate (Hu et al. 2021, §4.1,
    paraphrased: with Adam, tuning alpha is roughly tuning the learning rate, so
    they set alpha to the first r they try and leave it). rsLoRA (Kalajdzievski
    2023; peft's ``use_rslora``) argues for alpha / √r instead; we keep the original.

    ``merge()`` adds ``ΔW`` into the base weight and ``unmerge()`` subtracts it
    again (exact up to float rounding). While merged the forward is just
    ``base(x)``, so the adapter gets no gradient: merge after training.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        _check_hyperparameters(r, alpha, dropout)
        self.base = base
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.in_features, self.out_features = base.in_features, base.out_features
        for p in base.parameters():
            p.requires_grad_(False)  # the pretrained weight and bias stay as they are
        # adapters of a bf16/fp16 model are kept in float32 (peft's autocast_adapter_dtype, its default):
        # AdamW's small updates to a half-precision number would round away, and there are few adapter numbers
        dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        factory = {"device": base.weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))  # (r, in): projects x down
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **factory))  # (out, r): back up; zero: ΔW = 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # nn.Identity when there is no dropout, as peft does: the same result, one op fewer
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (merged or not), as peft's ``LoraLayer`` exposes it: code that asks a linear
        for its weight's device or dtype (a KV cache being allocated, say) works on an adapted model too."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def delta_weight(self) -> Tensor:
        """``ΔW = (alpha / r) · B A``, shape ``(out, in)`` like the base weight, in float32 (or float64).

        Half-precision adapters are upcast first, as peft does: the r-term sums
        of ``B A`` rounded to bf16 would lose digits; ``merge`` rounds once, into W.
        """
        A, B = self.lora_A, self.lora_B
        if A.dtype in (torch.float16, torch.bfloat16):  # only after a model.to(bfloat16) of an adapted model
            A, B = A.float(), B.float()
        return (B @ A) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in) -> (..., out)``: the frozen path plus the low-rank path (nothing extra once merged)."""
        y = self.base(x)
        if self.merged:
            return y
        x = x.to(self.lora_A.dtype)  # a bf16 model's activations meet float32 adapters (no-op otherwise)
        # x (…, in) @ Aᵀ (in, r) -> (…, r) @ Bᵀ (r, out) -> (…, out): never forms the (out, in) matrix B A
        return (y + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> LoRALinear:
        """Fold the adapter into the base weight: ``W += (alpha / r) B A``. A second call does nothing."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self) -> LoRALinear:
        """Take the adapter out again: ``W -= (alpha / r) B A`` (the base weight back, up to float rounding)."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False
        return self

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, merged={self.merged}"


def _check_hyperparameters(r: int, alpha: float, dropout: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive (the update is scaled by alpha / r), got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the module's full name, or a dotted suffix of it.

    ``"proj"`` matches ``blocks.0.attn.proj`` and ``blocks.0.mlp.proj``; ``"attn.proj"`` only the first.
    """
    return name == target or name.endswith("." + target)


def apply_lora(
    model: nn.Module, targets: Iterable[str] | None = None, r: int = 8, alpha: float = 16.0,
    dropout: float = 0.0,
) -> nn.Module:
    """Replace each ``nn.Linear`` whose name matches a target by a ``LoRALinear``; freeze everything else.

    In place, like peft's ``get_peft_model``; returns the model. Targets are
    names or dotted suffixes of names (``"qkv"``, ``"mlp.proj"``, ``"blocks.0.attn.qkv"``).
    ``None`` (the default) means every linear of attention and of the MLP
    (``DEFAULT_TARGETS`` that exist: GPT-2 has fc, Llama gate/up/down).
    Every target given must match at least one linear: a typo would otherwise
    train nothing where you meant it to (peft raises when none matches). A
    weight shared with another module (GPT-2's ``lm_head``, tied to the
    embedding) is refused, because merging would change the embedding as well.
    """
    _check_hyperparameters(r, alpha, dropout)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge_lora(model) first to add new ones")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = ", ".join(sorted({".".join(n.split(".")[-2:]) for n in linears})) or "(none)"
    if targets is None:
        targets = tuple(t for t in DEFAULT_TARGETS if any(_matches(name, t) for name in linears))
        if not targets:
            raise ValueError(f"no linear is named like {DEFAULT_TARGETS}; pass targets= from: {names}")
    else:
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        if not targets:
            raise ValueError(f"apply_lora needs at least one target name (or None for the default); linears: {names}")

    chosen = {name for name in linears for t in targets if _matches(name, t)}
    for t in targets:
        if not any(_matches(name, t) for name in linears):
            raise ValueError(
                f"LoRA target {t!r} matches no nn.Linear of this model; a target is a module name or its "
                f"dotted suffix, and the linears here are named (last parts): {names}"
            )

    # a parameter is shared when the same tensor appears under two names (tied embeddings)
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name in sorted(chosen):
        shared = owners[id(linears[name].weight)]
        if len(shared) > 1:
            raise ValueError(
                f"{name}.weight is tied to {', '.join(n for n in shared if n != name + '.weight')}; LoRA on it "
                "would change that module too when merged: leave it out of the targets"
            )

    for p in model.parameters():
        p.requires_grad_(False)  # freeze the whole base model; only the adapters created below train
    # in the model's module order, never the set's: a set of strings iterates in an order that changes with
    # Python's per-process hash seed, and each adapter's A takes the next numbers of the seeded RNG, so a set
    # order made the same recipe start from different adapters in different processes (runs did not reproduce)
    for name in (n for n in linears if n in chosen):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linears[name], r=r, alpha=alpha, dropout=dropout))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's adapters by module name, e.g. ``{"blocks.0.attn.qkv": LoRALinear(...), ...}``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter weights (``...lora_A``, ``...lora_B``), copied: what a LoRA run saves.

    The base model is already on disk (Chapter 7's checkpoint), so a fine-tune
    costs r·(in + out) numbers per adapted linear instead of a full model copy.
    """
    return {
        f"{name}.{part}": getattr(m, part).detach().clone()
        for name, m in lora_modules(model).items() for part in ("lora_A", "lora_B")
    }


def load_lora_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """Copy saved adapter weights into a model that ``apply_lora`` prepared with the same targets and rank.

    Raises one line when the keys or shapes differ (other targets, another r).
    A merged adapter is unmerged first and merged again after, so its base weight stays right.
    """
    own = lora_state_dict(model)
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(
            f"the LoRA state does not fit this model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''} (apply_lora with the same targets)"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(
                f"{key} has shape {tuple(value.shape)} but the model's is {tuple(own[key].shape)}: another rank r?"
            )
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            was_merged = m.merged
            m.unmerge()
            m.lora_A.copy_(state[f"{name}.lora_A"])
            m.lora_B.copy_(state[f"{name}.lora_B"])
            if was_merged:
                m.merge()
    return model


class ParamCount(NamedTuple):
    """Trainable and total parameters (shared tensors counted once), as peft's ``get_nb_trainable_parameters``."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} of {self.total:,} parameters ({100 * self.fraction:.2f}%)"


def count_trainable(model: nn.Module) -> ParamCount:
    """How many numbers the optimizer updates (and keeps AdamW moments for) vs how many the model has."""
    params = list(model.parameters())  # parameters() yields a tied tensor once
    return ParamCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back (peft's ``merge_and_unload``).

    In place; returns the model, now without any ``LoRALinear`` and with every
    parameter trainable again, as a freshly built model. Its outputs equal the
    adapted model's in eval mode (dropout off), up to float rounding.
    """
    for name, m in lora_modules(model).items():
        m.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
