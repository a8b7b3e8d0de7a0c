"""PyTorch's own CPU quantization of the same model, to compare with ours (``llmbook.inference.quantize``).

``torch.ao.quantization.quantize_dynamic`` swaps each chosen ``nn.Linear``
for a ``DynamicQuantizedLinear``: int8 weights (here one scale per output
channel, as our ``Int8Linear``), and *activations quantized too*, on the fly,
per tensor, so the matmul runs on integers in FBGEMM/oneDNN kernels. That is
the speed our dequantize-then-float-matmul layers cannot have, at the cost of
a second rounding (of the activations), which is why its logits differ from
ours a little.

With torch 2.13 it still works on CPU but warns that ``torch.ao.quantization``
is deprecated in favour of ``torchao`` (not installed here); if a later torch
removes it, ``torch_dynamic_int8`` returns ``model=None`` and a note saying
why instead of failing.

One repair: ``MultiHeadAttention.new_cache`` reads ``qkv.weight`` for the
cache's dtype and device, and a dynamic quantized linear's ``weight`` is a
method returning int8 weights, so each block's attention gets a ``new_cache``
that makes a float32 cache on the CPU.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmbook.model import GPT


@dataclass
class TorchQuant:
    """``torch_dynamic_int8``'s result: the quantized copy (None where it could not be made), its size, and why not."""

    model: nn.Module | None
    nbytes: int | None  # serialized state_dict
    note: str | None  # None when it worked


def serialized_nbytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size on disk (packed quantized weights included)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _float_cache(attn: nn.Module, batch_size: int, max_len: int, device=None, dtype=None):
    from llmbook.attention import KVCache

    return KVCache.empty(batch_size, attn.n_kv_heads, max_len, attn.head_dim, device or "cpu", dtype or torch.float32)


def torch_dynamic_int8(model: GPT, per_channel: bool = True, skip: Sequence[str] = ("lm_head",)) -> TorchQuant:
    """A copy of ``model`` quantized by ``torch.ao.quantization.quantize_dynamic`` (int8 weights and activations).

    The same linears as ``quantize_model``: every ``nn.Linear`` whose name
    matches no pattern of ``skip`` and that is not a head tied to the
    embedding. CPU only; the original model is untouched.
    """
    try:
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as exc:  # a torch without torch.ao.quantization
        note = f"skipped: torch {torch.__version__} has no torch.ao dynamic quantization ({exc})"
        return TorchQuant(None, None, note)
    if next(model.parameters()).device.type != "cpu":
        return TorchQuant(None, None, "skipped: torch.ao dynamic quantization runs on the CPU only; move the model")
    emb = getattr(model, "tok_emb", None)
    names = [
        name for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(fnmatch.fnmatchcase(name, p) for p in skip)
        and not (emb is not None and m.weight is emb.weight)
    ]
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "use torchao instead": known, and not installed
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
            qmodel = quantize_dynamic(copy.deepcopy(model).eval(), {n: qconfig for n in names}, dtype=torch.qint8)
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        note = f"skipped: torch.ao quantize_dynamic failed with torch {torch.__version__}: {exc}"
        return TorchQuant(None, None, note)
    for module in qmodel.modules():
        if hasattr(module, "new_cache") and hasattr(module, "n_kv_heads"):
            module.new_cache = functools.partial(_float_cache, module)
    return TorchQuant(qmodel, serialized_nbytes(qmodel), None)


@dataclass
class Agreement:
    """How close two models' outputs are on the same tokens."""

    max_logit_diff: float  # the largest |difference| over every position and vocabulary entry
    same_argmax: float  # the fraction of positions whose greedy next token is the same


@torch.no_grad()
def agreement(a: nn.Module, b: nn.Module, ids: Tensor) -> Agreement:
    """Compare two models on the same input ``ids`` ``(B, T)`` (teacher forcing: both see the same context)."""
    la, _ = a(ids)  # (B, T, V)
    lb, _ = b(ids)
    return Agreement(float((la - lb).abs().max()), float((la.argmax(-1) == lb.argmax(-1)).float().mean()))
