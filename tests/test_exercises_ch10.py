"""Chapter 10's exercise checks: each passes the solution, reports the starter as not attempted, names typical mistakes.

The solutions below are those of solutions/10_preference_tuning.md, written
out again with one typical mistake switched on by name; the check must name
each. The GRPO step's solution is written here independently of the check's
reference step (``ch10.reference_grpo_step``), so the test is not the check
compared with itself. Tiny inputs and a ~120k-parameter model: seconds.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from exercise_helpers import fresh_starter as _fresh_starter
from exercise_helpers import one_line_error as _one_line_error
from exercise_helpers import starter as _starter

from llmbook.exercises import ch10

# ---------------------------------------------------------------------------------------------- references


def test_references_are_the_library():
    """The checks compare with llmbook's functions (the chapter proves those equal to TRL's)."""
    from llmbook.posttrain import dpo, grpo, reward_model

    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(7, generator=g), torch.randn(7, generator=g)
    assert torch.equal(ch10.reference_bt_loss(rc, rr), reward_model.bradley_terry_loss(rc, rr))
    logps = [-(5 + 60 * torch.rand(6, generator=g)) for _ in range(4)]
    for beta in ch10.DPO_BETAS:
        for got, want in zip(ch10.reference_dpo_loss(*logps, beta=beta), dpo.dpo_loss(*logps, beta=beta), strict=True):
            assert torch.equal(got, want)
    rewards = torch.tensor([[0.0, 1.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    assert torch.equal(ch10.reference_group_advantages(rewards), grpo.group_advantages(rewards))
    assert ch10._library_std_is_unbiased()  # the hint about the std names the library's choice


def test_grpo_mistakes_are_one_change_from_the_library_formula():
    """The mistakes' formula, with no mistake switched on, is grpo.grpo_loss: each mistake is that one change."""
    from llmbook.posttrain import grpo

    g = torch.Generator().manual_seed(1)
    n, T = 6, 9
    logp, old, ref = (-3 * torch.rand(n, T, generator=g) for _ in range(3))
    mask = torch.rand(n, T, generator=g) > 0.3
    mask[:, 0] = True
    adv = torch.randn(n, 1, generator=g)
    for beta, clip_eps in ((0.04, 0.2), (0.5, 0.05)):
        want = grpo.grpo_loss(logp, old, ref, adv.view(-1), mask, clip_eps=clip_eps, kl_beta=beta)[0]
        assert torch.allclose(ch10._grpo_loss(logp, old, ref, adv, mask, beta, clip_eps, mistake="formula"), want)
        assert torch.equal(ch10._grpo_loss(logp, old, ref, adv, mask, beta, clip_eps), want)


def test_tiny_rollouts_are_deterministic_and_well_formed(seed_and_one_thread):
    policy, reference, rollouts = ch10.tiny_rollouts()
    again = ch10.tiny_rollouts()[2]
    assert torch.equal(rollouts.ids, again.ids) and torch.equal(rollouts.rewards, again.rewards)
    n, T = rollouts.ids.shape
    assert rollouts.rewards.shape == (4, 4) and n == 16 and rollouts.mask.shape == (n, T - 1)
    lengths = rollouts.mask.sum(dim=1)
    assert bool((lengths >= 1).all()) and bool((lengths <= ch10.MAX_NEW).all())
    assert not bool(rollouts.mask[:, :ch10.PROMPT_LEN - 1].any())  # prompt targets carry nothing
    finished = torch.tensor([int(rollouts.ids[i, ch10.PROMPT_LEN + lengths[i] - 1]) in ch10.STOP_IDS
                             for i in range(n)], dtype=torch.float32)
    assert torch.equal(finished.view(4, 4), rollouts.rewards)  # reward 1 exactly when the answer ended
    assert ch10.zero_variance_groups(rollouts.rewards) >= 1  # the check sees a group with nothing to learn
    assert not any(p.requires_grad for p in reference.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), reference.parameters(), strict=True))


def test_grpo_mistakes_all_change_the_step(seed_and_one_thread):
    """Each mistake the check recognises changes the losses or the parameters: none is a no-op in these settings."""
    policy, reference, rollouts = ch10.tiny_rollouts()
    for beta, clip_eps, iterations, lr in ch10.GRPO_CASES[:1]:  # the check's first case already tells them apart
        want, want_params, _ = ch10._run(ch10.reference_grpo_step, policy, reference, rollouts, beta, clip_eps,
                                         iterations, lr)
        for mistake in ch10.GRPO_MISTAKES:
            got, params, _ = ch10._run(ch10.reference_grpo_step, policy, reference, rollouts, beta, clip_eps,
                                       iterations, lr, mistake=mistake)
            assert not ch10._params_close(params, want_params), (mistake, beta)


# ---------------------------------------------------------------------------------------------- 10.1


def _dpo(pc, pr, rc, rr, beta=0.1, mistake=None):
    """The solution's dpo_loss, with one typical mistake switched on by name."""
    chosen, rejected = pc - rc, pr - rr
    if mistake == "no_reference":
        chosen, rejected = pc, pr
    b = 1.0 if mistake == "no_beta" else beta
    margin = b * (chosen - rejected)
    if mistake == "sign":
        margin = -margin
    if mistake == "log_of_sigmoid":
        losses = -torch.log(torch.sigmoid(margin))
    elif mistake == "likelihood":
        losses = F.logsigmoid(margin)
    elif mistake == "no_log":
        losses = -torch.sigmoid(margin)
    else:
        losses = -F.logsigmoid(margin)
    if mistake == "mean":
        losses = losses.mean()
    elif mistake == "sum":
        losses = losses.sum()
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    if mistake == "rewards_no_beta":
        chosen_rewards, rejected_rewards = pc - rc, pr - rr
    if mistake == "policy_detached":
        losses = losses.detach()
    if mistake == "one_tensor":
        return losses
    if mistake == "rewards_attached":
        return losses, chosen_rewards, rejected_rewards
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def test_dpo_solution_passes_and_starter_is_not_attempted(capsys):
    ch10.check_dpo_loss(_dpo)
    ch10.check_dpo_loss(_starter)
    out = capsys.readouterr().out
    assert "Exercise 10.1: all checks passed" in out and "Exercise 10.1: not attempted yet" in out
    with pytest.raises(NotImplementedError):
        ch10.check_dpo_loss.strict(_starter)


@pytest.mark.parametrize(("mistake", "hint"), [
    ("no_beta", "beta is missing"),
    ("sign", "the sign is reversed (rejected minus chosen)"),
    ("no_reference", "the reference is missing"),
    ("likelihood", "the log-likelihood, not its negative"),
    ("no_log", "the loss is minus its log"),
    ("log_of_sigmoid", "F.logsigmoid(x) computes the same value stably"),
    ("mean", "that is their mean"),
    ("sum", "that is their sum"),
    ("rewards_no_beta", "multiply by beta"),
    ("rewards_attached", "detach them"),
    ("policy_detached", "do not depend on the policy's log-probs"),
    ("one_tensor", "return three"),
])
def test_dpo_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch10.check_dpo_loss, functools.partial(_dpo, mistake=mistake))
    assert hint in message, message


# ---------------------------------------------------------------------------------------------- 10.2


def _advantages(rewards, eps=1e-4, mistake=None):
    """The solution's group_advantages, with one typical mistake switched on by name."""
    if mistake == "whole_batch":
        return (rewards - rewards.mean()) / (rewards.std() + eps)
    dim = 0 if mistake == "dim0" else 1
    centred = rewards - rewards.mean(dim=dim, keepdim=True)
    if mistake == "no_scale":
        return centred
    if mistake == "eps_in_sqrt":
        return centred / (rewards.var(dim=1, keepdim=True) + eps).sqrt()
    std = rewards.std(dim=dim, keepdim=True, unbiased=mistake != "population")
    if mistake == "no_eps":
        return centred / std
    return centred / (std + (1e-8 if mistake == "fixed_eps" else eps))


def test_advantages_solution_passes_and_starter_is_not_attempted(capsys):
    ch10.check_group_advantages(_advantages)
    ch10.check_group_advantages(_starter)
    out = capsys.readouterr().out
    assert "Exercise 10.2: all checks passed" in out and "Exercise 10.2: not attempted yet" in out


@pytest.mark.parametrize(("mistake", "hint"), [
    ("whole_batch", "normalised over the whole batch"),
    ("population", "wrong std: llmbook (like TRL) uses the sample std"),
    ("no_eps", "add eps to the std"),
    ("dim0", "normalised over dim=0"),
    ("no_scale", "centred but not scaled"),
    ("eps_in_sqrt", "not inside the square root"),
    ("fixed_eps", "not the eps argument"),
])
def test_advantages_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch10.check_group_advantages, functools.partial(_advantages, mistake=mistake))
    assert hint in message, message


# ---------------------------------------------------------------------------------------------- 10.3


def _bt_probability(r_a, r_b, mistake=None):
    if mistake == "swapped":
        return torch.sigmoid(r_b - r_a)
    if mistake == "ratio":
        return r_a / (r_a + r_b)
    if mistake == "exp":
        return torch.exp(r_a) / (torch.exp(r_a) + torch.exp(r_b))
    return torch.sigmoid(r_a - r_b)


def _bt_nll(r_chosen, r_rejected, mistake=None):
    if mistake == "sum":
        return -F.logsigmoid(r_chosen - r_rejected).sum()
    if mistake == "no_minus":
        return F.logsigmoid(r_chosen - r_rejected).mean()
    if mistake == "swapped":
        return -F.logsigmoid(r_rejected - r_chosen).mean()
    if mistake == "log_of_sigmoid":
        return -torch.log(torch.sigmoid(r_chosen - r_rejected)).mean()
    if mistake == "per_pair":
        return -F.logsigmoid(r_chosen - r_rejected)
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def test_bradley_terry_solution_passes_and_starter_is_not_attempted(capsys):
    ch10.check_bradley_terry(_bt_probability, _bt_nll)
    ch10.check_bradley_terry(_starter, _starter)
    ch10.check_bradley_terry(_bt_probability, _starter)  # half done is not attempted, not a failure
    out = capsys.readouterr().out
    assert out.count("Exercise 10.3: not attempted yet") == 2 and "Exercise 10.3: all checks passed" in out


@pytest.mark.parametrize(("mistake", "hint"), [
    ("swapped", "that is P(b beats a)"),
    ("ratio", "Bradley and Terry's form for positive strengths"),
    ("exp", "exp(100) overflows float32"),
])
def test_bt_probability_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch10.check_bradley_terry, functools.partial(_bt_probability, mistake=mistake), _bt_nll)
    assert hint in message, message


@pytest.mark.parametrize(("mistake", "hint"), [
    ("sum", "that is the sum over the pairs"),
    ("no_minus", "that is the log-likelihood"),
    ("swapped", "chosen and rejected are swapped"),
    ("log_of_sigmoid", "F.logsigmoid(x) computes the same value stably"),
    ("per_pair", "should return a scalar tensor, the mean over the pairs"),
])
def test_bt_nll_mistakes_are_named(mistake, hint):
    message = _one_line_error(ch10.check_bradley_terry, _bt_probability, functools.partial(_bt_nll, mistake=mistake))
    assert hint in message, message


# ---------------------------------------------------------------------------------------------- 10.4


def _per_token_logps(model, ids, mistake=None):
    logits, _ = model(ids[:, :-1])
    targets = ids[:, :-1] if mistake == "no_shift" else ids[:, 1:]
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _objective(logp, old_logp, ref_logp, advantages, mask, beta, clip_eps, mistake=None):
    ratio = torch.exp(logp - (logp if mistake == "old_not_detached" else old_logp))
    clipped = ratio if mistake == "no_clip" else torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    d = logp - ref_logp if mistake == "kl_direction" else ref_logp - logp
    kl = torch.exp(d) - d - 1
    per_token = surrogate + beta * kl if mistake == "kl_sign" else surrogate - beta * kl
    mask = torch.ones_like(mask, dtype=torch.float32) if mistake == "no_mask" else mask.float()
    if mistake == "token_mean":
        objective = (per_token * mask).sum() / mask.sum()
    else:
        objective = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    return objective if mistake == "loss_sign" else -objective


def _grpo_step(policy, reference, optimizer, rollouts, beta=0.04, clip_eps=0.2, iterations=1, mistake=None):
    """The solution's grpo_step, with one typical mistake switched on by name."""
    P, G = rollouts.rewards.shape
    if G < 2 and mistake != "single_group_accepted":
        raise ValueError("GRPO needs a group of at least 2 answers per prompt to compare them")
    ids, mask = rollouts.ids, rollouts.mask
    if mistake == "old_graph":  # computed once before the loop, but with its graph
        old_logp = _per_token_logps(policy, ids, mistake)
    else:
        with torch.no_grad():
            old_logp = _per_token_logps(policy, ids, mistake)
    if mistake == "ref_grad":  # the reference unfrozen and scored with gradients: the loss reaches it
        for p in reference.parameters():
            p.requires_grad_(True)
        ref_logp = _per_token_logps(reference, ids, mistake)
    else:
        with torch.no_grad():
            ref_logp = _per_token_logps(reference, ids, mistake)
    advantages = _advantages(rollouts.rewards, mistake="whole_batch" if mistake == "batch_advantages" else None)
    advantages = advantages.reshape(-1, 1)
    losses = []
    for _ in range(iterations):
        logp = _per_token_logps(policy, ids, mistake)
        loss = _objective(logp, old_logp, ref_logp, advantages, mask, beta, clip_eps, mistake)
        if mistake != "no_zero_grad":
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if mistake == "one_loss":
        return losses[-1]
    return losses


def test_grpo_solution_passes_and_starter_is_not_attempted(capsys, seed_and_one_thread):
    ch10.check_grpo_step(_grpo_step)
    ch10.check_grpo_step(_starter)
    out = capsys.readouterr().out
    assert "Exercise 10.4: all checks passed" in out and "Exercise 10.4: not attempted yet" in out
    with pytest.raises(NotImplementedError):
        ch10.check_grpo_step.strict(_starter)


@pytest.mark.parametrize(("mistake", "hint"), [
    ("no_mask", "the response mask is missing"),
    ("old_not_detached", "old log-prob is the current one, not detached"),
    ("loss_sign", "the loss has the wrong sign"),
    ("kl_sign", "the KL penalty has the wrong sign"),
    ("kl_direction", "the k3 estimator is reversed"),
    ("token_mean", "tokens are averaged over the whole batch"),
    ("no_clip", "the ratio is not clipped"),
    ("batch_advantages", "the advantages are normalised over the whole batch"),
    ("no_shift", "the log-probs are not shifted"),
    ("no_zero_grad", "the gradients are not zeroed between updates"),
    ("ref_grad", "compute them under torch.no_grad()"),
    ("old_graph", "backward through the graph a second time"),
    ("single_group_accepted", "raise a ValueError"),
    ("one_loss", "returned one number"),
])
@pytest.mark.filterwarnings(r"ignore:std\(\):UserWarning")  # a group of one's std, in the check
def test_grpo_mistakes_are_named(mistake, hint, seed_and_one_thread):
    message = _one_line_error(ch10.check_grpo_step, functools.partial(_grpo_step, mistake=mistake))
    assert hint in message, message


def test_grpo_step_that_trains_the_reference_is_caught(seed_and_one_thread):
    def step(policy, reference, optimizer, rollouts, **kwargs):
        losses = _grpo_step(policy, reference, optimizer, rollouts, **kwargs)
        with torch.no_grad():
            next(reference.parameters()).add_(0.01)  # e.g. the reference's parameters in the optimizer
        return losses

    message = _one_line_error(ch10.check_grpo_step, step)
    assert "the reference model's parameters changed" in message


@pytest.mark.parametrize("check", [ch10.check_dpo_loss, ch10.check_group_advantages, ch10.check_grpo_step])
def test_a_constant_answer_fails_in_one_line(check):
    _one_line_error(check, lambda *args, **kwargs: 0)


def test_constant_bradley_terry_answers_fail_in_one_line():
    _one_line_error(ch10.check_bradley_terry, lambda *args: 0, _bt_nll)
    _one_line_error(ch10.check_bradley_terry, _bt_probability, lambda *args: torch.tensor(0.0))


def test_the_starter_is_generated_from_the_solutions():
    """exercises/10 is build_pdf's starter of solutions/10 (the build's own test covers chapters in book.toml)."""
    starter = _fresh_starter("10_preference_tuning")
    assert starter.count('raise NotImplementedError("your solution') == 8
