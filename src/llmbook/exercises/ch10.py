"""Checks for Chapter 10's exercises: the DPO loss, group-normalized advantages, Bradley–Terry, a GRPO step.

Each reader's function is compared with the library on random inputs:
``llmbook.posttrain.dpo.dpo_loss`` (itself proven equal to TRL's DPO loss in
``tests/test_dpo.py``), ``llmbook.posttrain.grpo.group_advantages`` and
``llmbook.posttrain.reward_model.bradley_terry_loss`` (equal to TRL's
RewardTrainer loss in ``tests/test_reward_model.py``).

The GRPO step is checked by running it: the reader's step and the reference
step (below: the library's ``group_advantages`` and ``grpo_loss``, then one
optimizer step per update) update two copies of the same tiny policy from the
same rollouts with plain SGD, so every difference in the gradient shows in the
parameters. A wrong answer is compared with what the
usual mistakes compute (no response mask, an old log-prob that is not
detached, the loss's sign, the KL estimator's direction, tokens averaged over
the batch instead of per sequence, ...) and the check names the mistake.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmbook.exercises import exercise
from llmbook.generate import generate
from llmbook.model import GPT
from llmbook.posttrain import dpo, grpo
from llmbook.posttrain.reward_model import bradley_terry_loss


def _close(a, b, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
            and bool(torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol, equal_nan=False)))


def _max_error(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.shape == b.shape else float("inf")


# ---------------------------------------------------------------------------
# the library's functions, the checks' references
# ---------------------------------------------------------------------------


def reference_dpo_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float = 0.1):
    """``llmbook.posttrain.dpo.dpo_loss`` (sigmoid loss): ``(losses, chosen_rewards, rejected_rewards)``."""
    return dpo.dpo_loss(pc, pr, rc, rr, beta=beta)


def reference_group_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """``llmbook.posttrain.grpo.group_advantages``: ``(P, G)`` rewards -> ``(P, G)`` advantages."""
    return grpo.group_advantages(rewards, eps=eps)


def reference_bt_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """``llmbook.posttrain.reward_model.bradley_terry_loss``: the mean over the pairs."""
    return bradley_terry_loss(r_chosen, r_rejected)


# ---------------------------------------------------------------------------
# 10.1 the DPO loss
# ---------------------------------------------------------------------------

DPO_BETAS = (0.1, 0.5)


def _logps(n: int, g: torch.Generator) -> list[Tensor]:
    """Four (n,) tensors of summed response log-probabilities: negative, tens of nats, as real ones are."""
    return [-(5 + 60 * torch.rand(n, generator=g, dtype=torch.float64)).float() for _ in range(4)]


def _dpo_variants(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> list[tuple[Tensor, str]]:
    margin = (pc - rc) - (pr - rr)
    return [
        (-F.logsigmoid(margin), "beta is missing: the loss is -log σ(β · margin), with the margin multiplied by β"),
        (-F.logsigmoid(-beta * margin), "the sign is reversed (rejected minus chosen): the margin is "
                                        "(π_c - ref_c) - (π_r - ref_r), and the loss falls as it grows"),
        (-F.logsigmoid(beta * (pc - pr)), "the reference is missing: DPO's margin is of log-ratios to the frozen "
                                          "reference, β [(π_c - ref_c) - (π_r - ref_r)], not of the policy's "
                                          "log-probs alone"),
        (F.logsigmoid(beta * margin), "the loss is the log-likelihood, not its negative: -log σ(β · margin)"),
        (-torch.sigmoid(beta * margin), "σ(β · margin) is a probability: the loss is minus its log"),
        (-F.logsigmoid(beta * ((pc - rc) + (pr - rr))), "the rejected log-ratio is added: it is subtracted"),
    ]


def _as_triple(result, what: str) -> tuple[Tensor, Tensor, Tensor]:
    if result is None:
        raise AssertionError(f"{what} returned None; did you forget `return losses, chosen_rewards, rejected_rewards`?")
    if isinstance(result, Tensor):
        raise AssertionError(f"{what} returned one tensor of shape {tuple(result.shape)}; return three, as TRL and "
                             "llmbook do: (losses, chosen_rewards, rejected_rewards)")
    if not isinstance(result, (tuple, list)) or len(result) != 3 or not all(isinstance(t, Tensor) for t in result):
        raise AssertionError(f"{what} should return three tensors (losses, chosen_rewards, rejected_rewards), got "
                             f"{type(result).__name__}: {result!r:.60}")
    return tuple(result)


@exercise("10.1", solution="dpo_loss")
def check_dpo_loss(dpo_loss):
    g = torch.Generator().manual_seed(10)
    for beta in DPO_BETAS:
        n = 8
        inputs = _logps(n, g)
        what = f"dpo_loss(4 tensors of {n} log-probs, beta={beta})"
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        losses, chosen, rejected = _as_triple(dpo_loss(*leaves, beta=beta), what)
        want, want_c, want_r = reference_dpo_loss(*inputs, beta=beta)
        if losses.shape != (n,):
            hint = ""
            if losses.dim() == 0:
                scalar = losses.detach()
                if _close(scalar, want.sum()):
                    hint = "; that is their sum"
                elif _close(scalar, want.mean()):
                    hint = "; that is their mean"
                hint += (": return the per-pair losses, shape (B,), not reduced; the trainer takes their mean (a "
                         "sum would make the step size grow with the batch)")
            raise AssertionError(f"{what}: losses has shape {tuple(losses.shape)}, expected ({n},), one per "
                                 f"pair{hint}")
        if not _close(losses.detach(), want):
            hint = next((f"; {h}" for wrong, h in _dpo_variants(*inputs, beta) if _close(losses.detach(), wrong)), "")
            raise AssertionError(f"{what}: the losses differ from llmbook's dpo_loss by up to "
                                 f"{_max_error(losses.detach(), want):.3g}{hint}")
        for name, got, expected, policy, ref in (("chosen_rewards", chosen, want_c, inputs[0], inputs[2]),
                                                 ("rejected_rewards", rejected, want_r, inputs[1], inputs[3])):
            if got.requires_grad:
                raise AssertionError(f"{what}: {name} requires a gradient: the implicit rewards are for logging, "
                                     "detach them (.detach()) so they never enter the loss's graph")
            if not _close(got, expected):
                hint = ""
                if _close(got, policy - ref):
                    hint = "; multiply by beta: the implicit reward is β (log π - log π_ref)"
                elif _close(got, beta * policy):
                    hint = "; subtract the reference: the implicit reward is β (log π - log π_ref)"
                raise AssertionError(f"{what}: {name} differ from llmbook's by up to "
                                     f"{_max_error(got, expected):.3g}{hint}")
        if not losses.requires_grad:
            raise AssertionError(f"{what}: the losses do not depend on the policy's log-probs (no gradient): do not "
                                 "detach the policy's log-probs inside the loss")
        weights = torch.rand(n, generator=g)
        (losses * weights).sum().backward()
        ref_leaves = [t.clone().requires_grad_(True) for t in inputs]
        (reference_dpo_loss(*ref_leaves, beta=beta)[0] * weights).sum().backward()
        for i, name in enumerate(("policy_chosen_logps", "policy_rejected_logps")):
            got, expected = leaves[i].grad, ref_leaves[i].grad
            if got is None or not _close(got, expected):
                raise AssertionError(f"{what}: the gradient with respect to {name} differs from llmbook's; compute "
                                     "the losses from the tensors given, without .detach() or .item()")

    # a margin of -200 nats after beta: the policy prefers the rejected answer by far. -log σ(-200) = 200.
    # pair 1: the policy finds its chosen answer 2,000 nats less likely than the reference does
    big = [torch.tensor([-10.0, -2010.0]), *(torch.tensor([-10.0, -10.0]) for _ in range(3))]
    what = "dpo_loss with a margin of β · (-2000) = -200 (beta=0.1)"
    losses = _as_triple(dpo_loss(*big, beta=0.1), what)[0].detach()
    want = reference_dpo_loss(*big, beta=0.1)[0]
    if not bool(torch.isfinite(losses).all()):
        raise AssertionError(f"{what}: the loss is {losses.tolist()}, not finite (expected {want.tolist()}): "
                             "torch.log(torch.sigmoid(x)) underflows to log(0) = -inf once σ(x) rounds to 0 "
                             "(x < -104 in float32); F.logsigmoid(x) computes the same value stably")
    if not _close(losses, want):
        raise AssertionError(f"{what}: losses {losses.tolist()}, expected {want.tolist()}")


# ---------------------------------------------------------------------------
# 10.2 group-normalized advantages
# ---------------------------------------------------------------------------


def _std_name(unbiased: bool) -> str:
    return ("the sample std (divides by G - 1: torch.std's default, unbiased=True)" if unbiased
            else "the population std (divides by G: torch.std(..., unbiased=False), or correction=0)")


def _library_std_is_unbiased() -> bool:
    r = torch.tensor([[0.0, 1.0, 3.0, 4.0]])
    return _close(reference_group_advantages(r), (r - r.mean()) / (r.std() + 1e-4))


def _advantage_variants(r: Tensor, eps: float) -> list[tuple[Tensor, str]]:
    unbiased = _library_std_is_unbiased()
    centred = r - r.mean(dim=1, keepdim=True)
    whole = (r - r.mean()) / (r.std(unbiased=unbiased) + eps)
    return [
        (whole, "normalised over the whole batch: the mean and std are per group (per prompt, dim=1), so each "
                "sample is compared with the other answers to its own prompt"),
        (centred / (r.std(dim=1, keepdim=True, unbiased=not unbiased) + eps),
         f"wrong std: llmbook (like TRL) uses {_std_name(unbiased)}, you used {_std_name(not unbiased)}"),
        (centred, "the advantages are centred but not scaled: divide by the group's std + eps"),
        ((r - r.mean(dim=0, keepdim=True)) / (r.std(dim=0, keepdim=True, unbiased=unbiased) + eps),
         "normalised over dim=0 (across prompts): a group is a row, (P, G), so reduce over dim=1"),
        (centred / (r.std(dim=1, keepdim=True, unbiased=unbiased) + 1e-8),
         f"eps is missing, or not the eps argument ({eps}): add eps to the std"),
        (centred / (r.var(dim=1, keepdim=True, unbiased=unbiased) + eps).sqrt(), "eps is added to the std, "
                                                                                 "not inside the square root"),
    ]


@exercise("10.2", solution="group_advantages")
def check_group_advantages(group_advantages):
    g = torch.Generator().manual_seed(102)
    cases = [
        ("pass/fail rewards, 4 prompts x 8 samples, one group all 1", torch.tensor(
            [[1, 0, 0, 1, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1], [1, 1, 0, 1, 1, 1, 0, 1]],
            dtype=torch.float32)),
        ("graded rewards, 3 prompts x 4 samples", torch.rand(3, 4, generator=g)),
        ("graded rewards, 5 prompts x 2 samples, one group with equal rewards",
         torch.cat([torch.rand(4, 2, generator=g) * 3, torch.full((1, 2), 0.25)])),
        ("rewards on a scale of 100, 2 prompts x 16 samples", 100 * torch.rand(2, 16, generator=g)),
    ]
    for what, rewards in cases:
        for eps in (1e-4, 1e-2):
            call = f"group_advantages({what}, eps={eps})"
            got = group_advantages(rewards.clone(), eps=eps)
            if got is None:
                raise AssertionError(f"{call} returned None; did you forget `return`?")
            if not isinstance(got, Tensor) or got.shape != rewards.shape:
                raise AssertionError(f"{call} should return a tensor of shape {tuple(rewards.shape)} (one advantage "
                                     f"per sample), got {type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
            want = reference_group_advantages(rewards, eps=eps)
            if not bool(torch.isfinite(got).all()):
                raise AssertionError(f"{call}: the advantages hold nan or inf; a group whose rewards are all equal "
                                     "has std 0, and (r - mean) / std is 0 / 0: add eps to the std, so such a "
                                     "group gets advantage 0 (it teaches nothing)")
            if not _close(got, want, atol=1e-5):
                hint = next((f"; {h}" for wrong, h in _advantage_variants(rewards, eps) if _close(got, wrong)), "")
                raise AssertionError(f"{call}: differs from llmbook's group_advantages by up to "
                                     f"{_max_error(got, want):.3g}{hint}")


# ---------------------------------------------------------------------------
# 10.3 the Bradley–Terry model
# ---------------------------------------------------------------------------


def _bt_probability_hint(got: Tensor, a: Tensor, b: Tensor) -> str:
    for wrong, hint in [
        (torch.sigmoid(b - a), "that is P(b beats a): P(a beats b) = σ(r_a - r_b)"),
        (a / (a + b), "r_a / (r_a + r_b) is Bradley and Terry's form for positive strengths; a reward model's "
                      "scores are logits, any sign: use exp(r_a) / (exp(r_a) + exp(r_b)) = σ(r_a - r_b)"),
        (torch.sigmoid(a), "σ(r_a) ignores r_b: P(a beats b) = σ(r_a - r_b) depends on the difference only"),
    ]:
        if _close(got, wrong):
            return f"; {hint}"
    return ""


def _bt_nll_variants(rc: Tensor, rr: Tensor) -> list[tuple[Tensor, str]]:
    nll = -F.logsigmoid(rc - rr)
    return [
        (nll.sum(), "that is the sum over the pairs: take the mean, so the loss does not grow with the batch"),
        (-nll.mean(), "that is the log-likelihood: the loss is its negative, -mean log σ(r_chosen - r_rejected)"),
        (-F.logsigmoid(rr - rc).mean(), "chosen and rejected are swapped: the loss is -log σ(r_chosen - r_rejected)"),
        (-torch.sigmoid(rc - rr).mean(), "σ(r_c - r_r) is a probability: the loss is minus its log"),
    ]


@exercise("10.3", solution="bt_nll")
def check_bradley_terry(bt_probability, bt_nll):
    g = torch.Generator().manual_seed(103)
    a, b = 3 * torch.randn(12, generator=g), 3 * torch.randn(12, generator=g)
    got = bt_probability(a.clone(), b.clone())
    if got is None:
        raise AssertionError("bt_probability returned None; did you forget `return`?")
    if not isinstance(got, Tensor) or got.shape != a.shape:
        raise AssertionError(f"bt_probability(r_a, r_b) on tensors of shape {tuple(a.shape)} should return a "
                             f"tensor of that shape, got {type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
    want = torch.sigmoid(a - b)
    if not _close(got, want):
        raise AssertionError(f"bt_probability(r_a, r_b) differs from σ(r_a - r_b) by up to "
                             f"{_max_error(got, want):.3g}{_bt_probability_hint(got, a, b)}")
    sym = bt_probability(b, a)
    if not _close(got + sym, torch.ones_like(got)):
        raise AssertionError("bt_probability(r_a, r_b) + bt_probability(r_b, r_a) should be 1: one of the two wins")
    shifted = bt_probability(a + 50.0, b + 50.0)
    if not _close(shifted, want):
        raise AssertionError("bt_probability(r_a + 50, r_b + 50) differs from bt_probability(r_a, r_b): only the "
                             "difference of the rewards matters (compute σ(r_a - r_b), not exp(r_a) / (...))")
    far = bt_probability(torch.tensor([100.0, -100.0]), torch.tensor([-100.0, 100.0]))
    if not bool(torch.isfinite(far).all()) or not _close(far, torch.tensor([1.0, 0.0])):
        raise AssertionError(f"bt_probability([100, -100], [-100, 100]) gave {far.tolist()}, expected [1.0, 0.0]: "
                             "exp(100) overflows float32 (inf / inf = nan); σ(r_a - r_b) does not")

    for what, (rc, rr) in [
        ("16 random pairs", (torch.randn(16, generator=g), torch.randn(16, generator=g))),
        ("5 pairs on a scale of 10", (10 * torch.randn(5, generator=g), 10 * torch.randn(5, generator=g))),
        ("2 pairs, one rejected ahead by 200", (torch.tensor([0.0, 1.0]), torch.tensor([200.0, -1.0]))),
    ]:
        call = f"bt_nll({what})"
        rc_leaf = rc.clone().requires_grad_(True)
        got = bt_nll(rc_leaf, rr.clone())
        if got is None:
            raise AssertionError(f"{call} returned None; did you forget `return`?")
        if not isinstance(got, Tensor) or got.dim() != 0:
            raise AssertionError(f"{call} should return a scalar tensor, the mean over the pairs, got "
                                 f"{type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
        want = reference_bt_loss(rc, rr)
        if not bool(torch.isfinite(got)):
            raise AssertionError(f"{call} = {got.item()}, not finite (expected {want.item():.4g}): "
                                 "torch.log(torch.sigmoid(x)) gives log(0) = -inf once σ(x) rounds to 0; "
                                 "F.logsigmoid(x) computes the same value stably")
        if not _close(got.detach(), want):
            hint = next((f"; {h}" for wrong, h in _bt_nll_variants(rc, rr) if _close(got.detach(), wrong)), "")
            raise AssertionError(f"{call} = {got.item():.6g}, llmbook's bradley_terry_loss gives "
                                 f"{want.item():.6g}{hint}")
        if not got.requires_grad:
            raise AssertionError(f"{call}: the loss has no gradient with respect to the rewards; compute it from "
                                 "the tensors given, without .detach() or .item()")


# ---------------------------------------------------------------------------
# 10.4 a GRPO step, assembled
# ---------------------------------------------------------------------------

PROMPT_LEN, MAX_NEW = 8, 12
STOP_IDS = tuple(range(240, 256))  # 16 of the 256 ids end a completion: about half finish within 12 tokens


@dataclass(frozen=True)
class Rollouts:
    """G sampled completions for each of P prompts, as GRPO's step receives them.

    ids       (P·G, T) int64: prompt, then completion, then padding (0); rows grouped by prompt
              (row p·G + g is prompt p's g-th sample)
    mask      (P·G, T - 1) bool: mask[i, t] is True where the *target* ids[i, t + 1] is a completion
              token (the logits at position t predict it); False on the prompt and the padding
    rewards   (P, G) float32: the reward of each completion
    """

    ids: Tensor
    mask: Tensor
    rewards: Tensor

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]

    def clone(self) -> Rollouts:
        return Rollouts(self.ids.clone(), self.mask.clone(), self.rewards.clone())


def tiny_rollouts(prompts: int = 4, group: int = 4, seed: int = 1) -> tuple[GPT, GPT, Rollouts]:
    """A tiny policy, its frozen reference and a batch of its rollouts with rewards: GRPO's inputs, in milliseconds.

    The reference is an untrained ``gpt-tiny`` (256 ids, ~120k parameters); the
    policy is the reference with its weights nudged by noise, as if it had
    trained a little (so the KL to the reference is not zero). Each of
    ``prompts`` random prompts of 8 ids gets ``group`` samples of up to 12 new
    ids, stopped early by any id of ``STOP_IDS``. The reward is the verifiable
    "did the answer finish": 1 if the completion ended with a stop id, else 0.
    """
    torch.manual_seed(seed)
    reference = GPT.from_preset("gpt-tiny").eval()
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():  # model order: deterministic
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    for p in reference.parameters():
        p.requires_grad_(False)
    return policy.train(), reference, sample_rollouts(policy, prompts, group, g)


def sample_rollouts(policy: GPT, prompts: int, group: int, generator: torch.Generator) -> Rollouts:
    """``group`` samples of up to 12 ids for each of ``prompts`` random 8-id prompts; reward 1 if it finished.

    A completion finishes when it writes one of ``STOP_IDS``; the stop id is
    part of the completion (it carries the objective, as an end token does).
    """
    prompt_ids = torch.randint(1, 240, (prompts, PROMPT_LEN), generator=generator).repeat_interleave(group, dim=0)
    completions = generate(policy, prompt_ids, MAX_NEW, temperature=1.0, stop_tokens=STOP_IDS, generator=generator)
    n, T = prompts * group, PROMPT_LEN + MAX_NEW
    ids = torch.zeros(n, T, dtype=torch.long)
    mask = torch.zeros(n, T - 1, dtype=torch.bool)
    rewards = torch.zeros(n)
    for i, c in enumerate(completions):
        ids[i, :PROMPT_LEN] = prompt_ids[i]
        ids[i, PROMPT_LEN:PROMPT_LEN + len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, PROMPT_LEN - 1:PROMPT_LEN - 1 + len(c)] = True  # logits at t predict ids[t + 1]
        rewards[i] = float(bool(c) and c[-1] in STOP_IDS)
    return Rollouts(ids, mask, rewards.view(prompts, group))


def _token_logps(model: nn.Module, ids: Tensor, mistake: str | None = None) -> Tensor:
    logits = model(ids[:, :-1])[0]
    targets = ids[:, :-1] if mistake == "no_shift" else ids[:, 1:]
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def _grpo_loss(logp: Tensor, old: Tensor, ref: Tensor, adv: Tensor, mask: Tensor, beta: float, clip_eps: float,
               mistake: str | None = None) -> Tensor:
    """``grpo.grpo_loss``; with ``mistake``, the same formula written out with that one mistake in it.

    ``mistake="formula"`` is the formula written out with no mistake (a test
    proves it equal to the library's, so each mistake is one change from it).
    """
    if mistake is None:
        return grpo.grpo_loss(logp, old, ref, adv.reshape(-1), mask, clip_eps=clip_eps, kl_beta=beta)[0]
    mask = torch.ones_like(mask, dtype=torch.float32) if mistake == "no_mask" else mask.float()
    ratio = torch.exp(logp - (logp if mistake == "old_not_detached" else old))
    clipped = ratio if mistake == "no_clip" else ratio.clamp(1 - clip_eps, 1 + clip_eps)
    objective = torch.minimum(ratio * adv, clipped * adv)
    kl = grpo.kl_k3(ref, logp) if mistake == "kl_direction" else grpo.kl_k3(logp, ref)
    per_token = objective + beta * kl if mistake == "kl_sign" else objective - beta * kl
    if mistake == "token_mean":
        mean = (per_token * mask).sum() / mask.sum()
    else:
        mean = ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()
    return mean if mistake == "loss_sign" else -mean


def reference_grpo_step(policy: nn.Module, reference: nn.Module, optimizer: torch.optim.Optimizer,
                        rollouts: Rollouts, beta: float = 0.04, clip_eps: float = 0.2, iterations: int = 1,
                        mistake: str | None = None) -> list[float]:
    """What Exercise 10.4 asks for, with one typical mistake switchable by name (for the hints and the tests)."""
    ids = rollouts.ids
    with torch.no_grad():
        old = _token_logps(policy, ids, mistake)  # the policy that sampled: constant during the updates
        ref = _token_logps(reference, ids, mistake)
    r = rollouts.rewards
    adv = reference_group_advantages(r)
    if mistake == "batch_advantages":
        adv = (r - r.mean()) / (r.std() + 1e-4)
    adv = adv.reshape(-1, 1)
    losses = []
    for _ in range(iterations):
        logp = _token_logps(policy, ids, mistake)
        loss = _grpo_loss(logp, old, ref, adv, rollouts.mask, beta, clip_eps,
                          None if mistake in (None, "no_shift", "batch_advantages", "no_zero_grad") else mistake)
        if mistake != "no_zero_grad":
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


GRPO_MISTAKES = {
    "no_mask": "the response mask is missing: only completion tokens carry the objective (the prompt's tokens "
               "were given, the padding is not text); average over rollouts.mask",
    "old_not_detached": "the ratio's old log-prob is the current one, not detached: exp(logp - logp) is 1 with "
                        "gradient 0, so only the KL term trains. Compute the old log-probs once, before the "
                        "updates, under torch.no_grad() (or logp.detach())",
    "loss_sign": "the loss has the wrong sign: the optimizer minimises, so the loss is minus the objective "
                 "(-(clipped advantage term - β · KL))",
    "kl_sign": "the KL penalty has the wrong sign: it is subtracted from the objective (added to the loss), "
               "so the policy is pulled back towards the reference, not pushed away from it",
    "kl_direction": "the k3 estimator is reversed: KL(π || π_ref) ≈ exp(ref - logp) - (ref - logp) - 1, "
                    "with ref - logp (reference minus policy) in both places",
    "token_mean": "tokens are averaged over the whole batch: GRPO averages each sequence's tokens first "
                  "(sum over its mask / its length), then the sequences",
    "no_clip": "the ratio is not clipped: min(ratio · A, clip(ratio, 1 - ε, 1 + ε) · A)",
    "batch_advantages": "the advantages are normalised over the whole batch: normalise within each group "
                        "(each prompt's G rewards), as in Exercise 10.2",
    "no_shift": "the log-probs are not shifted: the logits at position t predict ids[:, t + 1], so gather the "
                "targets ids[:, 1:] from the logits of ids[:, :-1]",
    "no_zero_grad": "the gradients are not zeroed between updates: call optimizer.zero_grad() before each "
                    "backward, or the second step adds the first step's gradient again",
}
GRPO_CASES = [  # (beta, clip_eps, iterations, lr)
    (0.04, 0.2, 2, 1.0),
    (0.5, 0.05, 3, 0.5),
]


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _params_close(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return all(_close(a[n], b[n], atol=1e-6, rtol=1e-4) for n in b)


def _run(step: Callable, policy: GPT, reference: GPT, rollouts: Rollouts, beta: float, clip_eps: float,
         iterations: int, lr: float, **kwargs) -> tuple[list[float], dict[str, Tensor], GPT]:
    policy, reference = copy.deepcopy(policy), copy.deepcopy(reference)
    optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
    torch.manual_seed(0)
    losses = step(policy, reference, optimizer, rollouts.clone(), beta=beta, clip_eps=clip_eps,
                  iterations=iterations, **kwargs)
    return losses, _params(policy), reference


def _as_losses(result, iterations: int, what: str) -> list[float]:
    if result is None:
        raise AssertionError(f"{what} returned None; return the list of the {iterations} losses, one per update "
                             "(loss.item())")
    if isinstance(result, (float, int, Tensor)) and not (isinstance(result, Tensor) and result.dim() == 1):
        raise AssertionError(f"{what} returned one number; return a list of {iterations} losses, one per update")
    values = [float(v) for v in result]
    if len(values) != iterations:
        raise AssertionError(f"{what} returned {len(values)} losses for iterations={iterations}: one per update")
    return values


@exercise("10.4", solution="grpo_step")
def check_grpo_step(grpo_step):
    policy, reference, rollouts = tiny_rollouts()
    ref_before = _params(reference)
    for beta, clip_eps, iterations, lr in GRPO_CASES:
        what = f"grpo_step(beta={beta}, clip_eps={clip_eps}, iterations={iterations}) with SGD(lr={lr})"
        try:
            got, got_params, their_reference = _run(grpo_step, policy, reference, rollouts, beta, clip_eps,
                                                    iterations, lr)
        except RuntimeError as exc:
            if "backward through the graph a second time" not in str(exc):
                raise
            raise AssertionError(f"{what}: the second update's backward() went through the first update's graph "
                                 "(RuntimeError: backward through the graph a second time): the old and the "
                                 "reference log-probs are computed once, before the updates, so compute them under "
                                 "torch.no_grad(); they are constants of the objective") from None
        got = _as_losses(got, iterations, what)
        if not _params_close(_params(their_reference), ref_before):
            raise AssertionError(f"{what}: the reference model's parameters changed: it is frozen, only scored "
                                 "under torch.no_grad()")
        want, want_params, _ = _run(reference_grpo_step, policy, reference, rollouts, beta, clip_eps, iterations, lr)
        same_losses = _close(torch.tensor(got), torch.tensor(want), atol=1e-5)
        if same_losses and _params_close(got_params, want_params):
            continue
        for mistake, hint in GRPO_MISTAKES.items():
            wrong, wrong_params, _ = _run(reference_grpo_step, policy, reference, rollouts, beta, clip_eps,
                                          iterations, lr, mistake=mistake)
            if _close(torch.tensor(got), torch.tensor(wrong), atol=1e-5) and _params_close(got_params, wrong_params):
                raise AssertionError(f"{what}: {hint}")
        if not same_losses:
            raise AssertionError(f"{what}: losses {[round(v, 6) for v in got]}, expected "
                                 f"{[round(v, 6) for v in want]} (the reference step on the same rollouts)")
        name = next(n for n in want_params if not _close(got_params[n], want_params[n], atol=1e-6))
        raise AssertionError(f"{what}: the losses agree but the updated parameters differ ({name} by up to "
                             f"{_max_error(got_params[name], want_params[name]):.3g}): is every loss computed "
                             "from the policy's current log-probs, and backward and optimizer.step() called once "
                             "per update?")

    # groups of one answer (every 4th row: each prompt's first sample): nothing to compare, a clear error
    single = Rollouts(rollouts.ids[::rollouts.group_size], rollouts.mask[::rollouts.group_size],
                      rollouts.rewards[:, :1])
    try:
        _run(grpo_step, policy, reference, single, 0.04, 0.2, 1, 1.0)
    except ValueError:
        return
    raise AssertionError("grpo_step with groups of one answer per prompt (rewards of shape (4, 1)) ran: raise a "
                         "ValueError that says GRPO needs at least 2 answers per prompt; a group of one has no "
                         "baseline (its advantage is 0, or nan with the sample std) and teaches nothing")


def zero_variance_groups(rewards: Tensor) -> int:
    """How many groups have all-equal rewards (they contribute nothing to the policy term)."""
    return int((rewards.max(dim=1).values == rewards.min(dim=1).values).sum())


__all__ = ["Rollouts", "check_bradley_terry", "check_dpo_loss", "check_group_advantages", "check_grpo_step",
           "reference_grpo_step", "sample_rollouts", "tiny_rollouts", "zero_variance_groups"]
