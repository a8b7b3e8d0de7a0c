"""Weight quantization from scratch: int8 per output channel and int4 in groups, dequantized on the fly.

Decoding one token reads every weight once (Chapter 11's roofline), so a model
stored in fewer bits is smaller on disk and, where the matmul reads the small
integers directly, faster. Here the weights are *stored* as integers and
turned back into float32 right before each matmul ("weight-only" quantization:
activations stay float). That shows the size and the accuracy cost exactly;
the speed-up needs a kernel that multiplies the integers without writing the
float matrix out first, which PyTorch's plain ops do not have, so on a CPU
these layers are usually *slower* than float32 (``measure_quantized`` shows it).

Two schemes, for a weight ``w`` of shape ``(out_features, in_features)``:

    int8, symmetric, one scale per output row (per channel):
        s = max|w_row| / 127,  q = round(w / s) in -127..127,  w ≈ q·s
        8 bits per weight (+ 32 bits per row); |w - q·s| <= s/2.

    int4, asymmetric, one scale and zero point per group of ``group_size`` inputs:
        s = (max - min) / 15,  z = round(-min / s) in 0..15,  q = round(w / s) + z in 0..15,  w ≈ (q - z)·s
        two 4-bit codes per byte; s in float16 and z in uint8 cost 24 bits per group,
        so 4 + 24/32 = 4.75 bits per weight with groups of 32; |w - (q - z)·s| <= s/2.

Why these choices. Eight bits leave 255 levels: one scale per row is enough
and symmetric keeps zero exact with no zero point to store. Four bits leave
only 16 levels, so a single large weight in a row would make the step coarse
for all the others: small groups confine an outlier's damage to 31 neighbours.
And with 16 levels, symmetric quantization wastes some: -8..7 is lopsided,
-7..7 drops a level, and a group whose weights lean to one side uses only half
the range. The asymmetric grid spans exactly [min, max] of each group (widened
to include 0, so that 0 stays exact) for one byte more per group. This is
llama.cpp's Q4_1 and GPTQ's default zero-point format.

Which layers. ``quantize_model`` replaces every ``nn.Linear`` in the blocks
(attention's qkv and proj, the MLP's up/gate/down or fc/proj): most of the
weights and all of the matmuls but one. The token embedding stays float: a
lookup reads one row per token, so it costs bytes on disk but almost nothing
per decoded token. The output layer ``lm_head`` is left float by default
(``skip=("lm_head",)``), as GPTQ, bitsandbytes and llama.cpp's quantizations
(which keep it at 6 bits or more) do: its errors go straight into the logits.
Pass ``skip=()`` to quantize it too, *unless* it is tied to the embedding
(GPT-2 style, ``tied_embeddings=True``): then the head's matrix *is* the
embedding, and quantizing it as a linear would add a second copy instead of
saving bytes, so a tied head is always left float. (The book's Llama-style
models, the reference and the post-training base, have an untied head.)

A quantizer for any bit width (``quantize_per_channel``, ``quantize_groupwise``)
feeds ``error_vs_bits``: the relative error for 2, 3, 4, 6 and 8 bits, the
chapter's figure.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmbook.model import GPT

SCHEMES = ("int8", "int4")


# ---------------------------------------------------------------------- tensors


def _check_matrix(w: Tensor) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a float weight matrix (out_features, in_features), got {w.dtype} {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("the weight has inf or nan entries; quantize a finite matrix")


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")


def quantize_per_channel(w: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Symmetric, one float32 scale per row: codes int8 ``(out, in)`` in ``±(2^(b-1)-1)``, scale ``(out,)``.

    ``w ≈ codes * scale[:, None]``, each entry within ``scale/2``. A row of zeros gets scale 1 (its codes are 0).
    """
    _check_matrix(w)
    _check_bits(bits)
    qmax = 2 ** (bits - 1) - 1  # 127 for 8 bits: -128 is left out, so the grid is symmetric around 0
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / qmax  # (out,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)  # (out, in)
    return q, scale


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel: ``q`` int8 ``(out, in)`` in -127..127 and float32 ``scale`` ``(out,)``."""
    return quantize_per_channel(w, 8)


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale`` row by row: float32 ``(out, in)``. Also dequantizes ``quantize_per_channel`` at any bit width."""
    return q.float() * scale[:, None]


def _check_groups(in_features: int, group_size: int) -> None:
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features}; choose a divisor of it, "
            "or quantize the layer with Int4Linear.from_linear, which pads the last group with zeros"
        )


def quantize_groupwise(w: Tensor, bits: int = 4, group_size: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric, per group of ``group_size`` consecutive inputs: ``(codes, scale, zero)``.

    codes: uint8 ``(out, in)`` in ``0..2^bits-1``; scale: float16 ``(out, in/group_size)``;
    zero: uint8, same shape, in ``0..2^bits-1``. ``w ≈ (codes - zero) * scale`` (scale and zero
    repeated over each group), every entry within ``scale/2``. The range of a group is
    [min, max] widened to include 0, so 0 (and zero padding) is exact. The scale is stored in
    float16 and rounded *up* to it, so the grid still covers the group.
    """
    _check_matrix(w)
    _check_bits(bits)
    out_f, in_f = w.shape
    _check_groups(in_f, group_size)
    qmax = 2**bits - 1
    g = w.detach().float().reshape(out_f, in_f // group_size, group_size)  # (out, G, g)
    lo = g.amin(dim=-1).clamp(max=0.0)  # (out, G), <= 0
    hi = g.amax(dim=-1).clamp(min=0.0)  # (out, G), >= 0
    scale = (hi - lo) / qmax
    if bool((scale > torch.finfo(torch.float16).max).any()):
        raise ValueError("a group's range is too wide for a float16 scale (weights beyond ~1e6); rescale the model")
    s16 = scale.to(torch.float16)
    s16 = torch.where(s16.float() < scale, torch.nextafter(s16, torch.full_like(s16, math.inf)), s16)
    s16 = torch.where(s16 > 0, s16, torch.ones_like(s16))  # an all-zero group: any scale, codes = zero
    s = s16.float()
    zero = torch.round(-lo / s).clamp(0, qmax)  # (out, G): the code of 0.0
    codes = (torch.round(g / s[..., None]) + zero[..., None]).clamp(0, qmax)  # (out, G, g)
    return codes.reshape(out_f, in_f).to(torch.uint8), s16, zero.to(torch.uint8)


def dequantize_groupwise(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``(codes - zero) * scale`` with each group's scale and zero: float32 ``(out, in)``."""
    out_f, in_f = codes.shape
    n_groups = scale.shape[1]
    g = codes.reshape(out_f, n_groups, in_f // n_groups).float()  # (out, G, g)
    return ((g - zero.float()[..., None]) * scale.float()[..., None]).reshape(out_f, in_f)


def pack_int4(codes: Tensor) -> Tensor:
    """Two 4-bit codes per byte, along the last dim: ``(..., 2n)`` uint8 in 0..15 -> ``(..., n)`` uint8.

    Byte ``j`` holds code ``2j`` in its low nibble and ``2j+1`` in its high nibble.
    """
    if codes.dtype != torch.uint8 or codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 wants uint8 codes with an even last dim, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"4-bit codes must be in 0..15, got a {int(codes.max())}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of ``pack_int4``: ``(..., n)`` uint8 -> ``(..., 2n)`` uint8 in 0..15."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def quantize_int4(w: Tensor, group_size: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """Int4 group-wise: ``(packed, scale, zero)``, packed uint8 ``(out, in/2)``; see ``quantize_groupwise``."""
    if isinstance(group_size, int) and group_size % 2:
        raise ValueError(f"group_size must be even to pack two 4-bit codes per byte, got {group_size}")
    codes, scale, zero = quantize_groupwise(w, 4, group_size)
    return pack_int4(codes), scale, zero


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Float32 ``(out, in)`` from ``quantize_int4``'s output."""
    return dequantize_groupwise(unpack_int4(packed), scale, zero)


def quantization_error(w: Tensor, scheme: str = "int8", bits: int | None = None, group_size: int = 32) -> float:
    """Relative error ``||w - dequantize(quantize(w))|| / ||w||`` (Frobenius norms).

    ``scheme``: "int8" or "per-channel" (symmetric per row, ``bits`` default 8),
    "int4" or "group" (asymmetric per group, ``bits`` default 4).
    """
    if scheme in ("int8", "per-channel"):
        wq = dequantize_int8(*quantize_per_channel(w, 8 if bits is None else bits))
    elif scheme in ("int4", "group"):
        wq = dequantize_groupwise(*quantize_groupwise(w, 4 if bits is None else bits, group_size))
    else:
        raise ValueError(f"unknown scheme {scheme!r}; choose 'int8', 'int4', 'per-channel' or 'group'")
    w = w.detach().float()
    return float(torch.linalg.norm(w - wq) / torch.linalg.norm(w).clamp(min=1e-30))


def error_vs_bits(w: Tensor, bits: Sequence[int] = (2, 3, 4, 6, 8), group_size: int = 32) -> list[dict]:
    """For the figure "quantization error vs bits": one dict per bit width.

    ``{"bits", "per_channel", "group", "bits_per_weight_group"}``: the relative error of the
    symmetric per-row scheme and of the asymmetric group-wise one, and what a group-wise
    weight really costs with its float16 scale and uint8 zero point.
    """
    return [
        {
            "bits": b,
            "per_channel": quantization_error(w, "per-channel", b),
            "group": quantization_error(w, "group", b, group_size),
            "bits_per_weight_group": b + 24 / group_size,
        }
        for b in bits
    ]


# ---------------------------------------------------------------------- layers


class _QuantLinear(nn.Module):
    """What both quantized linears share: a float bias buffer, ``x @ w.T + b``, and ``weight`` for readers."""

    in_features: int
    out_features: int
    bias: Tensor | None

    def dequantized(self) -> Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        """The float32 matrix the layer computes with, made now (``attention.new_cache`` reads its dtype and device)."""
        return self.dequantized()

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in) -> (..., out)``: dequantize the whole matrix, then an ordinary float matmul."""
        y = x @ self.dequantized().T  # (..., out)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_QuantLinear):
    """An ``nn.Linear`` stored as int8 codes with one float32 scale per output row; no parameters, only buffers."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device)
        layer.qweight, layer.scale = quantize_int8(w)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def dequantized(self) -> Tensor:
        return dequantize_int8(self.qweight, self.scale)  # (out, in)


class Int4Linear(_QuantLinear):
    """An ``nn.Linear`` stored as packed 4-bit codes with a float16 scale and uint8 zero per group of inputs.

    When ``group_size`` does not divide ``in_features`` (the reference model's
    MLP has 344 inputs to its down projection), ``from_linear`` pads the
    matrix with zero columns up to a whole number of groups: zeros are exact
    and change no group's range (which always includes 0), so the real weights
    are quantized exactly as if the last group were just shorter. The padding
    is dropped after dequantizing.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32, device=None):
        super().__init__()
        if not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
            raise ValueError(f"group_size must be a positive even integer, got {group_size!r}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = -(-in_features // group_size)  # ceil
        padded = n_groups * group_size
        self.register_buffer("qweight", torch.zeros(out_features, padded // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=torch.float16, device=device))
        self.register_buffer("zero", torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, device=w.device)
        pad = layer.qweight.shape[1] * 2 - linear.in_features
        layer.qweight, layer.scale, layer.zero = quantize_int4(F.pad(w, (0, pad)), group_size)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def dequantized(self) -> Tensor:
        w = dequantize_int4(self.qweight, self.scale, self.zero)  # (out, padded in)
        return w[:, : self.in_features]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


# ---------------------------------------------------------------------- models


def quantize_model(model: GPT, scheme: str = "int8", group_size: int = 32, skip: Sequence[str] = ("lm_head",)) -> GPT:
    """A copy of ``model`` whose linears are ``Int8Linear`` or ``Int4Linear``; the original is untouched.

    Every ``nn.Linear`` is replaced except those whose module name matches a
    pattern of ``skip`` (fnmatch: ``"lm_head"``, ``"blocks.0.*"``) and a head
    tied to the embedding (see the module docstring for why). Embeddings and
    norms stay float. ``group_size`` is for int4 only.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
    if scheme == "int4" and (not isinstance(group_size, int) or group_size <= 0 or group_size % 2):
        raise ValueError(f"group_size must be a positive even integer (32 or 64 are usual), got {group_size!r}")
    qmodel = copy.deepcopy(model)  # deepcopy keeps a tied head tied to the copied embedding
    emb = getattr(qmodel, "tok_emb", None)
    targets = [
        (name, module) for name, module in qmodel.named_modules()
        if isinstance(module, nn.Linear)
        and not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)
        and not (emb is not None and module.weight is emb.weight)  # a tied head stays float
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = qmodel.get_submodule(parent_name) if parent_name else qmodel
        new = Int8Linear.from_linear(module) if scheme == "int8" else Int4Linear.from_linear(module, group_size)
        setattr(parent, child, new)
    return qmodel


def _unique_tensors(model: nn.Module) -> list[Tensor]:
    seen, out = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.dtype, t.numel())  # a tied matrix is one tensor, counted once
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def model_nbytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (int8, packed uint8, float16...), shared ones once."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model))


def linear_nbytes(model: nn.Module) -> int:
    """Bytes of the model's linear layers only (float or quantized), a tied head counted with the embedding instead."""
    emb = getattr(model, "tok_emb", None)
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and not (emb is not None and module.weight is emb.weight):
            total += sum(t.numel() * t.element_size() for t in _unique_tensors(module))
        elif isinstance(module, _QuantLinear):
            total += sum(t.numel() * t.element_size() for t in _unique_tensors(module))
    return total


# ---------------------------------------------------------------------- measurement


def _prefix_id(tokenizer) -> int | None:
    return getattr(tokenizer, "special_tokens", {}).get("<|endoftext|>")


def decode_tokens_per_s(model: GPT, prompt: Sequence[int], new_tokens: int = 64, vocab_size: int | None = None,
                        repeats: int = 2, threads: int | None = None) -> tuple[float, list[int]]:
    """Greedy decoding speed with the KV cache (best of ``repeats`` after a warm-up) and the tokens it wrote.

    ``threads`` sets ``torch.set_num_threads`` while timing (restored after): a
    model this small decodes no faster on two threads, and on a busy machine
    two threads that wait for each other can be several times slower than one.
    """
    from llmbook.generate import generate

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        out = generate(model, [list(prompt)], min(4, new_tokens), temperature=0.0, vocab_size=vocab_size)  # warm-up
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = generate(model, [list(prompt)], new_tokens, temperature=0.0, vocab_size=vocab_size)[0]
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return len(out) / best, out


def measure_quantized(
    model: GPT, tokenizer, texts: Sequence[str], schemes: Sequence[str] = ("fp32", "int8", "int4", "torch-int8"),
    group_size: int = 32, new_tokens: int = 64, prompt_tokens: int = 16, skip: Sequence[str] = ("lm_head",),
    repeats: int = 2, threads: int | None = None,
) -> list[dict]:
    """One table row per scheme: ``{"scheme", "bytes", "linear_bytes", "bpb", "delta_bpb", "tokens_per_s",
    "same_argmax", "max_logit_diff", "greedy_prefix", "note"}``.

    bytes: ``model_nbytes`` (torch-int8: its serialized state_dict, as its packed
    weights are neither parameters nor buffers); linear_bytes: the linears'
    share (``linear_nbytes``). bpb: ``evaluation.perplexity.bits_per_byte`` on ``texts``; delta_bpb:
    minus float32's. tokens_per_s: greedy decoding of ``new_tokens`` after the
    first ``prompt_tokens`` tokens of ``texts[0]`` (CPU, ``threads`` threads or
    this process's; best of ``repeats``). same_argmax and max_logit_diff: against float32 on the
    first context window of ``texts[0]``, both models reading the same tokens
    (``torch_quant.agreement``). greedy_prefix: how many of the generated tokens
    equal float32's before the first difference (after it the contexts differ,
    so the rest says little). A scheme that cannot run here (torch-int8 without
    torch.ao) gets None numbers and a note.
    """
    from llmbook.evaluation.perplexity import bits_per_byte
    from llmbook.inference.torch_quant import agreement, torch_dynamic_int8

    unknown = set(schemes) - {"fp32", "int8", "int4", "torch-int8"}
    if unknown:
        raise ValueError(f"unknown schemes {sorted(unknown)}; choose from fp32, int8, int4, torch-int8")
    if not texts:
        raise ValueError("measure_quantized needs at least one held-out text")
    prefix_id = _prefix_id(tokenizer)
    first = ([] if prefix_id is None else [prefix_id]) + tokenizer.encode_ordinary(texts[0])
    window = torch.tensor([first[: model.cfg.context_length]], dtype=torch.long)  # (1, T)
    prompt = first[:prompt_tokens]
    new_tokens = min(new_tokens, model.cfg.context_length - len(prompt))
    vocab = getattr(tokenizer, "vocab_size", None)
    rows, base_bpb, base_tokens = [], None, None
    for scheme in ("fp32", *[s for s in schemes if s != "fp32"]):
        note, size = None, None
        if scheme == "fp32":
            m = model
        elif scheme == "torch-int8":
            res = torch_dynamic_int8(model, skip=skip)
            m, note, size = res.model, res.note, res.nbytes
        else:
            m = quantize_model(model, scheme, group_size, skip)
        if m is None:
            rows.append({"scheme": scheme, "bytes": None, "linear_bytes": None, "bpb": None, "delta_bpb": None,
                         "tokens_per_s": None, "same_argmax": None, "max_logit_diff": None, "greedy_prefix": None,
                         "note": note})
            continue
        bpb = bits_per_byte(m, tokenizer, texts).bpb
        tps, out = decode_tokens_per_s(m, prompt, new_tokens, vocab, repeats, threads)
        if scheme == "fp32":
            base_bpb, base_tokens = bpb, out
        prefix = next((i for i, (a, b) in enumerate(zip(out, base_tokens, strict=False)) if a != b),
                      min(len(out), len(base_tokens)))
        agree = agreement(model, m, window)
        row = {
            "scheme": scheme, "bytes": size if size is not None else model_nbytes(m),
            "linear_bytes": None if scheme == "torch-int8" else linear_nbytes(m),
            "bpb": bpb, "delta_bpb": bpb - base_bpb, "tokens_per_s": tps,
            "same_argmax": agree.same_argmax, "max_logit_diff": agree.max_logit_diff, "greedy_prefix": prefix,
            "note": note,
        }
        rows.append(row)
    return rows
