"""Checks for Chapter 7's exercises: the cosine schedule, an AdamW step, gradient clipping, a stable loss, a loop.

The expected values come from ``llmbook.schedule`` and from PyTorch itself
(``torch.optim.AdamW``, ``torch.nn.utils.clip_grad_norm_``,
``F.cross_entropy``), the same references the chapter proves the library
against. When an answer is wrong, the check tries to name the usual mistake
(warmup that starts at zero, no floor, Adam with L2 instead of AdamW, no bias
correction, clipping each tensor on its own, a softmax that overflows, ...)
by comparing it with the wrong answers those mistakes produce.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from llmbook import loader
from llmbook.exercises import exercise
from llmbook.exercises.tensors import random_tensor as _random
from llmbook.model import GPT
from llmbook.optim import AdamW, clip_grad_norm, param_groups
from llmbook.schedule import CosineSchedule, set_lr

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
