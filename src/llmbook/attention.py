"""Attention: every token takes a weighted average of the other tokens' values.

The weights come from how well the token's query matches each key:

    attention(Q, K, V) = softmax(Q Kᵀ / sqrt(d)) V

One query q = [1, 0] and two tokens with keys [1, 0], [0, 1] and values 10
and 20: the scores q·k / sqrt(2) are [0.71, 0], the softmax makes them the
weights [0.67, 0.33], and the output is 0.67·10 + 0.33·20 = 13.3, mostly the
value whose key matches.

Conventions, as in PyTorch: q, k, v are ``(B, n_heads, T, head_dim)``, and the
functions accept any leading batch dims, ``(..., T, head_dim)``. A bool mask
is True where a query *may attend* to a key, as in ``F.scaled_dot_product_attention``
(``nn.MultiheadAttention`` uses the opposite). Chapter 5 stacks
``MultiHeadAttention`` into a GPT; Chapter 6 plugs a FlashAttention kernel in
with ``register_backend`` and checks it against ``attention_with_lse``.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmbook.rope import RotaryEmbedding

NEG_INF = float("-inf")


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """exp(x) / sum(exp(x)) along ``dim``, computed so that it cannot overflow.

    Subtracting the same number from every entry of a row leaves its softmax
    unchanged, so we subtract the row's max: the largest exponent is then
    exp(0) = 1, and logits of 1e4 are as easy as logits of 1 (naively,
    exp(1e4) = inf and inf / inf = NaN). A row that is all -inf, a query
    allowed to see nothing, gives zeros rather than NaN.

    >>> softmax(torch.tensor([1.0, 2.0, 3.0]))
    tensor([0.0900, 0.2447, 0.6652])
    >>> softmax(torch.tensor([1e4, 1e4 - 1]))
    tensor([0.7311, 0.2689])
    >>> softmax(torch.tensor([0.0, -math.inf])), softmax(torch.tensor([-math.inf, -math.inf]))
    (tensor([1., 0.]), tensor([0., 0.]))
    """
    m = x.amax(dim=dim, keepdim=True).detach()  # a constant shift: the result does not depend on it
    m = m.masked_fill(m == NEG_INF, 0.0)  # all -inf: exp(-inf - 0) = 0, where exp(-inf + inf) would be NaN
    e = torch.exp(x - m)
    total = e.sum(dim=dim, keepdim=True)
    return e / total.masked_fill(total == 0, 1.0)  # 0 / 1 = 0 for a fully masked row


def causal_mask(t_q: int, t_k: int, device: torch.device | str | None = None) -> Tensor:
    """Which keys each query may see, ``(t_q, t_k)`` bool: itself and everything before it.

    The queries are the *last* t_q of the t_k tokens (bottom-right alignment):
    query i sits at position ``t_k - t_q + i``. That is what decoding with a KV
    cache needs, where the new tokens come after the cached ones.

    >>> causal_mask(3, 3).long()
    tensor([[1, 0, 0],
            [1, 1, 0],
            [1, 1, 1]])
    >>> causal_mask(2, 4).long()  # two new tokens after two cached ones
    tensor([[1, 1, 1, 0],
            [1, 1, 1, 1]])

    ``F.scaled_dot_product_attention(is_causal=True)`` aligns top-left instead
    (``torch.ones(t_q, t_k).tril()``): for t_q < t_k its first query would see
    only key 0. The two agree when t_q == t_k.
    """
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """Repeat each key/value head ``n_rep`` times: ``(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D)``.

    Grouped-query attention shares one k/v head among a group of query heads;
    repeating the k/v heads lines them up with the query heads, kv head j
    serving query heads ``j·n_rep .. (j+1)·n_rep - 1``: heads [a, b] -> [a, a, b, b].
    """
    if n_rep == 1:
        return x
    *batch, h_kv, t, d = x.shape
    x = x[..., :, None, :, :].expand(*batch, h_kv, n_rep, t, d)  # (B, Hkv, n_rep, T, D), no copy yet
    return x.reshape(*batch, h_kv * n_rep, t, d)  # (B, Hkv * n_rep, T, D)


def _check_and_repeat(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Check that q, k, v fit together; return k and v with as many heads as q."""
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not q.dim() == k.dim() == v.dim() >= 2:
        raise ValueError(f"q, k, v must all be (..., T, head_dim); got {shapes}")
    if not all(t.is_floating_point() for t in (q, k, v)):
        dtypes = f"q {q.dtype}, k {k.dtype}, v {v.dtype}"
        raise ValueError(f"q, k, v must be floating point (use .float() or .bfloat16()); got {dtypes}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim to take dot products; got {shapes}")
    if k.shape[:-1] != v.shape[:-1] or q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"q, k, v must have the same batch dims, and k, v the same tokens; got {shapes}")
    h_q, h_kv = (q.shape[-3], k.shape[-3]) if q.dim() >= 3 else (1, 1)  # heads are dim -3
    if h_q % h_kv:
        raise ValueError(f"q has {h_q} heads, k/v {h_kv}: query heads must be a multiple of k/v heads; got {shapes}")
    return repeat_kv(k, h_q // h_kv), repeat_kv(v, h_q // h_kv)


def _masked_scores(q: Tensor, k: Tensor, mask: Tensor | None, is_causal: bool, scale: float | None) -> Tensor:
    """The scores q·k·scale ``(..., T_q, T_k)``, -inf where masked, in float32 (float64 for float64)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)  # bf16 scores lose 2-3 digits: keep float32
    scores = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale  # (..., T_q, T_k)
    t_q, t_k = scores.shape[-2:]
    if is_causal:
        scores = scores.masked_fill(~causal_mask(t_q, t_k, q.device), NEG_INF)
    if mask is not None:
        pairs = zip(mask.shape[::-1], scores.shape[::-1], strict=False)  # broadcasting aligns the last dims
        if mask.dim() > scores.dim() or any(m not in (1, n) for m, n in pairs):
            raise ValueError(f"mask {tuple(mask.shape)} cannot broadcast to the scores {tuple(scores.shape)}")
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, NEG_INF)  # True = may attend
        else:
            scores = scores + mask  # a float mask is added: 0 keeps, -inf removes, others bias
    return scores


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
    dropout_p: float = 0.0, scale: float | None = None, generator: torch.Generator | None = None,
) -> Tensor:
    """softmax(q kᵀ · scale + mask) v: ``(..., T_q, D)`` from q ``(..., T_q, D)``, k, v ``(..., T_k, D)``.

    The default scale 1/sqrt(head_dim) keeps the scores' variance near 1: a dot
    product of random vectors with unit-variance entries has variance D, and
    a softmax of large scores is nearly one-hot, with vanishing gradients.
    ``mask`` is bool (True = may attend) or float (added); ``is_causal`` adds
    the bottom-right ``causal_mask``; both can be given. k and v may have fewer
    heads than q (grouped-query attention, heads in dim -3), as with PyTorch's
    ``enable_gqa=True``. 16-bit inputs are computed in float32, rounded once at the end.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    k, v = _check_and_repeat(q, k, v)  # (..., H, T_k, D), as many heads as q
    scores = _masked_scores(q, k, mask, is_causal, scale)  # (..., T_q, T_k)
    att = softmax(scores, dim=-1)  # row i: how much query i takes from each key; sums to 1
    if dropout_p > 0.0:
        keep = torch.rand(att.shape, generator=generator, device=att.device) >= dropout_p
        att = att * keep / (1.0 - dropout_p)  # scale what is kept so the expected output is unchanged
    return (att @ v.to(att.dtype)).to(v.dtype)  # (..., T_q, D), rounded to 16 bits only at the end


def attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """The attention output and each row's log-sum-exp of the scaled scores, ``(..., T_q)`` float32.

    ``lse_i = log Σ_j exp(s_ij)`` is the log of softmax's denominator, so the
    probabilities are ``exp(s_ij - lse_i)``. FlashAttention keeps only this one
    number per row instead of the T_q x T_k probabilities and recomputes them
    in the backward pass. Scores [0, 0] give lse = log 2 = 0.693; [1e4, 1e4]
    give 1e4 + log 2; a fully masked row gives -inf (and an output of zeros).
    """
    k, v = _check_and_repeat(q, k, v)
    scores = _masked_scores(q, k, mask, is_causal, scale)  # (..., T_q, T_k)
    m = scores.amax(dim=-1, keepdim=True)  # the same shift as in softmax, for the same reason
    m = m.masked_fill(m == NEG_INF, 0.0)
    lse = m + torch.log(torch.exp(scores - m).sum(dim=-1, keepdim=True))  # (..., T_q, 1); log 0 = -inf
    out = (softmax(scores, dim=-1) @ v.to(scores.dtype)).to(v.dtype)  # (..., T_q, D)
    return out, lse.squeeze(-1).float()


def attention_weights(
    q: Tensor, k: Tensor, mask: Tensor | None = None, is_causal: bool = False, scale: float | None = None
) -> Tensor:
    """The attention probabilities ``(..., T_q, T_k)`` in q's dtype: row i is where query i looks.

    For heatmaps; ``attention_weights(q, k) @ v`` is the attention output.
    """
    k, _ = _check_and_repeat(q, k, k)
    return softmax(_masked_scores(q, k, mask, is_causal, scale), dim=-1).to(q.dtype)


# --- Backends: the same computation by hand or by a library's kernel -------------------------------------------------
class AttentionBackend(Protocol):
    """q ``(B, H, T_q, D)``, k and v ``(B, Hkv, T_k, D)``, bool mask or None, bottom-right causal."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, dropout_p: float): ...


def _sdpa_backend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, dropout_p: float):
    t_q, t_k = q.shape[-2], k.shape[-2]
    if is_causal and (mask is not None or t_q != t_k):
        # PyTorch's is_causal is top-left aligned and cannot be combined with a mask: build ours
        causal = causal_mask(t_q, t_k, q.device)
        mask = causal if mask is None else mask & causal
        is_causal = False
    gqa = q.shape[-3] != k.shape[-3]  # PyTorch repeats the k/v heads itself when asked
    return F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal=is_causal, enable_gqa=gqa)


# our scaled_dot_product_attention already takes (q, k, v, mask, is_causal, dropout_p) in this order
ATTENTION_BACKENDS: dict[str, AttentionBackend] = {"manual": scaled_dot_product_attention, "sdpa": _sdpa_backend}


# Backends that a later chapter's subpackage registers when it is imported (Chapter 6: FlashAttention). Naming
# the package here, as data, lets ``ModelConfig(attention="flash-triton")`` or a checkpoint saved with it work in
# a fresh process without an import the reader must remember; this module never imports it on its own.
DEFERRED_BACKENDS: dict[str, str] = {"flash-torch": "llmbook.kernels", "flash-triton": "llmbook.kernels"}


def register_backend(name: str, fn: AttentionBackend) -> None:
    """Make ``MultiHeadAttention(backend=name)`` call ``fn`` (Chapter 6 registers "flash-torch", "flash-triton")."""
    ATTENTION_BACKENDS[name] = fn


def backend_names() -> list[str]:
    """Every name ``get_backend`` accepts: the registered backends and the deferred ones."""
    return list(dict.fromkeys([*ATTENTION_BACKENDS, *DEFERRED_BACKENDS]))


def get_backend(name: str) -> AttentionBackend:
    """The backend called ``name``, importing the package that registers it on first use."""
    if name not in ATTENTION_BACKENDS and name in DEFERRED_BACKENDS:
        importlib.import_module(DEFERRED_BACKENDS[name])  # registers it
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of: {', '.join(backend_names())}")
    return ATTENTION_BACKENDS[name]


# --- The KV cache: remember past keys and values instead of recomputing them ------------------------------------------
@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, in buffers allocated once for ``max_len`` tokens.

    Generating token t needs the keys and values of tokens 0..t-1, which never
    change (no token sees later ones), so each layer keeps them and computes
    k, v for the new token only, writing them into the preallocated buffers.
    """

    k: Tensor  # (B, n_kv_heads, max_len, head_dim)
    v: Tensor  # (B, n_kv_heads, max_len, head_dim)
    length: int = 0  # tokens stored: the filled part is [:, :, :length]

    @classmethod
    def empty(
        cls, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> KVCache:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Memory of both buffers, filled or not."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def append(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``(B, n_kv_heads, T_new, head_dim)`` keys and values; return all stored so far."""
        t_new = k_new.shape[2]
        if self.length + t_new > self.max_len:
            raise ValueError(
                f"the KV cache holds max_len={self.max_len} tokens; it has {self.length} and {t_new} more were "
                f"requested ({self.length + t_new} in all); create a larger cache"
            )
        self.k[:, :, self.length : self.length + t_new] = k_new
        self.v[:, :, self.length : self.length + t_new] = v_new
        self.length += t_new
        return self.k[:, :, : self.length], self.v[:, :, : self.length]  # (B, n_kv_heads, length, head_dim)

    def reset(self) -> None:
        """Forget the stored tokens (the buffers are reused, not cleared)."""
        self.length = 0


def kv_cache_bytes(
    n_layers: int, n_kv_heads: int, head_dim: int, seq_len: int, batch_size: int = 1, bytes_per_value: int = 2
) -> int:
    """Bytes of a whole model's KV cache: 2 (k and v) · layers · kv heads · head_dim · tokens · batch · bytes.

    Llama 2 7B (32 layers of 32 heads of 128 dims) in bf16 holds 0.5 MiB per
    token, 2 GiB for one sequence of 4096 tokens:

    >>> kv_cache_bytes(32, 32, 128, 4096) / 2**30
    2.0
    """
    return 2 * n_layers * n_kv_heads * head_dim * seq_len * batch_size * bytes_per_value


# --- Multi-head attention, the layer ----------------------------------------------------------------------------------
class MultiHeadAttention(nn.Module):
    """Causal self-attention with n_heads query heads sharing n_kv_heads key/value heads.

    n_kv_heads == n_heads is multi-head attention (GPT-2), 1 is multi-query
    attention, anything between grouped-query attention (Llama 2 70B: 64 query
    heads, 8 k/v heads), which shrinks the KV cache. One fused matrix projects
    x to all heads' q, k, v; ``proj`` mixes the heads' outputs.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,  # None: one k/v head per query head (MHA)
        bias: bool = False,
        dropout: float = 0.0,  # on the attention probabilities, in training mode only
        causal: bool = True,
        rope: RotaryEmbedding | None = None,  # None: positions come from elsewhere (learned, GPT-2)
        backend: Literal["manual", "sdpa"] = "manual",  # or any name in ATTENTION_BACKENDS
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads <= 0 or d_model % n_heads:
            raise ValueError(
                f"d_model={d_model} is not divisible by n_heads={n_heads}: every head gets "
                "d_model // n_heads dimensions; choose n_heads that divides d_model"
            )
        if n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ValueError(
                f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}: each key/value head "
                "serves a whole group of query heads; choose n_kv_heads that divides n_heads"
            )
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        if rope is not None and rope.head_dim != self.head_dim:
            raise ValueError(f"rope was built for head_dim {rope.head_dim}, but d_model/n_heads = {self.head_dim}")
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout, self.causal, self.rope, self.backend = dropout, causal, rope, backend

    def new_cache(
        self, batch_size: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty cache for this layer, on the weights' device and dtype unless told otherwise."""
        w = self.qkv.weight
        return KVCache.empty(batch_size, self.n_kv_heads, max_len, self.head_dim, device or w.device, dtype or w.dtype)

    def forward(self, x: Tensor, cache: KVCache | None = None, mask: Tensor | None = None) -> Tensor:
        """``(B, T, C) -> (B, T, C)``. With a cache, x holds the new tokens only and sees all cached ones.

        ``mask`` (bool, True = may attend, broadcastable to ``(B, 1 or H, T, T_k)``)
        is combined with the causal mask, e.g. to hide padding.
        """
        B, T, C = x.shape  # batch, time (new tokens), channels (d_model)
        backend = get_backend(self.backend)  # a clear error for an unknown name
        nh, nkv, hs = self.n_heads, self.n_kv_heads, self.head_dim

        # project to queries, keys, values of all heads at once, then split the heads apart
        q, k, v = self.qkv(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)

        # the new tokens come after the cached ones: rotate them by their absolute positions
        start = 0 if cache is None else cache.length
        if self.rope is not None:
            q, k = self.rope(q, start), self.rope(k, start)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nkv, T_k, hs) with T_k = start + T

        dropout_p = self.dropout if self.training else 0.0
        y = backend(q, k, v, mask, self.causal, dropout_p)  # (B, nh, T, hs)
        # (B, T, nh * hs): the heads side by side; nh * hs = C, or C/p on a tensor-parallel rank (Chapter 8)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)
        return self.proj(y)
