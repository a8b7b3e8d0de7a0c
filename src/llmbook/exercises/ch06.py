"""Checks for Chapter 6's exercises: merging softmax states, causal tiles, a Triton softmax, tiled attention.

The expected values come from ``llmbook.kernels`` (online softmax, tiling,
the tiled PyTorch FlashAttention) and ``llmbook.attention``, which the test
suite checks against PyTorch, so a check and the chapter never disagree. A
wrong answer is compared with the answers that the usual mistakes give
(a sum not rescaled, exp(-inf - -inf) = NaN, a causal diagonal off by one or
aligned top-left, ...) and the check names the mistake it recognises.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from llmbook import attention
from llmbook.exercises import exercise
from llmbook.exercises.tensors import close as _close
from llmbook.exercises.tensors import first_hint as _first_hint
from llmbook.exercises.tensors import random_tensor as _random
from llmbook.exercises.tensors import returned_tensor as _returned_tensor
from llmbook.kernels import tiling
from llmbook.kernels.online_softmax import merge, partial_state  # (the package's `online_softmax` is the function)

NEG_INF = float("-inf")

# ---------------------------------------------------------------------------
# 6.1 merging two online-softmax states
# ---------------------------------------------------------------------------


def _states(rows: int, n_a: int, n_b: int, D: int, seed: int, masked: str = "") -> tuple:
    """Two partial states of the same rows over two blocks of keys, and the state of both blocks at once."""
    s = _random(rows, n_a + n_b, seed=seed) * 3
    v = _random(n_a + n_b, D, seed=seed + 1)  # the keys' values, shared by all rows (queries)
    if masked == "a":  # the first block is fully masked in row 0: its state is m = -inf, l = 0
        s[0, :n_a] = NEG_INF
    if masked == "both":  # row 0 sees no key at all
        s[0] = NEG_INF
    if masked == "shift":  # the second block raises row 0's max by a lot: forgetting to rescale shows
        s[0, n_a:] += 20
    a = partial_state(s[:, :n_a], v[:n_a])
    b = partial_state(s[:, n_a:], v[n_a:])
    return a, b, partial_state(s, v)


def _as_state(got, what: str) -> tuple[Tensor, Tensor, Tensor]:
    if got is None:
        raise AssertionError("merge_states returned None; did you forget `return`?")
    if not isinstance(got, tuple | list) or len(got) != 3 or not all(isinstance(t, Tensor) for t in got):
        raise AssertionError(f"merge_states({what}) should return a tuple of three tensors (m, l, acc), "
                             f"got {type(got).__name__}: {got!r:.60}")
    return got[0], got[1], got[2]


@exercise("6.1", solution="merge_states")
def check_merge_states(merge_states):
    cases = [  # (what, rows, keys in a, keys in b, D, masked)
        ("one row, 1 + 1 keys", 1, 1, 1, 4, ""),
        ("4 rows, 3 + 5 keys", 4, 3, 5, 8, ""),
        ("3 rows, 4 + 4 keys, the second block's scores 20 higher in row 0", 3, 4, 4, 8, "shift"),
        ("3 rows, 4 + 2 keys, row 0 fully masked in the first block", 3, 4, 2, 8, "a"),
        ("3 rows, 2 + 6 keys, row 0 fully masked in both blocks", 3, 2, 6, 16, "both"),
    ]
    for seed, (what, rows, n_a, n_b, D, masked) in enumerate(cases):
        a, b, union = _states(rows, n_a, n_b, D, seed=10 * seed, masked=masked)
        given = [t.clone() for t in (*a, *b)]
        m, lsum, acc = _as_state(merge_states(a, b), what)
        if any(not torch.equal(x, y) for x, y in zip(given, (*a, *b), strict=True)):
            raise AssertionError("merge_states changed its inputs; compute new tensors instead")
        for name, got, shape in [("m", m, (rows,)), ("l", lsum, (rows,)), ("acc", acc, (rows, D))]:
            if tuple(got.shape) != shape:
                raise AssertionError(f"merge_states({what}): {name} should have shape {shape}, got "
                                     f"{tuple(got.shape)}")
        if torch.isnan(lsum).any() or torch.isnan(acc).any():
            raise AssertionError(f"merge_states({what}) returned NaN: in a row that has seen only masked keys, "
                                 "m = -inf, and exp(-inf - (-inf)) = exp(NaN); subtract a finite max there "
                                 "(torch.where(m == -inf, 0, m)): that row's l and acc are 0 and must stay 0")
        expected = merge(a, b)
        if not torch.equal(m, expected.m):
            raise AssertionError(f"merge_states({what}): m should be the larger of the two maxima, "
                                 "torch.maximum(a.m, b.m)")
        if _close(lsum, expected.l) and _close(acc, expected.acc, atol=1e-4):
            if not (_close(lsum, union.l) and _close(acc, union.acc, atol=1e-4)):  # pragma: no cover
                raise AssertionError("llmbook's merge disagrees with one pass over both blocks")
            continue
        unscaled_l = a.l + b.l
        hint = ""
        if _close(lsum, unscaled_l):
            hint = ("; l is a.l + b.l: each sum was taken relative to its own max, so multiply a.l by "
                    "exp(a.m - m) and b.l by exp(b.m - m) before adding")
        elif _close(lsum, expected.l):
            hint = ("; l is right but acc is not: acc is rescaled by the same factors as l (broadcast them "
                    "over the last dim with [..., None])")
        elif (lsum > expected.l * 1.5).any():
            hint = "; the rescaling factor is exp(old max - new max) <= 1, not exp(new max - old max)"
        err = max((lsum - expected.l).abs().max().item(), (acc - expected.acc).abs().max().item())
        raise AssertionError(f"merge_states({what}) differs from one softmax over both blocks by up to "
                             f"{err:.3g}{hint}")


# ---------------------------------------------------------------------------
# 6.2 counting the tiles a causal kernel visits
# ---------------------------------------------------------------------------


def _count_with_offset(t_q: int, t_k: int, block_q: int, block_k: int, offset: int) -> int:
    """Tiles with at least one (i, j) where j <= i + offset: the usual wrong alignments, counted."""
    visited = 0
    for qs in range(0, t_q, block_q):
        last_query = min(qs + block_q, t_q) - 1
        visited += sum(1 for ks in range(0, t_k, block_k) if ks <= last_query + offset)
    return visited


@exercise("6.2", solution="causal_tile_count")
def check_causal_tile_count(causal_tile_count):
    cases = [(1024, 1024, 128, 128), (1000, 1000, 128, 128), (512, 512, 64, 128), (256, 256, 128, 32),
             (1, 300, 16, 64), (64, 320, 16, 32), (300, 100, 32, 32), (5, 7, 1, 1)]
    for t_q, t_k, block_q, block_k in cases:
        what = f"t_q={t_q}, t_k={t_k}, block_q={block_q}, block_k={block_k}"
        got = causal_tile_count(t_q, t_k, block_q, block_k)
        if got is None:
            raise AssertionError("causal_tile_count returned None; did you forget `return`?")
        if not isinstance(got, int | torch.Tensor) or isinstance(got, bool):
            raise AssertionError(f"causal_tile_count({what}) should return an int, got {type(got).__name__}")
        got = int(got)
        expected, total = tiling.tile_counts(t_q, t_k, block_q, block_k, causal=True)
        if got == expected:
            continue
        n_q, n_k = -(-t_q // block_q), -(-t_k // block_k)
        hints = [
            (total, "that is every tile: skip the tiles whose first key comes after the tile's last query "
                    "may look"),
            (_count_with_offset(t_q, t_k, block_q, block_k, 0), "the diagonal is aligned top-left; here it is "
             "bottom-right, as in llmbook.attention.causal_mask: query i sees key j iff j <= i + t_k - t_q"),
            (_count_with_offset(t_q, t_k, block_q, block_k, t_k - t_q - 1), "off by one: query i sees key "
             "j <= i + t_k - t_q, the key at its own position included"),
            (n_q * (n_q + 1) // 2, "n(n + 1)/2 holds only for square grids of equal tiles with t_q = t_k; "
             "count tile by tile"),
            (_count_with_offset(t_q, t_k, block_q, block_k, t_k - t_q + block_k), "compare the tile's first "
             "key with the tile's last query (+ t_k - t_q), not its last key"),
        ]
        hint = next((f"; {h}" for value, h in hints if value == got), "")
        raise AssertionError(f"causal_tile_count({what}) = {got}, but a causal kernel visits {expected} of the "
                             f"{n_q} x {n_k} = {total} tiles{hint}")


# ---------------------------------------------------------------------------
# 6.4 a row softmax in Triton
# ---------------------------------------------------------------------------


def _triton_device() -> str:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    raise AssertionError("Triton needs a GPU or its interpreter: set os.environ['TRITON_INTERPRET'] = '1' "
                         "before the first `import triton` (restart the kernel if triton was imported already)")


@exercise("6.4", solution="triton_softmax")
def check_triton_softmax(triton_softmax):
    device = _triton_device()
    cases = [  # (what, rows, cols, scale)
        ("1 x 1", 1, 1, 1.0),
        ("4 x 16 (a power of two)", 4, 16, 1.0),
        ("3 x 100 (not a power of two: the block must be masked)", 3, 100, 1.0),
        ("5 x 37 with scores near 1000 (the max must be subtracted)", 5, 37, 1000.0),
    ]
    for seed, (what, rows, cols, scale) in enumerate(cases):
        x = (_random(rows, cols, seed=700 + seed) + (scale if scale > 1 else 0.0)).to(device)
        given = x.clone()
        got = _returned_tensor(triton_softmax(given), "triton_softmax", (rows, cols), f"x of shape {what}")
        if not torch.equal(given, x):
            raise AssertionError("triton_softmax changed its input; write the result to a new tensor")
        expected = torch.softmax(x.float(), dim=-1)
        if _close(got, expected, atol=1e-5):
            continue
        hint = ""
        if torch.isnan(got).any() and scale > 1:
            hint = "; NaN for large scores: exp(1000) overflows, subtract the row max (tl.max) before tl.exp"
        elif torch.isnan(got).any():
            hint = ("; NaN: load the columns past the row's end with other=-inf (exp(-inf) = 0 adds nothing "
                    "to the sum) and store only the real ones: mask = cols < n_cols")
        elif _close(got, torch.exp(x - x.amax(-1, keepdim=True)), atol=1e-5):
            hint = "; divide by the row sum (tl.sum) so each row adds up to 1"
        err = (got - expected).abs().max().item()
        raise AssertionError(f"triton_softmax on {what} differs from torch.softmax by up to {err:.3g}{hint}")


# ---------------------------------------------------------------------------
# 6.8 tiled FlashAttention forward, by the reader
# ---------------------------------------------------------------------------

_FLASH_CASES = [  # (what, B, H, H_kv, T_q, T_k, D, causal, block_q, block_k)
    ("one query, one key", 1, 1, 1, 1, 1, 16, False, 16, 16),
    ("T=17, causal, 8-wide tiles (ragged)", 1, 2, 2, 17, 17, 16, True, 8, 8),
    ("T=100, not causal, GQA 8:2", 1, 8, 2, 100, 100, 16, False, 32, 16),
    ("T=37, causal, GQA 4:2, B=2", 2, 4, 2, 37, 37, 32, True, 16, 8),
    ("5 queries after 16 cached keys, causal, MQA 4:1", 1, 4, 1, 5, 21, 16, True, 4, 8),
    ("1 query (decoding) after 29 keys, causal", 1, 2, 2, 1, 30, 64, True, 16, 16),
    ("20 queries, 15 keys, causal: the first 5 queries see no key", 1, 2, 2, 20, 15, 16, True, 8, 8),
]


def _reference(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> tuple[Tensor, Tensor]:
    from llmbook.kernels import flash_torch  # the library's tiled forward (Chapter 6's own)

    return flash_torch.flash_forward_torch(q, k, v, causal=causal, scale=scale)


def _with_mask(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float | None) -> tuple[Tensor, Tensor]:
    return attention.attention_with_lse(q, k, v, mask=keep, scale=scale)


def _offset_mask(t_q: int, t_k: int, offset: int) -> Tensor:
    i = torch.arange(t_q)[:, None]
    j = torch.arange(t_k)[None, :]
    return j <= i + offset


def _no_rescale(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, block_k: int) -> Tensor:
    """Key tiles merged without rescaling acc when the max grows: the classic mistake."""
    k = attention.repeat_kv(k, q.shape[1] // k.shape[1])
    v = attention.repeat_kv(v, q.shape[1] // v.shape[1])
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if keep is not None:
        s = s.masked_fill(~keep, NEG_INF)
    m = torch.full(s.shape[:-1], NEG_INF)
    lsum = torch.zeros(s.shape[:-1])
    acc = torch.zeros(*s.shape[:-1], v.shape[-1])
    for ks in range(0, s.shape[-1], block_k):
        sb = s[..., ks : ks + block_k]
        m_new = torch.maximum(m, sb.amax(-1))
        m_safe = m_new.masked_fill(m_new == NEG_INF, 0.0)
        p = torch.exp(sb - m_safe[..., None])
        lsum = lsum * torch.exp(m - m_safe) + p.sum(-1)  # l rescaled ...
        acc = acc + p @ v[..., ks : ks + block_k, :]  # ... acc not
        m = m_new
    return acc / lsum.masked_fill(lsum == 0, 1.0)[..., None]


def _flash_hint(out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, causal: bool, block_k: int) -> str:
    t_q, t_k = q.shape[-2], k.shape[-2]
    offset = t_k - t_q
    causal_keep = _offset_mask(t_q, t_k, offset) if causal else None
    if torch.isnan(out).any() or torch.isnan(lse).any():
        return ("; NaN: a row that has seen only masked keys has m = -inf, and exp(-inf - (-inf)) is NaN. Use a "
                "finite max where m is -inf (torch.where(m == -inf, 0, m)) and divide by l only where l > 0")
    group = q.shape[1] // k.shape[1]
    candidates = []
    if causal:
        candidates += [
            (_with_mask(q, k, v, None, None)[0], "every query sees every key: with causal=True mask the keys "
             "j > i + (t_k - t_q) with -inf"),
            (_with_mask(q, k, v, _offset_mask(t_q, t_k, 0), None)[0], "the causal diagonal is aligned "
             "top-left; here query i sees key j iff j <= i + (t_k - t_q), bottom-right as in causal_mask"),
            (_with_mask(q, k, v, _offset_mask(t_q, t_k, offset - 1), None)[0], "off by one: query i sees key "
             "j <= i + (t_k - t_q), the key at its own position included (j <= i, not j < i, when t_q = t_k)"),
            (_with_mask(q, k, v, _offset_mask(t_q, t_k, offset + 1), None)[0], "off by one: query i sees key "
             "j <= i + (t_k - t_q), and not the key after it"),
        ]
    candidates += [
        (_with_mask(q, k, v, causal_keep, 1.0)[0], "the scores are not scaled: multiply q kᵀ by "
         "scale = 1/sqrt(D) when scale is None"),
        (_with_mask(q, k, v, causal_keep, 1 / q.shape[-1])[0], "the scale is 1/sqrt(D), not 1/D"),
        (_no_rescale(q, k, v, causal_keep, block_k), "acc is not rescaled: when a key tile raises the max "
         "from m to m_new, multiply acc (like l) by exp(m - m_new) before adding the tile's p @ v"),
    ]
    if group > 1:
        wrong = torch.arange(q.shape[1]) % k.shape[1]  # head h reads kv head h % H_kv: the wrong grouping
        candidates.append((_with_mask(q, k[:, wrong], v[:, wrong], causal_keep, None)[0],
                           f"query head h uses kv head h // {group} (h // (H // H_kv)), not h % H_kv"))
    return _first_hint(out, candidates)


class _LargestTensor(TorchDispatchMode):
    """Remembers the most elements any single operation produced while it was active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, tuple | list) else [result]:
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return result


def _flash_outputs(flash_forward, q, k, v, causal, block_q, block_k, what):
    got = flash_forward(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    if got is None:
        raise AssertionError("flash_forward returned None; did you forget `return out, lse`?")
    if not isinstance(got, tuple | list) or len(got) != 2:
        raise AssertionError(f"flash_forward({what}) should return a tuple (out, lse), got "
                             f"{type(got).__name__}: {got!r:.60}")
    B, H, t_q, D = q.shape
    out = _returned_tensor(got[0], "flash_forward (out)", (B, H, t_q, D), what)
    lse = _returned_tensor(got[1], "flash_forward (lse)", (B, H, t_q), what)
    return out, lse


@exercise("6.8", solution="flash_forward")
def check_flash_forward(flash_forward):
    for seed, (what, B, H, H_kv, t_q, t_k, D, causal, block_q, block_k) in enumerate(_FLASH_CASES):
        q = _random(B, H, t_q, D, seed=800 + 3 * seed)
        k = _random(B, H_kv, t_k, D, seed=801 + 3 * seed)
        v = _random(B, H_kv, t_k, D, seed=802 + 3 * seed)
        q[..., :1, :] *= 4  # a few large scores, so a max that grows from tile to tile is the rule
        given = [t.clone() for t in (q, k, v)]
        what = f"{what}: q {tuple(q.shape)}, k {tuple(k.shape)}, block_q={block_q}, block_k={block_k}"
        out, lse = _flash_outputs(flash_forward, *given, causal, block_q, block_k, what)
        if any(not torch.equal(a, b) for a, b in zip(given, (q, k, v), strict=True)):
            raise AssertionError("flash_forward changed q, k or v; compute new tensors instead")
        expected_out, expected_lse = _reference(q, k, v, causal, None)
        if not _close(out, expected_out, atol=1e-4):
            err = (out - expected_out).abs().nan_to_num(math.inf).max().item()
            raise AssertionError(f"flash_forward({what}): out differs from llmbook.kernels.flash_torch by up to "
                                 f"{err:.3g}{_flash_hint(out, lse, q, k, v, causal, block_k)}")
        seen = expected_lse > NEG_INF  # rows that see at least one key
        if not torch.equal(lse > NEG_INF, seen):
            raise AssertionError(f"flash_forward({what}): lse must be -inf exactly in the rows that see no key "
                                 "(log of an empty sum), and finite elsewhere")
        if not _close(lse[seen], expected_lse[seen], atol=1e-4):
            unscaled = _with_mask(q, k, v, _offset_mask(t_q, t_k, t_k - t_q) if causal else None, 1.0)[1]
            hint = ""
            if _close(lse[seen], (expected_lse / math.log(2))[seen], atol=1e-4):
                hint = "; that is log2: lse is the natural log, m + torch.log(l)"
            elif _close(lse[seen], unscaled[seen], atol=1e-4):
                hint = "; the scores are not scaled: multiply q kᵀ by scale = 1/sqrt(D) when scale is None"
            err = (lse[seen] - expected_lse[seen]).abs().max().item()
            raise AssertionError(f"flash_forward({what}): lse differs by up to {err:.3g}; it is each row's "
                                 f"log Σ_j exp(s_ij) = m + log(l) after the last tile{hint}")
        if t_q == t_k and not causal:
            sdpa = F.scaled_dot_product_attention(q, k, v, enable_gqa=H != H_kv)
            assert _close(out, sdpa, atol=1e-4), "flash_forward agrees with llmbook but not with PyTorch's SDPA"

    # causal skipping and no T x T: count the FLOPs and the largest tensor on a grid of 4 x 4 tiles
    B, H, T, D, block = 1, 2, 128, 16, 32
    q, k, v = (_random(B, H, T, D, seed=900 + i) for i in range(3))
    flops, largest = {}, {}
    for causal in (False, True):
        with FlopCounterMode(display=False) as counter, _LargestTensor() as sizes:
            flash_forward(q, k, v, causal=causal, block_q=block, block_k=block)
        flops[causal], largest[causal] = counter.get_total_flops(), sizes.largest
    visited, total = tiling.tile_counts(T, T, block, block, causal=True)
    if flops[True] > flops[False] * (visited / total + 0.05):
        raise AssertionError(f"flash_forward with causal=True did {flops[True] / flops[False]:.0%} of the "
                             f"non-causal FLOPs; skipping the tiles above the diagonal leaves {visited} of "
                             f"{total} tiles ({visited / total:.0%}). For each query tile, stop the key loop "
                             "after the last key its last query may see")
    if max(largest.values()) >= B * H * T * T:
        raise AssertionError(f"flash_forward created a tensor of {max(largest.values())} elements, as large as "
                             f"the {T} x {T} score matrix of all {B * H} heads: work one tile at a time")
