"""Checks for Chapter 11's exercises: length-normalized scoring, int8 quantization, the speculative rule, a decode loop.

The references are written out here, so the checks work whatever state the
chapter's own modules are in: lm-eval's multiple-choice decision
(``ConfigurableTask.process_results``: ``np.argmax`` of the log-likelihoods,
and of the log-likelihoods divided by each choice's length in characters;
``tests/test_exercises_ch11.py`` proves the reference equal to lm-eval's own
code), symmetric per-channel int8 (the codes ``torch.quantize_per_channel``
gives with the same scales, also proven in the tests), the speculative
sampling rule of Leviathan et al. (2023) and Chen et al. (2023), and
``llmbook.generate.generate`` at temperature 0 for the decode loop.

A wrong answer is compared with what the usual mistakes compute (argmin,
tokens instead of characters, a per-tensor scale, truncation instead of
rounding, the ratio upside down, no KV cache, ...) and the check names the
mistake. Everything runs on tiny inputs and a ~100k-parameter model: seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from llmbook.exercises import exercise
from llmbook.generate import generate
from llmbook.model import GPT, ModelConfig

# ---------------------------------------------------------------------------
# 11.1 length-normalized multiple-choice scoring
# ---------------------------------------------------------------------------


def reference_mc(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """lm-eval's ``pred`` and ``pred_norm`` for one multiple-choice item.

    ``pred = argmax(lls)``, ``pred_norm = argmax(lls / len(choice))`` with the
    length in characters of the choice *without* the delimiter lm-eval puts in
    front of it; ``np.argmax`` takes the first of equal scores.
    """
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    lengths = np.array([float(len(c)) for c in choices])
    return int(np.argmax(lls)), int(np.argmax(lls / lengths))


def _mc_mistake(lls: np.ndarray, choices: Sequence[str], tokens: Sequence[Sequence[int]], mistake: str
                ) -> tuple[int, int]:
    chars = np.array([float(len(c)) for c in choices])
    pred = int(np.argmax(lls))
    if mistake == "argmin":
        return int(np.argmin(lls)), int(np.argmin(lls / chars))
    if mistake == "no_norm":
        return pred, pred
    if mistake == "tokens":
        return pred, int(np.argmax(lls / np.array([float(len(t)) for t in tokens])))
    if mistake == "mean_prob":
        return pred, int(np.argmax(np.exp(lls) / chars))
    if mistake == "delimiter":
        return pred, int(np.argmax(lls / (chars + 1)))
    if mistake == "bytes":
        return pred, int(np.argmax(lls / np.array([float(len(c.encode("utf-8"))) for c in choices])))
    if mistake == "ties_last":
        last = len(lls) - 1
        return last - int(np.argmax(lls[::-1])), last - int(np.argmax((lls / chars)[::-1]))
    raise ValueError(f"unknown mistake {mistake!r}")


MC_MISTAKES = {
    "argmin": "argmin instead of argmax: the log-likelihoods are negative, and the most likely choice has the "
              "largest (closest to 0)",
    "no_norm": "pred_norm equals pred everywhere: the normalization is missing; divide each log-likelihood by "
               "len(choice) before the argmax",
    "tokens": "normalized by the number of tokens: lm-eval's acc_norm divides by the choice's length in "
              "characters, len(choice), which does not depend on the tokenizer",
    "mean_prob": "normalized the probability exp(ll) / len instead of the log-likelihood ll / len",
    "delimiter": "divided by len(' ' + choice): lm-eval counts the characters of the choice alone, without the "
                 "delimiter it puts in front of it",
    "bytes": "divided by the length in UTF-8 bytes: that is lm-eval's acc_bytes; acc_norm uses characters, len(choice)",
    "ties_last": "on equal scores you pick the last choice: np.argmax (and lm-eval) picks the first",
}

_WORDS = ("the", "a", "cat", "sat", "on", "mat", "king", "Lear", "storm", "heath", "fool", "daughters", "crown",
          "café", "naïve", "façade", "über", "—", "déjà", "vu", "Æthelred", "smörgåsbord", "élan", "no", "yes")


@dataclass(frozen=True)
class MCCase:
    loglikelihoods: tuple[float, ...]
    choices: tuple[str, ...]
    tokens: tuple[tuple[int, ...], ...]  # the ids of each continuation (delimiter + choice)


def mc_cases(n: int = 60, seed: int = 11) -> list[MCCase]:
    """Items with choices of very different lengths (some not ASCII), their log-likelihoods and token ids.

    The first item has two choices with equal scores (a tie); the rest are
    random: a choice's log-likelihood grows with its length, as a model's does,
    and its token count is unrelated to its characters (tokenizers differ).
    """
    rng = np.random.default_rng(seed)
    cases = [MCCase((-6.0, -6.0, -9.5), ("yes", "no!", "maybe"), ((1, 2), (3,), (4, 5, 6)))]
    for _ in range(n - 1):
        k = int(rng.integers(2, 6))
        choices = tuple(" ".join(rng.choice(_WORDS, size=int(rng.integers(1, 6)))) for _ in range(k))
        lls = tuple(float(-len(c) * rng.uniform(0.3, 1.6) - rng.uniform(0, 3)) for c in choices)
        tokens = tuple(tuple(int(t) for t in rng.integers(0, 1000, size=int(rng.integers(1, 9)))) for _ in choices)
        cases.append(MCCase(lls, choices, tokens))
    return cases


def _as_pair(result, what: str) -> tuple[int, int]:
    if result is None:
        raise AssertionError(f"{what} returned None; did you forget `return (pred, pred_norm)`?")
    try:
        pred, pred_norm = result
        return int(pred), int(pred_norm)
    except (TypeError, ValueError):
        raise AssertionError(f"{what} returned {result!r}: return two ints, (pred, pred_norm)") from None


@exercise("11.1", solution="mc_predictions")
def check_mc_predictions(mc_predictions):
    cases = mc_cases()
    got = []
    for case in cases:
        what = f"mc_predictions({list(case.loglikelihoods)}, {list(case.choices)}, ...)"
        got.append(_as_pair(mc_predictions(list(case.loglikelihoods), list(case.choices),
                                           [list(t) for t in case.tokens]), what))
    want = [reference_mc(c.loglikelihoods, c.choices) for c in cases]
    if got == want:
        return
    for mistake, hint in MC_MISTAKES.items():
        if got == [_mc_mistake(np.array(c.loglikelihoods), c.choices, c.tokens, mistake) for c in cases]:
            raise AssertionError(f"mc_predictions: {hint}")
    i = next(i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w)
    c = cases[i]
    raise AssertionError(f"mc_predictions({list(c.loglikelihoods)}, {list(c.choices)}) = {got[i]}, lm-eval "
                         f"gives (pred, pred_norm) = {want[i]}")


# ---------------------------------------------------------------------------
# 11.2 int8 per-channel symmetric quantization
# ---------------------------------------------------------------------------


def reference_scales(w: Tensor) -> Tensor:
    """``(out, in) -> (out, 1)``: each output row's largest magnitude over 127; a row of zeros gets scale 1."""
    absmax = w.abs().amax(dim=1, keepdim=True)  # (out, 1)
    return torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))


def reference_quantize(w: Tensor, scales: Tensor) -> Tensor:
    """int8 codes ``round(w / scale)`` clamped to -127..127 (symmetric: no -128, no zero point)."""
    return torch.clamp(torch.round(w / scales), -127, 127).to(torch.int8)


def reference_dequantize(q: Tensor, scales: Tensor) -> Tensor:
    return q.to(torch.float32) * scales


def int8_weight(seed: int = 0) -> Tensor:
    """A ``(6, 10)`` weight: rows of very different magnitudes, a row of zeros, some exact zeros, an outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 10, generator=g) * torch.tensor([[0.02], [0.5], [3.0], [0.0], [0.1], [1.0]])
    w[0, 3] = 0.0
    w[4, 7] = 2.5  # an outlier: it sets row 4's scale
    w[5] = w[5] + 0.8  # mostly positive: max - min differs from 2 * absmax
    return w


def _scale_mistakes(w: Tensor) -> dict[str, Tensor]:
    absmax = w.abs().amax(dim=1, keepdim=True)
    return {
        "per_tensor": w.abs().max() / 127 * torch.ones_like(absmax),
        "max_not_over_127": absmax,
        "asymmetric": (w.amax(dim=1, keepdim=True) - w.amin(dim=1, keepdim=True)) / 255,
        "over_128": absmax / 128,
        "over_255": absmax / 255,
    }


SCALE_HINTS = {
    "per_tensor": "one scale for the whole tensor: per-channel means one scale per output row, "
                  "w.abs().amax(dim=1, keepdim=True) / 127",
    "max_not_over_127": "the scale is the row's max |w|: divide it by 127, so the largest weight maps to code ±127 "
                        "(with scale = max every code is -1, 0 or 1)",
    "asymmetric": "the scale (max - min) / 255 is asymmetric quantization's (it needs a zero point); symmetric "
                  "uses max |w| / 127 and zero point 0",
    "over_128": "divided by 128: symmetric int8 uses -127..127, so max |w| / 127",
    "over_255": "divided by 255: symmetric int8 codes span -127..127, so max |w| / 127",
}


def _quantize_mistakes(w: Tensor, s: Tensor) -> dict[str, Tensor]:
    x = w / s
    return {
        "truncation": torch.clamp(torch.trunc(x), -127, 127).to(torch.int8),
        "floor": torch.clamp(torch.floor(x), -127, 127).to(torch.int8),
        "no_clamp": torch.round(x).to(torch.int32).to(torch.int8),  # wraps around: 200 -> -56
        "clamp_128": torch.clamp(torch.round(x), -128, 127).to(torch.int8),
    }


QUANTIZE_HINTS = {
    "truncation": "the codes are truncated towards zero (.to(torch.int8) on w / scale): round first, "
                  "torch.round(w / scale), or every weight loses up to a whole step instead of half",
    "floor": "the codes are rounded down (floor): use torch.round, the nearest code",
    "no_clamp": "no clamping: with a scale smaller than max |w| / 127 some codes exceed 127 and wrap around when "
                "cast to int8 (200 becomes -56); clamp to -127..127 before the cast",
    "clamp_128": "clamped to -128..127: symmetric quantization uses -127..127, so that -x is representable "
                 "whenever x is",
}


@exercise("11.2", solution="quantize_int8")
def check_int8(int8_scales, quantize_int8, dequantize_int8):
    w = int8_weight()
    out, inp = w.shape
    s = int8_scales(w.clone())
    if s is None:
        raise AssertionError("int8_scales returned None; did you forget `return`?")
    if not isinstance(s, Tensor):
        raise AssertionError(f"int8_scales returned {type(s).__name__}: return a tensor of shape ({out}, 1)")
    if s.numel() == 1:
        raise AssertionError(f"int8_scales: {SCALE_HINTS['per_tensor']}")
    if s.numel() == inp and s.shape != (out, 1):
        raise AssertionError(f"int8_scales of a ({out}, {inp}) weight has shape {tuple(s.shape)}: one scale per "
                             "input channel (the max over dim=0); quantize per *output* channel, one scale per "
                             "row of nn.Linear's (out, in) weight: amax(dim=1, keepdim=True)")
    if s.shape != (out, 1):
        raise AssertionError(f"int8_scales of a ({out}, {inp}) weight has shape {tuple(s.shape)}: return ({out}, 1), "
                             "one scale per output row, so that w / scale broadcasts over each row")
    want = reference_scales(w)
    nonzero = w.abs().amax(dim=1) > 0
    if not torch.allclose(s[nonzero].double(), want[nonzero].double(), rtol=1e-6, atol=0):
        for mistake, wrong in _scale_mistakes(w).items():
            if torch.allclose(s[nonzero].double(), wrong[nonzero].double(), rtol=1e-6, atol=0):
                raise AssertionError(f"int8_scales: {SCALE_HINTS[mistake]}")
        raise AssertionError(f"int8_scales = {s.flatten().tolist()}, expected max |w| / 127 per row = "
                             f"{want.flatten().tolist()}")
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise AssertionError(f"int8_scales: {s.flatten().tolist()} has a scale that is 0, negative or not finite; "
                             "a row of zeros (row 3) has max |w| = 0: give it a positive scale (e.g. 1), its codes "
                             "are 0 whatever the scale")

    # quantize with the right scales, and with half of them (some |w| / scale up to 254: must be clamped)
    for scales, label in ((want, "max |w| / 127"), (want / 2, "half of max |w| / 127, so some codes need clamping")):
        q = quantize_int8(w.clone(), scales.clone())
        what = f"quantize_int8(w, scales = {label})"
        if q is None:
            raise AssertionError(f"{what} returned None; did you forget `return`?")
        if not isinstance(q, Tensor) or q.shape != w.shape:
            raise AssertionError(f"{what} should return a tensor of w's shape {tuple(w.shape)}, got "
                                 f"{type(q).__name__} {tuple(getattr(q, 'shape', ()))}")
        if q.dtype != torch.int8:
            if not q.dtype.is_floating_point and (int(q.max()) > 127 or int(q.min()) < -128):
                raise AssertionError(f"{what}: {QUANTIZE_HINTS['no_clamp']}")
            raise AssertionError(f"{what} has dtype {q.dtype}: return int8 codes (.to(torch.int8)), one byte each")
        if int(q[w == 0].int().abs().max()) != 0:
            raise AssertionError(f"{what}: a weight of exactly 0.0 got code {int(q[w == 0].int().abs().max())}: "
                                 "symmetric quantization has no zero point, 0.0 is code 0 (an asymmetric scheme "
                                 "adds one)")
        ref = reference_quantize(w, scales)
        if torch.equal(q, ref):
            continue
        for mistake, wrong in _quantize_mistakes(w, scales).items():
            if torch.equal(q, wrong):
                raise AssertionError(f"{what}: {QUANTIZE_HINTS[mistake]}")
        diff = (q.int() - ref.int()).abs()
        i, j = divmod(int(diff.argmax()), w.shape[1])
        raise AssertionError(f"{what}: code {int(q[i, j])} for w[{i}, {j}] = {w[i, j].item():.6g} (scale "
                             f"{scales[i, 0].item():.6g}), expected clamp(round(w / scale), -127, 127) = "
                             f"{int(ref[i, j])}")

    q = reference_quantize(w, want)
    d = dequantize_int8(q.clone(), want.clone())
    if d is None:
        raise AssertionError("dequantize_int8 returned None; did you forget `return`?")
    if not isinstance(d, Tensor) or d.shape != w.shape or not d.dtype.is_floating_point:
        raise AssertionError(f"dequantize_int8 should return a float tensor of shape {tuple(w.shape)}, got "
                             f"{type(d).__name__} {getattr(d, 'dtype', '')} {tuple(getattr(d, 'shape', ()))}")
    expected = reference_dequantize(q, want)
    if not torch.allclose(d.double(), expected.double(), rtol=1e-6, atol=1e-12):
        if torch.allclose(d.double(), (q.double() / want.double()), rtol=1e-6):
            raise AssertionError("dequantize_int8 divides by the scale: quantizing divided, so dequantizing "
                                 "multiplies, q * scale")
        raise AssertionError(f"dequantize_int8: max difference {(d.double() - expected.double()).abs().max():.3g} "
                             "from q * scale")
    error = (w - d).abs()
    if bool((error > want / 2 + 1e-7).any()):
        raise AssertionError("round trip: some |w - dequantize(quantize(w))| exceeds half a step (scale / 2)")


# ---------------------------------------------------------------------------
# 11.3 the speculative acceptance rule
# ---------------------------------------------------------------------------


def inverse_cdf(d: Tensor, u: float) -> int:
    """The id drawn from distribution ``d`` by the uniform ``u``: the first i with d[0] + ... + d[i] > u."""
    return min(int(torch.searchsorted(d.cumsum(0), torch.tensor([u], dtype=d.dtype), right=True)[0]), len(d) - 1)


def reference_accept(p: Tensor, q: Tensor, x: int, r: float, u: float) -> tuple[bool, int]:
    """Accept the draft x when r < min(1, p[x] / q[x]); else draw from norm(max(p - q, 0)) with u."""
    if r < min(1.0, float(p[x] / q[x])):
        return True, x
    residual = torch.clamp(p - q, min=0)
    return False, inverse_cdf(residual / residual.sum(), u)


def spec_cases() -> list[tuple[Tensor, Tensor]]:
    """(p, q) pairs: hand-made (one token the target never picks), random, and p = q (every draft accepted)."""
    p = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.10, 0.00], dtype=torch.float64)
    q = torch.tensor([0.10, 0.30, 0.05, 0.25, 0.20, 0.10], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    p2 = torch.rand(8, generator=g).double() ** 2
    q2 = torch.rand(8, generator=g).double() ** 2
    p3 = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    return [(p, q), (p2 / p2.sum(), q2 / q2.sum()), (p3, p3.clone())]


GRID = 400  # uniforms (i + 0.5) / GRID: a fraction of the grid is within 1 / GRID of a probability


@dataclass
class RuleProfile:
    """What a rule does with draft token x: its acceptance probability, and the distribution it resamples from."""

    accept: list[float]  # per x (NaN where q[x] = 0)
    resample: list[Tensor | None]  # per x: distribution of the token when rejected (None if never rejected)


def _grid() -> list[float]:
    return [(i + 0.5) / GRID for i in range(GRID)]


def _profile(rule: Callable, p: Tensor, q: Tensor) -> RuleProfile:
    V = len(p)
    accept, resample = [], []
    for x in range(V):
        if q[x] == 0:
            accept.append(float("nan"))
            resample.append(None)
            continue
        n = 0
        for r in _grid():
            ok, token = _as_decision(rule(p.clone(), q.clone(), x, r, 0.5), V, f"rule(p, q, x={x}, r={r:.4f}, u=0.5)")
            if ok and token != x:
                raise AssertionError(f"rule(p, q, x={x}, r={r:.4f}, ...) accepted but returned token {token}: an "
                                     "accepted draft token is the output, (True, x)")
            n += ok
        accept.append(n / GRID)
        counts = torch.zeros(V, dtype=torch.float64)
        r = 1 - 1e-12  # rejects whenever the acceptance probability is below 1
        for u in _grid():
            ok, token = _as_decision(rule(p.clone(), q.clone(), x, r, u), V, f"rule(p, q, x={x}, r≈1, u={u:.4f})")
            if ok:
                break
            counts[token] += 1
        resample.append(None if ok else counts / GRID)
    return RuleProfile(accept, resample)


def _as_decision(result, V: int, what: str) -> tuple[bool, int]:
    if result is None:
        raise AssertionError(f"{what} returned None; return (accepted, token)")
    try:
        ok, token = result
        ok, token = bool(ok), int(token)
    except (TypeError, ValueError):
        raise AssertionError(f"{what} returned {result!r}: return (accepted: bool, token: int)") from None
    if not 0 <= token < V:
        raise AssertionError(f"{what} returned token {token}, outside 0..{V - 1}: if it is {V}, the residual was not "
                             "normalized (its cumulative sum ends below 1, so u can pass its end); divide "
                             "max(p - q, 0) by its sum")
    return ok, token


def output_distribution(profile: RuleProfile, q: Tensor) -> Tensor:
    """P(output = y) = sum_x q[x] (a_x [y = x] + (1 - a_x) resample_x[y]): what the rule samples from."""
    out = torch.zeros(len(q), dtype=torch.float64)
    for x in range(len(q)):
        if q[x] == 0:
            continue
        a = profile.accept[x]
        out[x] += q[x] * a
        if profile.resample[x] is not None:
            out += q[x] * (1 - a) * profile.resample[x]
    return out


def _accept_variants(p: Tensor, q: Tensor) -> dict[str, list[float]]:
    return {
        "deterministic": [float(p[x] >= q[x]) if q[x] > 0 else float("nan") for x in range(len(p))],
        "ratio_upside_down": [min(1.0, float(q[x] / p[x])) if p[x] > 0 else 1.0 for x in range(len(p))],
    }


def _resample_variants(p: Tensor, q: Tensor) -> dict[str, Tensor]:
    residual = torch.clamp(p - q, min=0)
    reverse = torch.clamp(q - p, min=0)
    unnormalized = torch.zeros_like(p)
    for u in _grid():
        unnormalized[inverse_cdf(residual, u)] += 1 / GRID
    return {"from_p": p, "from_q": q, "reversed": reverse / reverse.sum(), "unnormalized": unnormalized}


SPEC_HINTS = {
    "deterministic": "you accept exactly when p[x] >= q[x]: accept with probability min(1, p[x] / q[x]), i.e. when "
                     "r < p[x] / q[x]; a draft token the target finds less likely is still accepted sometimes",
    "ratio_upside_down": "the ratio is upside down: accept when r < min(1, p[x] / q[x]) (target over draft)",
    "from_p": "on rejection you resample from p: draw from the residual norm(max(p - q, 0)) instead; p itself "
              "gives the tokens the draft already proposes too often",
    "from_q": "on rejection you resample from q: draw from the residual norm(max(p - q, 0))",
    "reversed": "the residual is reversed: max(p - q, 0), the mass the target has and the draft lacks",
    "unnormalized": "the residual is not normalized: divide max(p - q, 0) by its sum before the inverse CDF (its "
                    "cumulative sum must end at 1)",
}


@exercise("11.3", solution="speculative_accept")
def check_speculative_accept(speculative_accept):
    tol = 2.5 / GRID
    for k, (p, q) in enumerate(spec_cases()):
        profile = _profile(speculative_accept, p, q)
        want = [min(1.0, float(p[x] / q[x])) if q[x] > 0 else float("nan") for x in range(len(p))]
        what = f"case {k} (p = {[round(v, 3) for v in p.tolist()]}, q = {[round(v, 3) for v in q.tolist()]})"
        for x, (a, w) in enumerate(zip(profile.accept, want, strict=True)):
            if q[x] > 0 and abs(a - w) > tol:
                for mistake, variant in _accept_variants(p, q).items():
                    if all(q[y] == 0 or abs(profile.accept[y] - variant[y]) <= tol for y in range(len(p))):
                        raise AssertionError(f"{what}: {SPEC_HINTS[mistake]}")
                raise AssertionError(f"{what}: draft token {x} is accepted for a fraction {a:.3f} of uniform r, "
                                     f"expected min(1, p[x] / q[x]) = {w:.3f}")
        residual = torch.clamp(p - q, min=0)
        if residual.sum() > 0:
            residual = residual / residual.sum()
        for x, got in enumerate(profile.resample):
            if got is None:
                continue
            if (got - residual).abs().max() > tol:
                for mistake, variant in _resample_variants(p, q).items():
                    if (got - variant).abs().max() <= tol:
                        raise AssertionError(f"{what}: {SPEC_HINTS[mistake]}")
                raise AssertionError(f"{what}: after rejecting draft {x} the tokens come out with frequencies "
                                     f"{[round(v, 3) for v in got.tolist()]}, expected norm(max(p - q, 0)) = "
                                     f"{[round(v, 3) for v in residual.tolist()]}")
        out = output_distribution(profile, q)
        if (out - p).abs().max() > 3 * tol:
            raise AssertionError(f"{what}: the rule outputs tokens with probabilities "
                                 f"{[round(v, 3) for v in out.tolist()]}, not the target's p")


# ---------------------------------------------------------------------------
# 11.4 greedy decoding with a KV cache, assembled
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One forward pass: how many tokens were fed, the cache length before it (None: no cache), the positions."""

    tokens: int
    cached: int | None
    positions: tuple[int, ...] | None


class CountingGPT(GPT):
    """A ``GPT`` that records every forward call (for the check: does the loop use its cache, one token a step?)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.calls: list[Call] = []

    def forward(self, idx, targets=None, caches=None, positions=None, mask=None):
        past = caches[0].length if caches else None
        pos = None if positions is None else tuple(int(v) for v in torch.as_tensor(positions).flatten().tolist())
        self.calls.append(Call(int(idx.shape[-1]), past, pos))
        return super().forward(idx, targets, caches, positions, mask)


def tiny_decoder(preset: str = "gpt-tiny", seed: int = 0) -> CountingGPT:
    """An untrained tiny model of 256 ids that counts its calls (``gpt-tiny``: learned positions, context 64).

    The output layer is untied: an untrained tied model mostly repeats its last
    token, and a loop that feeds the wrong token or position would still agree.
    """
    torch.manual_seed(seed)
    return CountingGPT(ModelConfig.preset(preset, tied_embeddings=False)).eval()


@dataclass
class DecodeCase:
    prompt: list[int]
    max_new_tokens: int
    stop_tokens: tuple[int, ...] = ()
    vocab_size: int | None = None
    want: list[int] = field(default_factory=list)


def _reference_tokens(model: GPT, case: DecodeCase) -> list[int]:
    return generate(model, [case.prompt], case.max_new_tokens, temperature=0.0, stop_tokens=case.stop_tokens,
                    vocab_size=case.vocab_size)[0]


def decode_cases(model: GPT) -> list[DecodeCase]:
    """Prompts of 1, 7 and 20 ids; a stop token the model really writes; a vocab_size the model's argmax exceeds."""
    g = torch.Generator().manual_seed(5)
    prompts = [[7]] + [torch.randint(0, 256, (n,), generator=g).tolist() for n in (7, 20)]
    cases = [DecodeCase(prompts[0], 12), DecodeCase(prompts[1], 9)]
    free = _reference_tokens(model, DecodeCase(prompts[2], 16))
    stop = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i])  # first written at step >= 3
    cases.append(DecodeCase(prompts[2], 16, stop_tokens=(stop, 255)))
    cases.append(DecodeCase(prompts[1], 10, vocab_size=160))
    limit = model.cfg.context_length
    cases.append(DecodeCase(torch.randint(0, 256, (limit - 6,), generator=g).tolist(), 6))  # exactly fills it
    for case in cases:
        case.want = _reference_tokens(model, case)
    return cases


def _call_hint(calls: list[Call]) -> str | None:
    """A hint from the recorded forward calls, or None when they look like a cached loop.

    A cached loop: one prefill into empty caches, then calls of one token each
    with those caches. Extra work (a call without caches before the prefill)
    is left to the check's count of calls and tokens.
    """
    if len(calls) > 1 and all(c.cached is None for c in calls):
        return ("no KV cache: every step runs the model over the whole sequence again (calls of "
                f"{[c.tokens for c in calls[:4]]}... tokens). Create caches with model.new_caches(1, len(prompt) + "
                "max_new_tokens), prefill the prompt once, then feed only the new token")
    cached = [i for i, c in enumerate(calls) if c.cached is not None]
    if not cached:
        return None
    first = cached[0]
    if calls[first].cached != 0:
        return f"the first call found {calls[first].cached} tokens in the cache: start from fresh caches"
    for i, c in enumerate(calls[first + 1:], first + 1):
        if c.cached is None:
            return (f"call {i} ran without the caches: after the prefill every step passes caches=... and feeds "
                    "only the new token")
        if c.cached == 0:
            return (f"call {i} prefilled a second set of empty caches: prefill the prompt once per request, then "
                    "decode one token at a time into the same caches")
        if c.tokens > 1:
            return (f"call {i} fed {c.tokens} tokens with a cache that already holds {c.cached}: with the KV cache "
                    "feed only the new token, idx of shape (1, 1); the cache has the rest")
    for i, c in enumerate(calls):
        if c.positions is not None and c.cached is not None:
            expected = tuple(range(c.cached, c.cached + c.tokens))
            if c.positions != expected:
                return (f"call {i}: positions {list(c.positions)[:6]} for tokens that come after {c.cached} cached "
                        f"ones; they are {list(expected)[:6]}: the new token's position is the cache length "
                        "(or pass no positions: the model counts from its cache)")
    return None


def _run_decode(greedy_decode, model: CountingGPT, case: DecodeCase, what: str):
    model.calls.clear()
    try:
        got = greedy_decode(model, list(case.prompt), case.max_new_tokens, stop_tokens=case.stop_tokens,
                            vocab_size=case.vocab_size)
    except NotImplementedError:
        raise
    except (ValueError, RuntimeError, IndexError) as exc:
        hint = _call_hint(model.calls)
        if hint:
            raise AssertionError(f"{what}: {hint}") from None
        if "KV cache holds max_len" in str(exc):
            raise AssertionError(f"{what}: the cache is too small ({str(exc).split(';')[0]}): it needs room for "
                                 "len(prompt) + max_new_tokens tokens, model.new_caches(1, len(prompt) + "
                                 "max_new_tokens)") from None
        if isinstance(exc, ValueError) and len(case.prompt) + case.max_new_tokens == model.cfg.context_length:
            raise AssertionError(f"{what}: a prompt of {len(case.prompt)} plus max_new_tokens="
                                 f"{case.max_new_tokens} exactly fills the context of {model.cfg.context_length} "
                                 f"and must run (refuse only more than the context); ValueError: {exc}") from None
        if isinstance(exc, ValueError) and not model.calls:
            raise AssertionError(f"{what} refused a request that fits ({len(case.prompt)} + "
                                 f"{case.max_new_tokens} <= context {model.cfg.context_length}): ValueError: "
                                 f"{exc}") from None
        raise AssertionError(f"{what} raised {type(exc).__name__}: {exc}") from None
    if got is None:
        raise AssertionError(f"{what} returned None; return the list of new token ids")
    try:
        return [int(t) for t in got]
    except (TypeError, ValueError):
        raise AssertionError(f"{what} returned {got!r}: return a list of ints, the new tokens") from None


@exercise("11.4", solution="greedy_decode")
def check_greedy_decode(greedy_decode):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small run several times slower when two threads contend
    try:
        _check_greedy_decode(greedy_decode)
    finally:
        torch.set_num_threads(threads)


def _check_greedy_decode(greedy_decode) -> None:
    for preset in ("gpt-tiny", "llama-tiny"):
        model = tiny_decoder(preset)
        for case in decode_cases(model):
            what = (f"greedy_decode({preset}, prompt of {len(case.prompt)}, max_new_tokens={case.max_new_tokens}"
                    + (f", stop_tokens={case.stop_tokens}" if case.stop_tokens else "")
                    + (f", vocab_size={case.vocab_size}" if case.vocab_size else "") + ")")
            got = _run_decode(greedy_decode, model, case, what)
            calls = list(model.calls)
            hint = _call_hint(calls)
            if hint:
                raise AssertionError(f"{what}: {hint}")
            want = case.want
            if got != want:
                stop = set(case.stop_tokens)
                if case.vocab_size is not None and any(t >= case.vocab_size for t in got):
                    raise AssertionError(f"{what}: it chose id {max(got)} >= vocab_size={case.vocab_size}: set the "
                                         "logits of ids >= vocab_size to -inf before the argmax (the output layer "
                                         "is wider than the tokenizer)")
                if want and want[-1] in stop and len(got) > len(want) and got[:len(want)] == want:
                    raise AssertionError(f"{what}: it went on after writing stop token {want[-1]}: stop after the "
                                         "first token that is in stop_tokens")
                if want and want[-1] in stop and got == want[:-1]:
                    raise AssertionError(f"{what}: the stop token {want[-1]} is missing from the output: generate "
                                         "includes the stop token it stopped at (it is what the model wrote)")
                if got[:len(want)] == want or want[:len(got)] == got:
                    raise AssertionError(f"{what}: {len(got)} tokens, expected {len(want)}: write max_new_tokens "
                                         "new tokens (fewer only when a stop token comes first)")
                i = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
                raise AssertionError(f"{what}: new token {i} is {got[i]}, generate(..., temperature=0) gives {want[i]}"
                                     f" (the first {i} agree): is each token the argmax of the last position's "
                                     "logits, and is the cache fed every token once, in order?")
            fed = sum(c.tokens for c in calls)
            if len(calls) > len(want) + 1 or fed > len(case.prompt) + len(want):
                raise AssertionError(f"{what}: the right tokens, but {len(calls)} model calls feeding {fed} tokens; "
                                     f"a cached loop needs one prefill of {len(case.prompt)} and then one token "
                                     f"per step ({len(case.prompt) + len(want) - 1} tokens, {len(want)} calls)")
        model.calls.clear()
        got = _run_decode(greedy_decode, model, DecodeCase([3, 4], 0), f"greedy_decode({preset}, max_new_tokens=0)")
        if got != []:
            raise AssertionError(f"greedy_decode({preset}, max_new_tokens=0) returned {got}: no new tokens, []")
        _expect_refusal(greedy_decode, model, [], 4, "an empty prompt")
        limit = model.cfg.context_length
        _expect_refusal(greedy_decode, model, [1] * (limit - 5), 6,
                        f"a prompt of {limit - 5} ids with max_new_tokens=6 ({limit + 1} > context_length {limit})")


def _expect_refusal(greedy_decode, model: CountingGPT, prompt: list[int], max_new: int, label: str) -> None:
    model.calls.clear()
    try:
        greedy_decode(model, prompt, max_new, stop_tokens=(), vocab_size=None)
    except NotImplementedError:
        raise
    except ValueError:
        if model.calls:
            raise AssertionError(f"greedy_decode with {label} raised ValueError only after {len(model.calls)} "
                                 "model call(s): check the request before running the model, and refuse it in "
                                 "one clear line (a server answers 400 before spending compute)") from None
        return
    except Exception as exc:  # noqa: BLE001 - any other error is the wrong one
        raise AssertionError(f"greedy_decode with {label} raised {type(exc).__name__}: {exc}; raise a ValueError "
                             "that says what is wrong before running the model") from None
    raise AssertionError(f"greedy_decode with {label} returned without an error: raise a ValueError that says what "
                         "is wrong, before running the model")


def reference_greedy_decode(model: GPT, prompt: Sequence[int], max_new_tokens: int, stop_tokens: Sequence[int] = (),
                            vocab_size: int | None = None) -> list[int]:
    """``generate(model, [prompt], max_new_tokens, temperature=0, ...)[0]``: what Exercise 11.4 must match."""
    return generate(model, [list(prompt)], max_new_tokens, temperature=0.0, stop_tokens=stop_tokens,
                    vocab_size=vocab_size)[0]


def speculative_samples(rule: Callable, p: Tensor, q: Tensor, n: int, seed: int = 0) -> Tensor:
    """Counts of the tokens ``rule`` outputs over n rounds: x ~ q, then rule(p, q, x, r, u) with fresh uniforms."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.multinomial(q.float(), n, replacement=True, generator=g).tolist()
    ru = torch.rand(n, 2, generator=g, dtype=torch.float64).tolist()
    counts = torch.zeros(len(p), dtype=torch.float64)
    for x, (r, u) in zip(xs, ru, strict=True):
        counts[int(rule(p, q, x, r, u)[1])] += 1
    return counts


def chi_square_pvalue(counts: Tensor, p: Tensor) -> float:
    """Pearson's chi-square test of counts against p (cells with p = 0 must have no counts); its p-value."""
    n = float(counts.sum())
    keep = p > 0
    if bool((counts[~keep] > 0).any()):
        return 0.0
    expected = n * p[keep]
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


__all__ = ["CountingGPT", "MCCase", "check_greedy_decode", "check_int8", "check_mc_predictions",
           "check_speculative_accept", "chi_square_pvalue", "decode_cases", "int8_weight", "inverse_cdf", "mc_cases",
           "reference_accept", "reference_dequantize", "reference_greedy_decode", "reference_mc",
           "reference_quantize", "reference_scales", "spec_cases", "speculative_samples", "tiny_decoder"]
