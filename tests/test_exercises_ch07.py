"""Exercise 7.12's check: it passes the solution, reports the starter as not attempted, and names typical mistakes.

The loop below is the solution of solutions/07_pretraining.md, written out
again with one typical mistake switched on by name; the check must name each
in a one-line message. The check's own reference loop (which makes the same
mistakes on purpose, to recognize them) is proven equal to the library's
``Trainer`` here, step for step and bit for bit. ``gpt-tiny`` on a few KB of
Tiny Shakespeare, one thread: seconds.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from exercise_helpers import fresh_starter as _fresh_starter
from exercise_helpers import one_line_error as _one_line_error
from exercise_helpers import passes_and_starter_not_attempted as _passes_and_starter_not_attempted
from exercise_helpers import solution_lines as _solution_lines
from exercise_helpers import starter as _starter
from torch import nn

from llmbook.exercises import ch07


def _train_steps(model, batches, cfg, mistake=None):
    """The solution's train_steps, with one typical mistake switched on by name."""
    embedding, linear = set(), set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.Embedding):
                embedding.add(id(p))
            elif isinstance(module, nn.Linear) and name == "weight":
                linear.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]
    if mistake == "decay_all":
        decays = [True for p in params]
    elif mistake == "decay_2d":
        decays = [p.dim() >= 2 for p in params]
    elif mistake == "decay_tied":  # nn.Linear weights, the tied head among them: the embedding is not left out
        decays = [id(p) in linear for p in params]
    elif mistake == "decay_norms_biases":
        decays = [id(p) not in embedding for p in params]
    else:
        decays = [id(p) in linear and id(p) not in embedding for p in params]
    wd = 0.0 if mistake == "no_decay" else cfg.weight_decay
    optimizer = torch.optim.AdamW(
        [{"params": [p for p, d in zip(params, decays, strict=True) if d], "weight_decay": wd},
         {"params": [p for p, d in zip(params, decays, strict=True) if not d], "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)

    def lr_at(step):
        floor = 0.0 if mistake == "floor_zero" else cfg.min_lr_ratio * cfg.lr
        warmup = 0 if mistake == "no_warmup" else cfg.warmup
        if mistake == "constant_lr":
            return cfg.lr
        if step < warmup:
            if mistake == "warmup_from_zero":
                return cfg.lr * step / warmup
            return cfg.lr * (step + 1) / (warmup + 1)
        if step > cfg.decay:
            return floor
        progress = (step - warmup) / max(cfg.decay - warmup, 1)
        return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))

    k = cfg.accumulation_steps
    losses = []
    for step in range(cfg.max_steps):
        total, last = 0.0, 0.0
        for _ in range(k):
            x, y = next(batches)
            if mistake == "zero_each_micro":
                optimizer.zero_grad()
            _, loss = model(x, y)
            last = loss.item()
            if mistake == "no_divide":
                loss.backward()
                total += loss.item() / k
            else:
                loss = loss / k / k if mistake == "divide_twice" else loss / k
                loss.backward()
                total += loss.item()
            if mistake == "clip_each_micro" and cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if mistake == "step_every_micro":
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                optimizer.step()
                optimizer.zero_grad()
        if cfg.grad_clip > 0 and mistake not in ("no_clip", "clip_each_micro"):
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step + 1 if mistake == "schedule_ahead" else step)
        if mistake != "step_every_micro":
            optimizer.step()
        if mistake != "no_zero_grad":
            optimizer.zero_grad()
        losses.append({"sum_losses": total * k, "last_loss": last}.get(mistake, total))
    return losses


def _one_backward(model, batches, cfg):
    """A correct variant: the step's k losses kept, one backward of their mean, clipping written out."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = list(model.parameters())
    decay = [p for p in params if id(p) in linear and id(p) not in embedding]
    rest = [p for p in params if not (id(p) in linear and id(p) not in embedding)]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    schedule = ch07.CosineSchedule(cfg.lr, cfg.warmup, cfg.decay, cfg.min_lr_ratio)
    losses, pending = [], []
    for i, (x, y) in enumerate(batches):  # a for loop over the iterator works as well as next()
        pending.append(model(x, y)[1])
        if len(pending) < cfg.accumulation_steps:
            continue
        loss = sum(pending) / len(pending)
        loss.backward()
        pending = []
        if cfg.grad_clip > 0:
            norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
            if norm > cfg.grad_clip:
                for p in params:
                    p.grad.mul_(cfg.grad_clip / (norm + 1e-6))
        for group in optimizer.param_groups:
            group["lr"] = schedule(i // cfg.accumulation_steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("case", ch07.ASSEMBLE_CASES)
def test_reference_is_the_trainer(case):
    """The check's reference loop gives the Trainer's losses and weights exactly, and so does the solution."""
    cfg = ch07.assemble_config(*case)
    run = ch07.trainer_run(cfg)
    for loop in (ch07.assemble_reference, _train_steps):
        model = copy.deepcopy(run.start)
        losses = loop(model, iter(run.batches), cfg)
        assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(losses, run.losses, strict=True)), loop
        # the reference runs the Trainer's own operations: bit for bit; torch's AdamW and clip_grad_norm_ are equal
        # here too, but another CPU may round one differently, and Adam can turn that into ~1e-5 (within the check)
        limit = 0.0 if loop is ch07.assemble_reference else ch07.ASSEMBLE_PARAM_TOL / 10
        assert ch07._max_diff(ch07._weights(model), run.params[-1]) <= limit, loop


def test_the_cases_train_and_clip_as_the_comments_say():
    """The losses fall; the clip of the first case acts at step 0 only, that of the second at most steps."""
    import tempfile

    for case, clipped in [(ch07.ASSEMBLE_CASES[0], lambda n: n[0] > 2.5 and max(n[1:]) < 2.5),
                          (ch07.ASSEMBLE_CASES[1], lambda n: sum(x > 1.5 for x in n) >= 4)]:
        cfg = ch07.assemble_config(*case)
        with ch07._rng_kept(), tempfile.TemporaryDirectory() as tmp:
            trainer = ch07._SmallTextTrainer(cfg, tmp, progress=False)
            steps = [trainer.train_step() for _ in range(cfg.max_steps)]
        norms = [norm.item() for _, norm in steps]
        assert clipped(norms), norms
        assert steps[-1][0].item() < steps[0][0].item() - 1.0


def test_the_mistakes_are_all_distinguishable():
    """In some case each mistake ends away from the Trainer's weights, and apart from every other mistake there."""
    confusable = {frozenset({"divide_twice", "no_clip"})}  # Adam ignores the scale: the gradient at a draw tells
    seen = {m: False for m in ch07.ASSEMBLE_MISTAKES}
    for case in ch07.ASSEMBLE_CASES:
        cfg = ch07.assemble_config(*case)
        run = ch07.trainer_run(cfg)
        ends = {}
        for mistake in ch07.ASSEMBLE_MISTAKES:
            model = copy.deepcopy(run.start)
            ch07.assemble_reference(model, run.batches, cfg, mistake)
            ends[mistake] = ch07._weights(model)
        for mistake, weights in ends.items():
            if ch07._max_diff(weights, run.params[-1]) <= ch07.ASSEMBLE_PARAM_TOL:
                continue  # this case cannot see it
            seen[mistake] = True
            for other, theirs in ends.items():
                if other != mistake and frozenset({mistake, other}) not in confusable:
                    diff = ch07._max_diff(weights, theirs)
                    assert diff > 3 * ch07.ASSEMBLE_PARAM_TOL or ch07._max_diff(
                        theirs, run.params[-1]) <= ch07.ASSEMBLE_PARAM_TOL, (case, mistake, other, diff)
    assert all(seen.values()), seen


def test_the_check_keeps_the_readers_random_state_and_threads():
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    threads = torch.get_num_threads()
    ch07.check_train_steps(_starter)
    assert torch.equal(torch.rand(3), want) and torch.get_num_threads() == threads


# ---------------------------------------------------------------------------------------------- 7.12


def test_solution_passes_and_starter_is_not_attempted(capsys):
    _passes_and_starter_not_attempted(capsys, ch07.check_train_steps, "7.12", (_train_steps,), (_starter,))


def test_other_correct_loops_pass():
    """One backward per step, clipping by hand, a for loop over the batches, zeroed (not None) gradients."""
    ch07.check_train_steps.strict(_one_backward)


@pytest.mark.parametrize(("mistake", "hint"), [
    ("no_zero_grad", "the gradients were never cleared"),
    ("zero_each_micro", "cleared before each micro-batch"),
    ("no_divide", "not divided by accumulation_steps"),
    ("divide_twice", "divided by accumulation_steps twice"),
    ("clip_each_micro", "clipped before accumulation finished"),
    ("no_clip", "the gradients were not clipped"),
    ("step_every_micro", "the optimizer stepped every micro-batch"),
    ("schedule_ahead", "the schedule is one step ahead"),
    ("no_warmup", "there is no warmup"),
    ("warmup_from_zero", "warmup starts at zero"),
    ("constant_lr", "the learning rate stayed at cfg.lr"),
    ("floor_zero", "the cosine decays to zero"),
    ("decay_all", "weight decay was applied to every parameter"),
    ("decay_2d", "the embeddings were decayed"),
    ("decay_tied", "the tied lm_head.weight was decayed"),
    ("decay_norms_biases", "the biases and norm gains were decayed"),
    ("no_decay", "no weight decay at all"),
    ("sum_losses", "k times the step's loss"),
    ("last_loss", "the last micro-batch's"),
])
def test_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch07.check_train_steps, functools.partial(_train_steps, mistake=mistake))
    assert hint in message, message


def test_untrained_model_and_wrong_counts_are_named():
    def no_update(model, batches, cfg):
        k = cfg.accumulation_steps
        return [sum(model(*next(batches))[1].item() / k for _ in range(k)) for _ in range(cfg.max_steps)]

    def greedy(model, batches, cfg):
        list(batches)
        return _train_steps(model, batches, cfg)

    def one_per_step(model, batches, cfg):
        return [model(*next(batches))[1].item() for _ in range(cfg.max_steps)]

    assert "the model's weights did not change" in _one_line_error(ch07.check_train_steps, no_update)
    assert "more than the 12 micro-batches" in _one_line_error(ch07.check_train_steps, greedy)
    assert "used 6 of the 12 micro-batches" in _one_line_error(ch07.check_train_steps, one_per_step)


def test_a_constant_answer_fails_in_one_line():
    _one_line_error(ch07.check_train_steps, lambda *args, **kwargs: 0)


def test_the_starter_is_generated_from_the_solutions():
    """exercises/07 is build_pdf's starter of solutions/07, and 7.12's starter keeps its steps in comments."""
    starter = _fresh_starter("07_pretraining")
    stub = starter[starter.index("def train_steps(model, batches, cfg):"):]
    stub = stub[:stub.index("```")]
    assert stub.count("# ") >= 8 and stub.rstrip().endswith('raise NotImplementedError("your solution goes here")')


def test_the_solution_is_the_readers_own_30_lines():
    code = _solution_lines("07_pretraining", "## Exercise 7.12")
    assert len(code) >= 30, len(code)
    assert not any("llmbook" in line for line in code)  # the library's optimizer, schedule and trainer check it
