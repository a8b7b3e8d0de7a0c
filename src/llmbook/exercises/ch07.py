"""Checks for Chapter 7's exercises: the schedule, an AdamW step, clipping, a stable loss, two training loops.

The expected values come from ``llmbook.schedule`` and from PyTorch itself
(``torch.optim.AdamW``, ``torch.nn.utils.clip_grad_norm_``,
``F.cross_entropy``), the same references the chapter proves the library
against. When an answer is wrong, the check tries to name the usual mistake
(warmup that starts at zero, no floor, Adam with L2 instead of AdamW, no bias
correction, clipping each tensor on its own, a softmax that overflows, ...)
by comparing it with the wrong answers those mistakes produce.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from llmbook import data, loader
from llmbook.exercises import exercise
from llmbook.exercises.tensors import random_tensor as _random
from llmbook.model import GPT
from llmbook.optim import AdamW, ForeachAdamW, clip_grad_norm, param_groups
from llmbook.schedule import CosineSchedule, set_lr
from llmbook.train import TrainConfig, Trainer

# ---------------------------------------------------------------------------
# 7.1 cosine learning rate with warmup
# ---------------------------------------------------------------------------

_SCHEDULES = [  # (peak_lr, warmup_steps, decay_steps, min_ratio)
    (1e-3, 10, 100, 0.1),
    (6e-4, 0, 50, 0.1),
    (3e-4, 5, 20, 0.0),
    (1.0, 100, 1000, 0.25),
]


def _cosine_wrong(step: int, peak: float, warmup: int, decay: int, ratio: float) -> list[tuple[float, str]]:
    """What typical mistakes return at ``step``."""
    floor = ratio * peak

    def cosine(start: int, low: float, s: int) -> float:
        progress = min(max((s - start) / max(decay - start, 1), 0.0), 1.0)
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * progress))

    wrong = []
    if step < warmup:
        wrong += [(peak * step / warmup, "warmup starts one step early: step 0 already gets a small "
                                         "learning rate, peak·(step + 1)/(warmup_steps + 1)"),
                  (peak, "during warmup the learning rate rises linearly to the peak; it does not start there")]
    else:
        wrong += [(cosine(warmup, 0.0, step), "the cosine ends at the floor min_ratio·peak_lr, not at zero"),
                  (cosine(0, floor, step), "the cosine starts at step warmup_steps, not at step 0: its progress "
                                           "is (step − warmup_steps)/(decay_steps − warmup_steps)"),
                  (floor + (peak - floor) * (1 - (step - warmup) / max(decay - warmup, 1)),
                   "the decay is a half cosine, 0.5·(1 + cos(π·progress)), not a straight line")]
        if step > decay:
            progress = (step - warmup) / max(decay - warmup, 1)
            wrong.append((floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress)),
                          "after decay_steps the learning rate stays at the floor; the cosine must not rise again"))
    return wrong


@exercise("7.1", solution="cosine_lr")
def check_cosine_lr(cosine_lr):
    for peak, warmup, decay, ratio in _SCHEDULES:
        reference = CosineSchedule(peak_lr=peak, warmup_steps=warmup, decay_steps=decay, min_ratio=ratio)
        steps = sorted({0, 1, max(warmup - 1, 0), warmup, warmup + 1, (warmup + decay) // 2, decay - 1, decay,
                        decay + 1, 2 * decay})
        for step in steps:
            got = cosine_lr(step, peak, warmup, decay, ratio)
            what = (f"cosine_lr(step={step}, peak_lr={peak}, warmup_steps={warmup}, decay_steps={decay}, "
                    f"min_ratio={ratio})")
            if got is None:
                raise AssertionError("cosine_lr returned None; did you forget `return`?")
            try:
                got = float(got)
            except (TypeError, ValueError):
                raise AssertionError(f"{what} should return a number, got {type(got).__name__}") from None
            expected = reference(step)
            if math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-15):
                continue
            hint = next((f"; {h}" for value, h in _cosine_wrong(step, peak, warmup, decay, ratio)
                         if math.isclose(got, value, rel_tol=1e-9, abs_tol=1e-15)), "")
            raise AssertionError(f"{what} = {got!r}, expected {expected!r} (llmbook.schedule.CosineSchedule){hint}")


# ---------------------------------------------------------------------------
# 7.2 one AdamW step
# ---------------------------------------------------------------------------

_ADAMW_CASES = [  # (shape, lrs per step, betas, eps, weight_decay, gradient scale)
    ((5,), [1e-2] * 4, (0.9, 0.999), 1e-8, 0.0, 1.0),
    ((3, 4), [0.05, 0.1, 0.08, 0.02, 0.01], (0.9, 0.95), 1e-8, 0.1, 1.0),  # the lr changes: a schedule
    ((2, 3, 4), [0.3] * 3, (0.8, 0.99), 1e-8, 0.5, 1.0),  # large lr and decay: the order of the two matters
    ((6,), [1e-2] * 3, (0.9, 0.999), 1e-3, 0.01, 1e-3),  # tiny gradients and a large eps: where eps goes
]


def _adamw_reference(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, lr: float, b1: float, b2: float,
                     eps: float, wd: float, *, coupled=False, decay_lr=True, decay_after=False, correct=True,
                     eps_inside=False) -> Tensor:
    """The new parameter under AdamW, or under one of the usual mistakes."""
    if coupled:
        g = g + wd * p
    m1 = b1 * m + (1 - b1) * g
    v1 = b2 * v + (1 - b2) * g * g
    m_hat = m1 / (1 - b1**step) if correct else m1
    v_hat = v1 / (1 - b2**step) if correct else v1
    update = m_hat / ((v_hat + eps).sqrt() if eps_inside else v_hat.sqrt() + eps)
    if coupled:
        return p - lr * update
    shrink = 1 - (lr * wd if decay_lr else wd)
    return (p - lr * update) * shrink if decay_after else p * shrink - lr * update


def _tensor_answer(got, what: str, shape: tuple[int, ...], name: str) -> Tensor:
    if not isinstance(got, Tensor):
        raise AssertionError(f"{what}: {name} should be a torch.Tensor, got {type(got).__name__}")
    if tuple(got.shape) != shape:
        raise AssertionError(f"{what}: {name} should have shape {shape}, got {tuple(got.shape)}")
    return got.detach().double()


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-7, atol=1e-12))


@exercise("7.2", solution="adamw_step")
def check_adamw_step(adamw_step):
    for seed, (shape, lrs, (b1, b2), eps, wd, scale) in enumerate(_ADAMW_CASES):
        # torch's AdamW in float64, one parameter; the reader gets torch's state before each step
        param = torch.nn.Parameter(1.0 + _random(*shape, seed=seed).double())
        opt = torch.optim.AdamW([param], lr=lrs[0], betas=(b1, b2), eps=eps, weight_decay=wd, foreach=False)
        for t, lr in enumerate(lrs, start=1):
            grad = scale * _random(*shape, seed=100 * seed + t).double()
            state = opt.state[param]
            m = state["exp_avg"].clone() if state else torch.zeros(shape, dtype=torch.float64)
            v = state["exp_avg_sq"].clone() if state else torch.zeros(shape, dtype=torch.float64)
            p = param.detach().clone()
            what = (f"adamw_step at step={t} (shape {shape}, lr={lr}, beta1={b1}, beta2={b2}, eps={eps}, "
                    f"weight_decay={wd})")
            got = adamw_step(p.clone(), grad.clone(), m.clone(), v.clone(), t, lr, b1, b2, eps, wd)
            if got is None:
                raise AssertionError("adamw_step returned None; did you forget `return`?")
            if not isinstance(got, tuple | list) or len(got) != 3:
                raise AssertionError(f"{what} should return a tuple (param, exp_avg, exp_avg_sq), got {got!r:.80}")
            new_p, new_m, new_v = (_tensor_answer(x, what, shape, name)
                                   for x, name in zip(got, ["param", "exp_avg", "exp_avg_sq"], strict=True))

            opt.param_groups[0]["lr"] = lr  # what a schedule does between steps
            param.grad = grad.clone()
            opt.step()
            if not _same(new_m, opt.state[param]["exp_avg"]):
                hint = "the first moment is beta1·exp_avg + (1 − beta1)·grad"
                if wd and _same(new_m, b1 * m + (1 - b1) * (grad + wd * p)):
                    hint = ("the decay was added to the gradient: that is Adam with L2 regularization. AdamW "
                            "leaves the gradient alone and shrinks the weight directly: param·(1 − lr·weight_decay)")
                elif _same(new_m, (b1 * m + (1 - b1) * grad) / (1 - b1**t)):
                    hint = "return the moment itself; the bias correction only enters the update of the param"
                raise AssertionError(f"{what}: exp_avg differs from torch.optim.AdamW's; {hint}")
            if not _same(new_v, opt.state[param]["exp_avg_sq"]):
                hint = "the second moment is beta2·exp_avg_sq + (1 − beta2)·grad², the gradient squared elementwise"
                if _same(new_v, (b2 * v + (1 - b2) * grad * grad) / (1 - b2**t)):
                    hint = "return the moment itself; the bias correction only enters the update of the param"
                raise AssertionError(f"{what}: exp_avg_sq differs from torch.optim.AdamW's; {hint}")
            if _same(new_p, param.detach()):
                continue
            args = (p, grad, m, v, t, lr, b1, b2, eps, wd)
            hints = [
                (dict(correct=False), "the bias correction is missing: divide exp_avg by 1 − beta1^step and "
                                      "exp_avg_sq by 1 − beta2^step before the update"),
                (dict(coupled=True), "that is Adam with L2 regularization (decay added to the gradient); AdamW "
                                     "decays the weight directly: param·(1 − lr·weight_decay)"),
                (dict(decay_lr=False), "the decay is scaled by the learning rate: param·(1 − lr·weight_decay)"),
                (dict(decay_after=True), "shrink the weight before the Adam update, as torch does: "
                                         "param·(1 − lr·wd) − lr·m̂/(√v̂ + eps)"),
                (dict(eps_inside=True), "eps goes outside the square root: m̂/(√v̂ + eps)"),
            ]
            hint = next((f"; {h}" for kw, h in hints if _same(new_p, _adamw_reference(*args, **kw))), "")
            for off in (-1, 1):
                if not hint and t + off >= 1 and _same(new_p, _adamw_reference(p, grad, m, v, t + off, *args[5:])):
                    hint = "; the bias correction uses the wrong step: the first update has step = 1"
            error = (new_p - param.detach()).abs().max().item()
            raise AssertionError(f"{what}: the new param differs from torch.optim.AdamW's by up to {error:.3g}{hint}")


# ---------------------------------------------------------------------------
# 7.3 clipping by the global norm
# ---------------------------------------------------------------------------

_CLIP_CASES = [  # (shapes of the gradients, gradient scale, max_norm)
    ([(4,), (3, 3)], 1.0, 1.0),  # norm above max_norm: clipped
    ([(8, 4), (4,), (2, 2, 2)], 0.05, 1.0),  # norm below: unchanged
    ([(16,), (5, 7), (3,)], 10.0, 0.5),
    ([(10,)], 2.0, 3.0),
]


@exercise("7.3", solution="clip_by_global_norm")
def check_clip_by_global_norm(clip_by_global_norm):
    for seed, (shapes, scale, max_norm) in enumerate(_CLIP_CASES):
        grads = [scale * _random(*s, seed=10 * seed + i) * (i + 1) for i, s in enumerate(shapes)]
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        expected = [p.grad for p in params]
        what = f"clip_by_global_norm(grads of shapes {shapes}, max_norm={max_norm})"

        got = clip_by_global_norm([g.clone() for g in grads], max_norm)
        if got is None:
            raise AssertionError("clip_by_global_norm returned None; did you forget `return`?")
        if not isinstance(got, tuple | list) or len(got) != 2:
            raise AssertionError(f"{what} should return a pair (clipped grads, norm), got {got!r:.80}")
        clipped, got_norm = got
        if not isinstance(clipped, tuple | list) or len(clipped) != len(grads):
            raise AssertionError(f"{what}: the first item should be a list of {len(grads)} tensors, one per gradient")
        clipped = [_tensor_answer(c, what, tuple(g.shape), f"clipped grad {i}").float()
                   for i, (c, g) in enumerate(zip(clipped, grads, strict=True))]
        try:
            got_norm = float(got_norm)
        except (TypeError, ValueError):
            raise AssertionError(f"{what}: the norm should be a number or a 0-d tensor, got {got_norm!r:.60}") from None

        if not math.isclose(got_norm, norm, rel_tol=1e-5):
            flat = torch.cat([g.flatten() for g in grads])
            hint = ""
            if math.isclose(got_norm, min(norm, max_norm), rel_tol=1e-4):
                hint = "; return the norm measured before clipping (torch does: it is what you log)"
            elif math.isclose(got_norm, sum(g.norm().item() for g in grads), rel_tol=1e-5):
                hint = "; the global norm is the norm of all gradients together, √(Σ g²), not the sum of their norms"
            elif math.isclose(got_norm, flat.pow(2).sum().item(), rel_tol=1e-5):
                hint = "; take the square root of the sum of squares"
            raise AssertionError(f"{what}: norm {got_norm:.6g}, expected {norm:.6g}{hint}")
        for i, (c, e) in enumerate(zip(clipped, expected, strict=True)):
            if torch.allclose(c, e, rtol=1e-5, atol=1e-7):
                continue
            hint = ""
            if torch.allclose(c, grads[i] * max_norm / grads[i].norm(), rtol=1e-4, atol=1e-7):
                hint = ("; each tensor was clipped to max_norm on its own: scale all gradients by one factor, "
                        "max_norm / global norm, so their directions relative to each other stay the same")
            elif norm < max_norm and torch.allclose(c, grads[i] * max_norm / norm, rtol=1e-4, atol=1e-7):
                hint = "; the global norm is below max_norm: leave the gradients unchanged, never scale them up"
            elif torch.allclose(c, grads[i], rtol=1e-5, atol=1e-7):
                hint = f"; the global norm {norm:.4g} exceeds max_norm, so scale every gradient by max_norm / norm"
            raise AssertionError(f"{what}: clipped gradient {i} differs from torch.nn.utils.clip_grad_norm_'s{hint}")


# ---------------------------------------------------------------------------
# 7.4 cross-entropy that survives large logits
# ---------------------------------------------------------------------------

_CE_CASES = [  # (N, V, logit scale)
    (4, 10, 1.0),
    (1, 2, 3.0),
    (16, 50, 5.0),
    (8, 100, 1e4),  # exp(1e4) overflows float32: the log-sum-exp trick is needed
    (3, 7, -1e4),
]


@exercise("7.4", solution="stable_cross_entropy")
def check_stable_cross_entropy(stable_cross_entropy):
    for seed, (n, v, scale) in enumerate(_CE_CASES):
        logits = (scale * _random(n, v, seed=seed)).requires_grad_()
        targets = torch.randint(v, (n,), generator=torch.Generator().manual_seed(seed))
        what = f"stable_cross_entropy(logits of shape {(n, v)} and scale {scale:g}, targets of shape {(n,)})"
        got = stable_cross_entropy(logits, targets.clone())
        if got is None:
            raise AssertionError("stable_cross_entropy returned None; did you forget `return`?")
        if not isinstance(got, Tensor):
            raise AssertionError(f"{what} should return a torch.Tensor, got {type(got).__name__}: {got!r:.60}")
        if got.numel() != 1:
            raise AssertionError(f"{what} should return the mean loss, one number, got shape {tuple(got.shape)}")
        expected = F.cross_entropy(logits, targets)
        value = got.detach().float().reshape(())
        if not torch.isfinite(value):
            raise AssertionError(f"{what} = {value.item()}: exp of large logits overflows; subtract each row's "
                                 "maximum before exponentiating (the log-sum-exp trick)")
        if not torch.allclose(value, expected.detach(), rtol=1e-5, atol=1e-5):
            with torch.no_grad():
                per_row = F.cross_entropy(logits, targets, reduction="none")
                hints = [(per_row.sum(), "return the mean over the rows, not the sum"),
                         (-per_row.mean(), "the loss is the *negative* log-probability of the target"),
                         (per_row.mean() / math.log(2), "use the natural logarithm (nats), as F.cross_entropy does"),
                         (F.cross_entropy(logits.T, targets) if n == v else torch.tensor(float("nan")),
                          "the softmax runs over the vocabulary (the last dim)")]
            hint = next((f"; {h}" for w, h in hints if torch.allclose(value, w.float(), rtol=1e-5, atol=1e-5)), "")
            raise AssertionError(f"{what} = {value.item():.6g}, expected {expected.item():.6g} "
                                 f"(F.cross_entropy){hint}")
        if not got.requires_grad:
            raise AssertionError(f"{what}: the result has no gradient; compute it with torch operations on the "
                                 "logits (no .item(), .detach() or numpy), so that training can backpropagate")
        (grad,) = torch.autograd.grad(got.reshape(()), logits)
        (expected_grad,) = torch.autograd.grad(expected, logits)
        if not torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-6):
            raise AssertionError(f"{what}: the value is right but its gradient differs from F.cross_entropy's; "
                                 "the row maximum may be subtracted either way (detached or not), but every other "
                                 "step must stay differentiable")


# ---------------------------------------------------------------------------
# 7.11 the whole training loop
# ---------------------------------------------------------------------------

_LOOP_CASES = [  # (preset, steps, batch_size, context_length, peak_lr, warmup_steps, weight_decay, max_norm, seed)
    ("gpt-tiny", 5, 2, 16, 3e-3, 2, 0.1, 0.5, 0),  # tied embeddings, biases, LayerNorm gains
    ("llama-tiny", 3, 2, 16, 1e-2, 0, 0.5, 1.0, 1),  # untied head, no biases, RMSNorm; no warmup
]
_LOOP_BETAS, _LOOP_EPS, _LOOP_MIN_RATIO = (0.9, 0.99), 1e-8, 0.1


def _loop_reference(model, tokens, steps, batch_size, context_length, peak_lr, warmup_steps, weight_decay, max_norm,
                    seed, *, decay_all=False, decay_2d=False, no_clip=False, schedule_shift=0, constant_lr=False,
                    one_rng=False) -> list[float]:
    """llmbook's loop (the trainer's, without its extras), or one of the usual mistakes; returns the losses."""
    groups = param_groups(model, weight_decay)
    if decay_all or decay_2d:
        params = [g for group in groups for g in group["params"]]
        decay = [p for p in params if decay_all or p.dim() >= 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": [p for p in params if all(p is not q for q in decay)], "weight_decay": 0.0}]
    opt = AdamW(groups, lr=peak_lr, betas=_LOOP_BETAS, eps=_LOOP_EPS)
    schedule = CosineSchedule(peak_lr, warmup_steps, steps, _LOOP_MIN_RATIO)
    shared = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        rng = shared if one_rng else np.random.default_rng([seed, step])
        x, y = loader.get_batch(tokens, batch_size, context_length, rng=rng)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        if not no_clip:
            clip_grad_norm(list(model.parameters()), max_norm)
        set_lr(opt, peak_lr if constant_lr else schedule(step + schedule_shift))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _loop_tokens(vocab_size: int, seed: int):
    """A token stream with structure to learn: a noisy repeating pattern, as int64 NumPy."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, vocab_size, size=37)
    tokens = np.tile(pattern, 30)
    noise = rng.random(tokens.shape) < 0.2
    tokens[noise] = rng.integers(0, vocab_size, size=int(noise.sum()))
    return tokens.astype(np.int64)


@exercise("7.11", solution="train_loop")
def check_train_loop(train_loop):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster than several that wait for each other
    try:
        _check_train_loop(train_loop)
    finally:
        torch.set_num_threads(threads)


def _check_train_loop(train_loop):
    for preset, steps, b, t, lr, warmup, wd, max_norm, seed in _LOOP_CASES:
        torch.manual_seed(seed)
        model = GPT.from_preset(preset).double()
        tokens = _loop_tokens(model.cfg.vocab_size, seed)
        args = (tokens, steps, b, t, lr, warmup, wd, max_norm, seed)
        what = (f"train_loop({preset}, steps={steps}, batch_size={b}, context_length={t}, peak_lr={lr}, "
                f"warmup_steps={warmup}, weight_decay={wd}, max_norm={max_norm}, seed={seed})")
        start = copy.deepcopy(model)
        reference = copy.deepcopy(model)
        expected = _loop_reference(reference, *args)

        got = train_loop(model, tokens.copy(), steps, b, t, lr, warmup, wd, max_norm, seed)
        if got is None:
            raise AssertionError("train_loop returned None; did you forget `return losses`?")
        try:
            got = [float(x) for x in got]
        except (TypeError, ValueError):
            raise AssertionError(f"{what} should return a list of {steps} numbers (the loss of each step), "
                                 f"got {got!r:.80}") from None
        if len(got) != steps:
            raise AssertionError(f"{what} returned {len(got)} losses, expected one per step: {steps}")
        if not math.isclose(got[0], expected[0], rel_tol=1e-9):
            hint = ("draw each step's batch with np.random.default_rng([seed, step]), offsets "
                    "rng.integers(0, len(tokens) - context_length, size=batch_size), y the window shifted by one; "
                    "the loss is the mean cross-entropy over all B·T positions")
            if math.isclose(got[0], math.log(model.cfg.vocab_size), rel_tol=1e-3):
                hint = "the loss equals ln(vocab_size): are the logits computed by the model at all?"
            raise AssertionError(f"{what}: the loss of step 0 is {got[0]:.6g}, expected {expected[0]:.6g}; the "
                                 f"model is still untouched there, so the batch or the loss is wrong: {hint}")
        params_ok = all(torch.allclose(p, q, rtol=1e-9, atol=1e-12)
                        for p, q in zip(model.parameters(), reference.parameters(), strict=True))
        if all(math.isclose(g, e, rel_tol=1e-9) for g, e in zip(got, expected, strict=True)) and params_ok:
            continue

        if all(torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters(), strict=True)):
            raise AssertionError(f"{what}: the model's parameters did not change; update them in place "
                                 "(under torch.no_grad(), e.g. p.mul_(...), p.add_(...)): the caller keeps the model")
        mistakes = [
            (dict(one_rng=True), "one generator for the whole run gives other batches; seed one per step, "
                                 "np.random.default_rng([seed, step]), as the trainer does (so a resumed run "
                                 "draws the same batches)"),
            (dict(decay_2d=True), "every matrix was decayed (nanoGPT's rule); the book decays only the weights of "
                                  "nn.Linear layers, not the embeddings, and a tied lm_head is the embedding"),
            (dict(decay_all=True), "weight decay was applied to every parameter; biases, norm gains and "
                                   "embeddings go in the group with weight_decay 0"),
            (dict(no_clip=True), "the gradients were not clipped: scale them all by min(1, max_norm / (norm + "
                                 "1e-6)) after backward and before the update"),
            (dict(schedule_shift=1), "the schedule is one step ahead: the first update uses the rate of step 0"),
            (dict(constant_lr=True), "the learning rate stayed at peak_lr: use warmup and cosine decay "
                                     "(Exercise 7.1) with decay_steps = steps and min_ratio 0.1"),
        ]
        hint = ""
        for kw, text in mistakes:
            variant = copy.deepcopy(start)
            losses = _loop_reference(variant, *args, **kw)
            if (all(math.isclose(g, e, rel_tol=1e-7) for g, e in zip(got, losses, strict=True))
                    and all(torch.allclose(p, q, rtol=1e-7, atol=1e-10)
                            for p, q in zip(model.parameters(), variant.parameters(), strict=True))):
                hint = f"; {text}"
                break
        first = next((i for i, (g, e) in enumerate(zip(got, expected, strict=True))
                      if not math.isclose(g, e, rel_tol=1e-9)), None)
        if first is None:
            where = "the losses agree but the final parameters differ (is the last step's update applied?)"
        else:
            where = f"the losses agree up to step {first - 1} and differ from step {first} on"
        name, worst = max(((n, (p - q).abs().max().item()) for (n, p), q
                           in zip(model.named_parameters(), reference.parameters(), strict=True)),
                          key=lambda item: item[1])
        if not hint:
            hint = ("; check the order: backward, clip, set the step's rate, AdamW update with bias correction "
                    f"(betas {_LOOP_BETAS}, eps {_LOOP_EPS}), decay only the decay group, zero the gradients")
        raise AssertionError(f"{what}: {where}; largest parameter difference {worst:.3g} in {name}{hint}")


# ---------------------------------------------------------------------------
# 7.12 assemble it yourself: the trainer's loop, with gradient accumulation
# ---------------------------------------------------------------------------

ASSEMBLE_TEXT_CHARS = 8000  # a few KB of Tiny Shakespeare: enough distinct windows, seconds to train on
# (accumulation_steps, grad_clip, warmup_steps, max_steps). The first two bracket the gradient norms of these
# steps (2.9 at step 0, falling to 1.2): a clip of 2.5 acts only at step 0, where an undivided loss (k times
# the gradient) is clipped at every step; a clip of 1.5 acts at most steps, where a doubly divided loss is not,
# and clipping after each micro-batch acts too early. Adam's step hardly changes when every gradient of the run
# is scaled alike, so only a clip that acts at some steps and not at others shows a wrong scale in the weights.
# The third case: no accumulation, no clipping (grad_clip=0), no warmup.
ASSEMBLE_CASES = [(2, 2.5, 2, 6), (3, 1.5, 2, 6), (1, 0.0, 0, 4)]
ASSEMBLE_PARAM_TOL = 1e-4  # max |difference| of a weight; equivalent loops differ by ~1e-5, mistakes by >= 8e-4
ASSEMBLE_LOSS_TOL = 1e-5  # relative, per step's loss


def assemble_config(accumulation_steps: int = 2, grad_clip: float = 2.5, warmup_steps: int = 2,
                    max_steps: int = 6) -> TrainConfig:
    """The run the check trains twice: ``gpt-tiny`` on bytes, lr 1e-2 and weight decay 0.5, so a mistake shows."""
    return TrainConfig(
        name="exercise-7.12", model="gpt-tiny", tokenizer="bytes", context_length=32, batch_size=4,
        accumulation_steps=accumulation_steps, max_steps=max_steps, lr=1e-2, warmup_steps=warmup_steps,
        decay_steps=max_steps, weight_decay=0.5, grad_clip=grad_clip, device="cpu", threads=1, eval_interval=0,
        sample_tokens=0,
    )


class _SmallTextTrainer(Trainer):
    """The library's ``Trainer`` on the first few KB of Tiny Shakespeare, held in memory (no token cache written)."""

    def load_data(self) -> loader.PreparedData:
        text = data.read_text("tinyshakespeare")[:ASSEMBLE_TEXT_CHARS]
        tokenizer = loader.make_tokenizer("bytes", "")
        train, val = loader.split_text(text, self.cfg.val_fraction)
        return loader.PreparedData(
            dir=self.run_dir, tokenizer=tokenizer,
            train=np.array(tokenizer.encode_ordinary(train), dtype=np.uint16),
            val=np.array(tokenizer.encode_ordinary(val), dtype=np.uint16),
            train_bytes=len(train.encode()), val_bytes=len(val.encode()),
        )


@dataclass
class TrainerRun:
    """What the library's ``Trainer`` did: its start model, its micro-batches in order, losses and weights per step."""

    start: GPT
    batches: list[tuple[Tensor, Tensor]]
    losses: list[float]
    params: list[list[Tensor]]  # params[s]: the weights after s optimizer steps


@contextlib.contextmanager
def _rng_kept():
    """The Trainer seeds Python's, NumPy's and PyTorch's generators; give the reader's notebook its own back."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _weights(model: torch.nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def trainer_run(cfg: TrainConfig) -> TrainerRun:
    """``Trainer.train_step`` ``cfg.max_steps`` times, from the Trainer's own seeded initialization."""
    with _rng_kept(), tempfile.TemporaryDirectory() as tmp:
        trainer = _SmallTextTrainer(cfg, tmp, progress=False)
        start = copy.deepcopy(trainer.raw_model)
        batches = [trainer.get_batch(s, m) for s in range(cfg.max_steps) for m in range(cfg.accumulation_steps)]
        losses, params = [], [_weights(trainer.raw_model)]
        for _ in range(cfg.max_steps):
            loss, _ = trainer.train_step()
            losses.append(loss.item())
            params.append(_weights(trainer.raw_model))
    return TrainerRun(start, batches, losses, params)


class WatchedBatches:
    """The micro-batches, in order, for the reader's loop: records the weights and gradients at each draw.

    What the loop has done by the time it asks for a batch shows what it got
    wrong: weights that move between two micro-batches of one step were
    updated too early; the gradient after the first micro-batch shows how the
    loss was scaled.
    """

    def __init__(self, model: torch.nn.Module, batches: list[tuple[Tensor, Tensor]]):
        self.model, self.batches, self.drawn = model, batches, 0
        self.weights: list[list[Tensor]] = []  # at each draw
        self.grads: list[list[Tensor] | None] = []  # at each draw; None when some parameter has no gradient

    def __iter__(self) -> WatchedBatches:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.drawn == len(self.batches):
            raise StopIteration
        self.weights.append(_weights(self.model))
        grads = [p.grad for p in self.model.parameters()]
        self.grads.append(None if any(g is None for g in grads) else [g.detach().clone() for g in grads])
        x, y = self.batches[self.drawn]
        self.drawn += 1
        return x.clone(), y.clone()


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a, b, strict=True))


def _relative(a: list[Tensor], b: list[Tensor]) -> float:
    """|a - b| / |b| over all tensors together."""
    num = math.sqrt(sum((p - q).double().pow(2).sum().item() for p, q in zip(a, b, strict=True)))
    den = math.sqrt(sum(q.double().pow(2).sum().item() for q in b))
    return num / max(den, 1e-30)


# the mistakes the reference loop can make, each with the hint the check prints when the reader's weights match it
ASSEMBLE_MISTAKES = {
    "no_zero_grad": "the gradients were never cleared, so each step adds the gradients of every step before it: "
                    "call optimizer.zero_grad() after optimizer.step()",
    "zero_each_micro": "the gradients were cleared before each micro-batch, so only the last micro-batch's "
                       "gradient is left: clear them once per step, after optimizer.step(), not inside the "
                       "micro-batch loop",
    "no_divide": "the micro-batch losses were not divided by accumulation_steps: backward of loss / k, so that the "
                 "k gradients add up to the gradient of the whole batch's mean",
    "divide_twice": "the loss was divided by accumulation_steps twice (loss / k², a gradient k times too small): "
                    "divide each micro-batch's loss by k once",
    "clip_each_micro": "the gradients were clipped before accumulation finished (after each micro-batch's "
                       "backward): clip once per step, after all k backward passes, before optimizer.step()",
    "no_clip": "the gradients were not clipped: clip them all together to the global norm cfg.grad_clip "
               "(when it is > 0) after the last backward of the step, before optimizer.step()",
    "schedule_ahead": "the schedule is one step ahead (the lr of step t+1 at step t): the first update uses the "
                      "rate of step 0, cfg.lr·1/(cfg.warmup + 1)",
    "warmup_from_zero": "warmup starts at zero (lr·step/warmup, so step 0 learns nothing): the rate of step t < "
                        "warmup is cfg.lr·(t + 1)/(cfg.warmup + 1)",
    "no_warmup": "there is no warmup: the rate rises linearly over the first cfg.warmup steps, "
                 "cfg.lr·(t + 1)/(cfg.warmup + 1), and the cosine starts at step cfg.warmup",
    "constant_lr": "the learning rate stayed at cfg.lr: set each step's rate from the schedule, warmup then "
                   "cosine, in every parameter group (group['lr'] = ...) before optimizer.step()",
    "floor_zero": "the cosine decays to zero; the library's ends at the floor cfg.min_lr_ratio·cfg.lr",
    "decay_all": "weight decay was applied to every parameter; biases, norm gains and embeddings go in a group "
                 "with weight_decay 0 (the rule of optim.param_groups)",
    "decay_2d": "the embeddings were decayed (the rule 'every matrix', p.dim() >= 2, nanoGPT's); the library "
                "decays only the weights of nn.Linear layers, and a tied lm_head is the embedding",
    "decay_tied": "the tied lm_head.weight was decayed as an nn.Linear weight, but it is the token embedding "
                  "(the same tensor), which the library does not decay: leave out the parameters of nn.Embedding",
    "decay_norms_biases": "the biases and norm gains were decayed; only the weights of nn.Linear layers decay "
                          "(a gain's natural value is 1, not 0)",
    "no_decay": "no weight decay at all: the weights of the nn.Linear layers decay by cfg.weight_decay (the other "
                "parameters by 0)",
}


def _among(p: Tensor, tensors: list[Tensor]) -> bool:
    return any(p is t for t in tensors)


def assemble_reference(model: GPT, batches, cfg: TrainConfig, mistake: str | None = None) -> list[float]:
    """The Trainer's step (``forward_backward`` then ``optimizer_step``) as one loop, or one mistake of it.

    With ``mistake=None`` it equals ``Trainer.train_step`` exactly (tests/test_exercises_ch07.py).
    """
    if mistake is not None and mistake not in ASSEMBLE_MISTAKES:
        raise ValueError(f"unknown mistake {mistake!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, cfg.weight_decay)
    if mistake in ("decay_all", "decay_2d", "decay_tied", "decay_norms_biases", "no_decay"):
        embeddings = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        rules = {"decay_all": lambda p: True, "decay_2d": lambda p: p.dim() >= 2, "no_decay": lambda p: False,
                 "decay_tied": lambda p: p.dim() >= 2 and (p is model.lm_head.weight or not _among(p, embeddings)),
                 "decay_norms_biases": lambda p: not _among(p, embeddings)}
        decay = [p for p in params if rules[mistake](p)]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if all(p is not q for q in decay)], "weight_decay": 0.0}]
    optimizer = ForeachAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)
    warmup = 0 if mistake == "no_warmup" else cfg.warmup
    schedule = CosineSchedule(cfg.lr, warmup, cfg.decay, 0.0 if mistake == "floor_zero" else cfg.min_lr_ratio)
    batches, k, losses = iter(batches), cfg.accumulation_steps, []
    for step in range(cfg.max_steps):
        total = torch.zeros(())
        for _ in range(k):
            x, y = next(batches)
            if mistake == "zero_each_micro":
                optimizer.zero_grad(set_to_none=True)
            _, loss = model(x, y)
            scaled = {"no_divide": loss, "divide_twice": loss / k / k}.get(mistake, loss / k)
            scaled.backward()
            total += (loss / k).detach()
            if mistake == "clip_each_micro" and cfg.grad_clip > 0:
                clip_grad_norm(params, cfg.grad_clip)
        if cfg.grad_clip > 0 and mistake not in ("no_clip", "clip_each_micro"):
            clip_grad_norm(params, cfg.grad_clip)
        if mistake == "schedule_ahead":
            lr = schedule(step + 1)
        elif mistake == "warmup_from_zero" and step < warmup:
            lr = cfg.lr * step / warmup
        else:
            lr = cfg.lr if mistake == "constant_lr" else schedule(step)
        set_lr(optimizer, lr)
        optimizer.step()
        if mistake != "no_zero_grad":
            optimizer.zero_grad(set_to_none=True)
        losses.append(total.item())
    return losses


@exercise("7.12", solution="train_steps")
def check_train_steps(train_steps):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small run several times slower when two threads contend
    try:
        for case in ASSEMBLE_CASES:
            _check_train_steps(train_steps, assemble_config(*case))
    finally:
        torch.set_num_threads(threads)


def _check_train_steps(train_steps, cfg: TrainConfig) -> None:
    k, n = cfg.accumulation_steps, cfg.max_steps
    what = (f"train_steps(gpt-tiny, {n * k} micro-batches, cfg: max_steps={n}, accumulation_steps={k}, "
            f"warmup={cfg.warmup}, grad_clip={cfg.grad_clip})")
    run = trainer_run(cfg)
    model = copy.deepcopy(run.start)
    batches = WatchedBatches(model, run.batches)
    try:
        got = train_steps(model, batches, cfg)
    except StopIteration:
        raise AssertionError(f"{what}: the loop asked for more than the {n * k} micro-batches there are "
                             "(max_steps · accumulation_steps): draw one per micro-batch of each step") from None
    if got is None:
        raise AssertionError(f"{what} returned None; did you forget `return losses`?")
    try:
        got = [float(x) for x in got]
    except (TypeError, ValueError):
        raise AssertionError(f"{what} should return a list of {n} numbers (each step's loss), "
                             f"got {got!r:.80}") from None
    if batches.drawn != n * k:
        raise AssertionError(f"{what}: the loop used {batches.drawn} of the {n * k} micro-batches; each of the "
                             f"{n} steps takes accumulation_steps={k} of them, in order")
    if len(got) != n:
        raise AssertionError(f"{what} returned {len(got)} losses, expected one per optimizer step: {n}")
    final = _weights(model)
    losses_ok = all(math.isclose(g, e, rel_tol=ASSEMBLE_LOSS_TOL) for g, e in zip(got, run.losses, strict=True))
    params_ok = _max_diff(final, run.params[-1]) <= ASSEMBLE_PARAM_TOL
    if losses_ok and params_ok:
        return
    if _max_diff(final, run.params[0]) == 0.0:
        raise AssertionError(f"{what}: the model's weights did not change; the loop must train the model it is "
                             "given (optimizer.step() on model.parameters())")
    hint = _observed_mistake(batches, run, cfg)
    if hint is None and not params_ok:
        hint = _simulated_mistake(final, run, cfg, skip_scale=_scale_seen_right(batches, run, cfg))
    if hint is None and params_ok:
        hint = _loss_mistake(got, run, cfg)
    if hint is None:
        hint = _where_it_differs(batches, final, run, cfg)
    raise AssertionError(f"{what}: {hint}")


def _observed_mistake(batches: WatchedBatches, run: TrainerRun, cfg: TrainConfig) -> str | None:
    """A mistake seen directly in the weights or gradients at a draw, or None."""
    k = cfg.accumulation_steps
    for i, weights in enumerate(batches.weights):
        step, micro = divmod(i, k)
        if micro and _max_diff(weights, batches.weights[i - micro]) > 0:
            return (f"the weights changed between micro-batches {micro - 1} and {micro} of step {step}: the "
                    "optimizer stepped every micro-batch; step once per optimizer step, after all "
                    f"accumulation_steps={k} backward passes")
    if k < 2 or batches.grads[1] is None:
        return None  # the gradient after the first micro-batch was not seen (one backward per step is allowed)
    scale = _first_micro_gradient(run, cfg)
    got = batches.grads[1]
    if _relative(got, [g * k for g in scale]) < 1e-4:
        return ASSEMBLE_MISTAKES["no_divide"]
    if _relative(got, [g / k for g in scale]) < 1e-4:
        return ASSEMBLE_MISTAKES["divide_twice"]
    return None


def _first_micro_gradient(run: TrainerRun, cfg: TrainConfig) -> list[Tensor]:
    """The gradient after step 0's first micro-batch in the Trainer: that of its loss / accumulation_steps."""
    model = copy.deepcopy(run.start)
    x, y = run.batches[0]
    _, loss = model(x, y)
    (loss / cfg.accumulation_steps).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _scale_seen_right(batches: WatchedBatches, run: TrainerRun, cfg: TrainConfig) -> bool:
    """Whether the gradient after the first micro-batch was seen, and is the Trainer's (the loss divided by k)."""
    if cfg.accumulation_steps < 2 or batches.grads[1] is None:
        return False
    return _relative(batches.grads[1], _first_micro_gradient(run, cfg)) < 1e-4


def _simulated_mistake(final: list[Tensor], run: TrainerRun, cfg: TrainConfig, skip_scale: bool) -> str | None:
    """The hint of the first mistake whose loop ends at the reader's weights, or None."""
    for mistake, hint in ASSEMBLE_MISTAKES.items():
        if skip_scale and mistake in ("no_divide", "divide_twice"):
            continue  # the gradient was seen to be scaled right: a wrong scale cannot be the reason
        if mistake == "warmup_from_zero" and cfg.warmup == 0:
            continue
        model = copy.deepcopy(run.start)
        assemble_reference(model, run.batches, cfg, mistake)
        if _max_diff(final, _weights(model)) <= ASSEMBLE_PARAM_TOL:
            return hint
    return None


def _loss_mistake(got: list[float], run: TrainerRun, cfg: TrainConfig) -> str | None:
    """The weights are right and the losses are not: how were they recorded?"""
    k = cfg.accumulation_steps
    last = [F.cross_entropy(*_logits_targets(run, s, k - 1, cfg)).item() for s in range(cfg.max_steps)]

    def close(values: list[float]) -> bool:
        return all(math.isclose(g, v, rel_tol=1e-4) for g, v in zip(got, values, strict=True))

    if k > 1 and close([k * e for e in run.losses]):
        return ("the weights are right, but each loss is k times the step's loss: return the mean over the "
                "micro-batches, the sum of loss / k, not the sum of the losses")
    if k > 1 and close(last):
        return "the weights are right, but each loss is the last micro-batch's: return the mean over all k of them"
    if k > 1 and close([v / k for v in last]):
        return ("the weights are right, but each loss is the last micro-batch's loss / k: add up loss / k over all "
                "k micro-batches")
    return ("the weights are right, but the losses differ: return each step's loss as a number, measured before "
            "its update: the mean of its micro-batches' losses")


def _logits_targets(run: TrainerRun, step: int, micro: int, cfg: TrainConfig) -> tuple[Tensor, Tensor]:
    """The logits (flattened) of one micro-batch under the weights before ``step``, and its targets."""
    model = copy.deepcopy(run.start)
    with torch.no_grad():
        for p, w in zip(model.parameters(), run.params[step], strict=True):
            p.copy_(w)
        x, y = run.batches[step * cfg.accumulation_steps + micro]
        logits, _ = model(x)
    return logits.flatten(0, 1), y.flatten()


def _where_it_differs(batches: WatchedBatches, final: list[Tensor], run: TrainerRun, cfg: TrainConfig) -> str:
    """No known mistake matches: say after which step the weights first differ, and what to look at."""
    k = cfg.accumulation_steps
    after = [batches.weights[s * k] for s in range(1, cfg.max_steps)] + [final]
    first = next((s for s, w in enumerate(after, 1) if _max_diff(w, run.params[s]) > ASSEMBLE_PARAM_TOL), None)
    where = (f"the weights agree with the Trainer's up to step {first - 1} and differ after step {first}"
             if first is not None else "the weights agree, the losses do not")
    worst = _max_diff(final, run.params[-1])
    return (f"{where} (largest difference {worst:.3g}); check the order: for each of the k micro-batches "
            "backward(loss / k); then clip the global norm, set the step's lr (warmup, cosine), optimizer.step(), "
            "zero_grad(); decay only nn.Linear weights")
