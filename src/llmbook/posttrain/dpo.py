"""Direct Preference Optimization (Rafailov et al. 2023): preference tuning without a reward model or RL.

RLHF (InstructGPT) fits a reward model ``r`` to preferences, then runs PPO to
maximize it while a KL penalty keeps the policy near the SFT model π_ref:

    max_π  E_{x, y~π} [ r(x, y) ]  -  β KL( π(·|x) || π_ref(·|x) )

DPO notices that this objective has a closed-form optimum, and turns it around.

1. The optimum (a few lines of calculus; Rafailov et al., Appendix A.1):
       π*(y|x) = π_ref(y|x) exp(r(x, y) / β) / Z(x),    Z(x) = Σ_y π_ref(y|x) exp(r(x, y) / β)
2. Solved for the reward, every policy defines one, its *implicit reward*:
       r(x, y) = β log π(y|x) / π_ref(y|x)  +  β log Z(x)
3. Preferences follow Bradley-Terry: p(y_w ≻ y_l | x) = σ(r(x, y_w) - r(x, y_l)).
   In the difference, the intractable β log Z(x) cancels:
       p(y_w ≻ y_l | x) = σ( β log π(y_w|x)/π_ref(y_w|x)  -  β log π(y_l|x)/π_ref(y_l|x) )
4. Maximum likelihood of the preferences in the data is the DPO loss (their Eq. 7):
       L = -log σ(β h),    h = [log π(y_w) - log π_ref(y_w)] - [log π(y_l) - log π_ref(y_l)]

So the language model *is* the reward model: training it on pairs with a
classification loss solves the RL problem, no sampling, no value head. Its
gradient, -β σ(-β h) (∇ log π(y_w) - ∇ log π(y_l)), raises the chosen answer and
lowers the rejected one, weighted by how wrongly the implicit reward ranks them
now. The log-probabilities are of whole responses (summed over their tokens,
``logprobs.sequence_logprobs``); β is the KL leash: small β lets π move far.

Nothing in the loss asks the chosen answer's probability to rise, only the
margin: in practice both log-probabilities fall, the rejected faster (the
chapter plots it). Two variants share the code:

    cDPO (``label_smoothing`` ε > 0; Mitchell 2023, "A note on DPO with noisy preferences"): each label is
        assumed flipped with probability ε, so L = -(1-ε) log σ(β h) - ε log σ(-β h): the margin stops growing
        once σ(β h) reaches 1-ε, instead of being pushed to infinity.
    IPO (``loss_type="ipo"``; Azar et al. 2023): L = (h' - 1/(2β))², a squared loss that aims the margin at a
        finite target; h' uses per-token *averaged* log-ratios, as TRL does (so it needs the lengths).

``dpo_loss`` is proven equal to TRL's (``trl`` 1.16, ``DPOTrainer._compute_loss``, run by
``trl_dpo_loss``) on the same log-probabilities in ``tests/test_dpo.py``. The trainer below runs it on Chapter
7's ``Trainer``; the book's DPO models are cached like the SFT ones:

    python -m llmbook.posttrain.dpo dpo-polite          # train (or resume) and cache it
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from llmbook import checkpoint, units
from llmbook.bpe.tokenizer import Tokenizer
from llmbook.model import GPT
from llmbook.posttrain import sft
from llmbook.posttrain.collate import Batch
from llmbook.posttrain.logprobs import response_lengths, sequence_logprobs, token_logprobs
from llmbook.posttrain.masking import IGNORE_INDEX
from llmbook.posttrain.order import EpochOrder
from llmbook.posttrain.pairs import PreferencePair, TokenizedPair, collate_pairs, polite_split, tokenize_pairs
from llmbook.posttrain.templates import Message, get_template
from llmbook.pretrained import Pretrained, cache_cli, ensure_trained, recipe_dir
from llmbook.train import RunError, TrainConfig, Trainer, _write_atomic, load_model, read_jsonl

LOSS_TYPES = ("sigmoid", "ipo")
PAIRS = ("polite", "onpolicy")
# what the training records carry besides the loss, named as TRL logs them
TRAIN_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected")


# ---------------------------------------------------------------------- the loss


def _check_loss_settings(beta: float, loss_type: str, label_smoothing: float) -> None:
    if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive number (the KL leash; 0.1 is usual), got {beta}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing is the probability that a label is flipped, in [0, 0.5); got "
                         f"{label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing belongs to the sigmoid loss (cDPO); IPO has no labels to smooth: set it to 0")


def dpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
    beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(losses (B,), chosen_rewards (B,), rejected_rewards (B,))`` from four ``(B,)`` summed log-probabilities.

    The rewards are the implicit ones, β (log π - log π_ref), detached (they are
    for logging; the loss carries the gradient). ``"ipo"`` needs each response's
    token count (``logprobs.response_lengths``) to average the log-ratios per token.

    >>> zero = torch.zeros(2)
    >>> dpo_loss(zero, zero, zero, zero)[0]  # policy == reference: the margin is 0, the loss log 2
    tensor([0.6931, 0.6931])
    """
    _check_loss_settings(beta, loss_type, label_smoothing)
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                       ref_rejected_logps)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four log-probabilities must be (B,) tensors of one shape, got {sorted(shapes)}")
    if policy_chosen_logps.numel() == 0:
        raise ValueError("dpo_loss got no pairs (B = 0): give at least one")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # log π(y_w)/π_ref(y_w)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        h = chosen_logratios - rejected_logratios
        # cDPO: with probability ε the label is the other way round; ε = 0 is DPO's -log σ(β h)
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    else:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' averages the log-ratios per token: pass chosen_lengths and "
                             "rejected_lengths (logprobs.response_lengths)")
        h = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2  # IPO's Eq. 17, with β as its τ
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, policy_chosen_logps: Tensor,
                policy_rejected_logps: Tensor) -> dict[str, float]:
    """Batch means, named as TRL logs them: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies`` (the fraction with margin > 0; a tie counts as wrong, as in TRL), ``logps/chosen``,
    ``logps/rejected`` (the policy's summed log-probabilities: watch both fall)."""
    margins = chosen_rewards - rejected_rewards
    values = (chosen_rewards.mean(), rejected_rewards.mean(), margins.mean(), (margins > 0).float().mean(),
              policy_chosen_logps.detach().mean(), policy_rejected_logps.detach().mean())
    return dict(zip(TRAIN_METRICS, torch.stack(values).tolist(), strict=True))


# ---------------------------------------------------------------------- the real thing: TRL's loss on our numbers


def trl_dpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
    beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``dpo_loss``'s result computed by TRL 1.16's own code, pair by pair: what ``dpo_loss`` is checked against.

    TRL has no loss function to import: the loss is computed inside
    ``DPOTrainer._compute_loss(self, model, inputs, return_outputs)`` from the
    per-token log-probabilities its model returns, and a real ``DPOTrainer``
    needs a Hugging Face model, a dataset and an ``Accelerator``. So the unbound
    method is called with the minimum it reads of ``self`` (a ``SimpleNamespace``:
    beta, loss_types, label_smoothing, an accelerator whose gathers are the
    identity on one process, ``precompute_ref_logps=True`` so the reference's
    log-probs come in ``inputs``), and a stand-in model that returns, as TRL's
    patched forward does, per-token log-probabilities: each response's summed
    log-prob at its last position and 0 at the others (TRL's ``.sum(dim=1)``
    gives our number back exactly), under a completion mask of the response's
    length (which IPO divides by). Every line of TRL's loss then runs unchanged.

    TRL returns the batch's mean, so each pair is one call, and its logged
    ``rewards/chosen`` and ``rewards/rejected`` are that pair's rewards. In TRL
    1.16 the ``"sigmoid"`` loss ignores ``label_smoothing`` (cDPO left it); its
    ``"aot"`` loss sorts the batch's log-ratios and then applies cDPO's formula,
    which for one pair is cDPO exactly, so ``label_smoothing > 0`` is checked
    against that.
    """
    import collections
    import types

    from trl.trainer.dpo_trainer import DPOTrainer as TRLDPOTrainer

    _check_loss_settings(beta, loss_type, label_smoothing)
    trl_type = "aot" if loss_type == "sigmoid" and label_smoothing else loss_type
    if loss_type == "ipo" and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("loss_type='ipo' averages the log-ratios per token: pass chosen_lengths and "
                         "rejected_lengths (logprobs.response_lengths)")
    ones = torch.ones_like(policy_chosen_logps, dtype=torch.long)
    lengths = torch.stack([ones if chosen_lengths is None else chosen_lengths,
                           ones if rejected_lengths is None else rejected_lengths], dim=1)  # (B, 2)
    out = []
    for i in range(policy_chosen_logps.shape[0]):
        n = lengths[i].clamp(min=1)
        T = int(n.max()) + 1  # a prompt token, then the longer response
        completion_mask = torch.zeros(2, T, dtype=torch.long)
        for row, k in enumerate(n.tolist()):
            completion_mask[row, T - k:] = 1
        per_token = torch.zeros(2, T - 1, dtype=policy_chosen_logps.dtype)  # TRL's labels are shifted by one
        per_token[:, -1] = torch.stack([policy_chosen_logps[i], policy_rejected_logps[i]]).detach()

        def stand_in(per_token=per_token, T=T, **kwargs):
            zeros = torch.zeros(2, T - 1)
            return types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

        stand_in.training = True
        trainer = types.SimpleNamespace(
            model=stand_in, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, args=None,
            accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t,
                                              gather_for_metrics=lambda t: t),
            f_divergence_type="reverse_kl", loss_types=[trl_type], loss_weights=[1.0], beta=beta,
            label_smoothing=label_smoothing, use_weighting=False, _total_train_tokens=0, _tp_size=1,
            _metrics={"train": collections.defaultdict(list)})
        inputs = {"input_ids": torch.zeros(2, T, dtype=torch.long), "completion_mask": completion_mask,
                  "attention_mask": torch.ones(2, T, dtype=torch.long),
                  "ref_chosen_logps": ref_chosen_logps[i:i + 1].detach(),
                  "ref_rejected_logps": ref_rejected_logps[i:i + 1].detach()}
        loss = TRLDPOTrainer._compute_loss(trainer, stand_in, inputs, False)
        logged = trainer._metrics["train"]
        out.append((loss.detach(), logged["rewards/chosen"][0], logged["rewards/rejected"][0]))
    losses, chosen, rejected = zip(*out, strict=True)
    dtype = policy_chosen_logps.dtype
    return torch.stack(losses), torch.tensor(chosen, dtype=dtype), torch.tensor(rejected, dtype=dtype)


# ---------------------------------------------------------------------- measuring on held-out pairs


def _pair_logps(model: GPT, batch: Batch) -> tuple[Tensor, Tensor]:
    """``(B,)`` summed response log-probabilities and ``(B, T, V)`` log-softmax, for the pairs' rows."""
    logits, _ = model(batch.x, positions=batch.positions, mask=batch.mask)
    return token_logprobs(logits, batch.y).sum(dim=1), F.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def implicit_reward_accuracy(
    policy: GPT, reference: GPT, tokenized_pairs: Sequence[TokenizedPair], beta: float = 0.1, pad_id: int = 0,
    batch_size: int = 32, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
) -> dict[str, float]:
    """How well the policy's implicit reward ranks held-out pairs, its DPO loss on them, and its KL to the reference.

    ``accuracy``: the fraction of pairs whose chosen answer gets the higher
    implicit reward β log π/π_ref, a tie counting one half. Before training the
    policy *is* the reference, every reward is exactly 0 and every pair a tie,
    so the SFT model scores 50% by construction (a coin's score), whatever it
    knows; TRL's ``rewards/accuracies`` would say 0%. ``ties`` counts them.

    ``kl``: KL(π || π_ref) in nats per response token, Σ_v π(v|c) log π(v|c)/π_ref(v|c)
    over the whole vocabulary, averaged over the contexts c of the held-out
    responses (chosen and rejected). It is measured on the data's contexts,
    not on the policy's own samples, so it is deterministic (no sampling
    noise), and 0 exactly when π = π_ref: the leash's length, comparable between β.

    Both models are put in eval mode (no dropout) and restored after; nothing
    here records gradients. Also returned: ``loss``, ``margin`` (mean reward
    margin), ``rewards/chosen``, ``rewards/rejected``, ``logps/chosen``,
    ``logps/rejected`` (means), ``n`` pairs.
    """
    _check_loss_settings(beta, loss_type, label_smoothing)
    if not tokenized_pairs:
        raise ValueError("implicit_reward_accuracy needs at least one held-out pair")
    device = next(policy.parameters()).device
    modes = policy.training, reference.training
    policy.eval(), reference.eval()
    parts: dict[str, list[Tensor]] = {k: [] for k in ("pc", "pr", "rc", "rr", "nc", "nr")}
    kl_total, kl_tokens = 0.0, 0
    try:
        for start in range(0, len(tokenized_pairs), batch_size):
            batch = Batch(*(t.to(device) for t in collate_pairs(tokenized_pairs[start:start + batch_size], pad_id)))
            policy_logps, policy_logp_all = _pair_logps(policy, batch)
            ref_logps, ref_logp_all = _pair_logps(reference, batch)
            keep = batch.y != IGNORE_INDEX  # (2B, T) the response tokens' contexts
            kl = (policy_logp_all.exp() * (policy_logp_all - ref_logp_all)).sum(dim=-1)  # (2B, T)
            kl_total += float(kl[keep].sum())
            kl_tokens += int(keep.sum())
            lengths = response_lengths(batch)
            for key, (c, r) in zip(("p", "r", "n"), (policy_logps.chunk(2), ref_logps.chunk(2), lengths.chunk(2)),
                                   strict=True):
                parts[key + "c"].append(c)
                parts[key + "r"].append(r)
    finally:
        policy.train(modes[0]), reference.train(modes[1])
    pc, pr, rc, rr, nc, nr = (torch.cat(parts[k]) for k in ("pc", "pr", "rc", "rr", "nc", "nr"))
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing, nc, nr)
    margins = chosen_rewards - rejected_rewards
    wins = (margins > 0).double() + 0.5 * (margins == 0).double()  # a tie: half a win
    metrics = dpo_metrics(chosen_rewards, rejected_rewards, pc, pr)
    return {"accuracy": wins.mean().item(), "margin": margins.mean().item(), "kl": kl_total / kl_tokens,
            "loss": losses.mean().item(), "ties": int((margins == 0).sum()), "n": len(tokenized_pairs),
            **{k: metrics[k] for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")}}


# ---------------------------------------------------------------------- the configuration


@dataclass
class DPOConfig(TrainConfig):
    """A DPO run: ``TrainConfig``'s optimizer and schedule, plus the SFT model it starts from and the pairs.

    ``batch_size`` counts pairs (each is two rows: chosen and rejected).
    ``model``, ``model_overrides``, ``dataset`` and ``tokenizer`` are not used:
    the model and tokenizer are the base's, and ``context_length`` must be its.
    """

    base: str = "sft-full"  # an SFT preset (llmbook.posttrain.sft.SFT_PRESETS) or a run folder with model.pt
    pairs: str = "polite"  # "polite" (pairs.polite_split) or "onpolicy" (the base's samples on Chapter 9's task)
    template: str = "chatml"  # the base's chat template
    beta: float = 0.1  # the KL leash: the implicit reward is beta * log(pi / pi_ref)
    loss_type: str = "sigmoid"  # "sigmoid" (DPO, cDPO with label_smoothing > 0) or "ipo"
    label_smoothing: float = 0.0  # cDPO's probability that a preference label is flipped, in [0, 0.5)
    samples_per_prompt: int = 4  # onpolicy: samples of the base per task prompt, to find one passing and one failing
    sample_temperature: float = 1.0  # onpolicy: the sampling temperature of those samples
    task_seed: int = 0  # onpolicy: make_task_split's seed (the SFT model's, so its test set stays unseen)
    n_task_train: int = 2000  # onpolicy: task prompts to sample pairs from (their train split)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_loss_settings(self.beta, self.loss_type, self.label_smoothing)
        if self.pairs not in PAIRS:
            raise ValueError(f"pairs must be one of {', '.join(PAIRS)}, got {self.pairs!r}")
        get_template(self.template)  # one line naming the templates if unknown
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 (a passing and a failing sample), got "
                             f"{self.samples_per_prompt}")
        if self.sample_temperature <= 0:
            raise ValueError(f"sample_temperature must be > 0 (greedy samples would all be the same), got "
                             f"{self.sample_temperature}")
        if self.n_task_train <= 0:
            raise ValueError(f"n_task_train must be positive, got {self.n_task_train}")
        if self.parallel != "none":
            raise ValueError("DPO runs in one process here (parallel='none'); Chapter 8's trainers pretrain")


# ---------------------------------------------------------------------- the trainer


@dataclass
class _DPOData:
    """What ``Trainer`` reads of its data (``tokenizer``), the pairs, and the reference's log-probabilities."""

    tokenizer: Tokenizer
    train_pairs: list[TokenizedPair]
    val_pairs: list[TokenizedPair]
    ref_chosen: Tensor  # (N,) log π_ref of each training pair's chosen response, summed; NaN until first needed
    ref_rejected: Tensor  # (N,)
    dropped: int  # pairs longer than the context


def without_dropout(model: GPT) -> GPT:
    """A copy of ``model`` whose config has no dropout (as TRL's ``disable_dropout``), same weights.

    With dropout, the policy's log-probabilities would be noisy draws while
    the reference's are exact, so even an untrained policy would show margins;
    without, policy == reference gives margin 0 and loss log 2 exactly.
    """
    cfg = dataclasses.replace(model.cfg, dropout=0.0, attention_dropout=0.0)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the RNG where it was
        out = GPT(cfg)
    out.load_state_dict(model.state_dict())
    return out


def preference_pairs(cfg: DPOConfig, reference: GPT, tokenizer: Tokenizer) -> tuple[list[PreferencePair], ...]:
    """Training and validation pairs: the polite data's splits, or on-policy pairs of the task's train/val prompts."""
    if cfg.pairs == "polite":
        train, val, _ = polite_split()
        return train, val
    from llmbook.posttrain.onpolicy import onpolicy_pairs  # Chapter 10's sampler: chosen passes the check
    from llmbook.posttrain.tasks import make_task_split

    tasks = make_task_split(cfg.task_seed, n_train=cfg.n_task_train)
    return tuple(onpolicy_pairs(reference, tokenizer, items, cfg.samples_per_prompt, template=cfg.template,
                                seed=cfg.seed + i, temperature=cfg.sample_temperature)
                 for i, items in enumerate((tasks.train, tasks.val)))


class DPOTrainer(Trainer):
    """``Trainer`` with preference pairs for data, an SFT model to start from and a frozen copy of it as reference.

    The policy (every weight trained) is ``raw_model``; the reference is
    ``self.reference``, an attribute of the trainer and *not* a submodule of
    the model, so the optimizer never sees it and checkpoints never hold it.
    Its log-probabilities of a training pair are computed once, the first
    time the pair is drawn, and kept: exact, not an approximation, because the
    reference never changes (eval mode, no dropout, no gradient), so computing
    them again at every epoch would give the same numbers for a third more
    compute per step. (Computing all of them up front, as TRL's
    ``precompute_ref_log_probs`` does, costs a pass over pairs a short run never
    draws.) The scores so far are part of the checkpoint, so a resumed run
    uses the very numbers an uninterrupted one would (scoring a pair again in
    another batch, padded to another length, could differ in the last bit).
    """

    cfg: DPOConfig

    def load_data(self) -> _DPOData:  # type: ignore[override]
        cfg = self.cfg
        if not isinstance(cfg, DPOConfig):
            raise TypeError(f"DPOTrainer needs a DPOConfig, got {type(cfg).__name__}")
        self.template = get_template(cfg.template)
        base, tokenizer, self.base_dir = sft.load_sft(cfg.base, progress=self.progress)
        if base.cfg.context_length != cfg.context_length:
            raise ValueError(f"context_length={cfg.context_length} differs from the base model's "
                             f"{base.cfg.context_length}: set context_length={base.cfg.context_length}")
        missing = [t for t in self.template.special_tokens if t not in tokenizer.special_tokens]
        if missing:
            raise ValueError(f"the base's tokenizer has no {missing[0]!r}: DPO starts from a model fine-tuned in the "
                             f"{cfg.template} template (an SFT model), not from a base model")
        self.policy = without_dropout(base)
        self.reference = without_dropout(base).to(self.device).eval().requires_grad_(False)
        self.pad_id = tokenizer.special_tokens.get("<|endoftext|>", 0)
        train, val = preference_pairs(cfg, self.reference, tokenizer)
        if not train or not val:
            raise ValueError(f"no {'training' if not train else 'validation'} pairs (pairs={cfg.pairs!r}): "
                             + ("no task prompt gave both a passing and a failing sample; raise samples_per_prompt "
                                "or n_task_train" if cfg.pairs == "onpolicy" else "the pair list is empty"))
        train_tok, dropped = tokenize_pairs(tokenizer, train, self.template, cfg.context_length)
        val_tok, dropped_val = tokenize_pairs(tokenizer, val, self.template, cfg.context_length)
        for what, kept, given in (("training", train_tok, train), ("validation", val_tok, val)):
            if not kept:
                raise ValueError(f"none of the {len(given)} {what} pairs fits context_length={cfg.context_length} "
                                 "(both sides must): use shorter pairs")
        if len(train_tok) < cfg.batch_size:
            raise ValueError(f"{len(train_tok)} training pairs fit the context, fewer than batch_size="
                             f"{cfg.batch_size}: lower batch_size")
        unknown = torch.full((len(train_tok),), math.nan, device=self.device)
        self._order = EpochOrder(len(train_tok), cfg.seed)
        self._window: list[Tensor] = []  # TRAIN_METRICS of each micro-batch since the last training record
        return _DPOData(tokenizer, train_tok, val_tok, unknown, unknown.clone(), dropped + dropped_val)

    def build_model(self) -> GPT:
        """The policy: the SFT model without dropout, every weight trained."""
        model = self.policy
        del self.policy
        # the policy's kernels (Trainer sets them on it), so policy == reference gives equal numbers, bit for bit
        self.reference.use_fused_kernels(self.cfg.fused_kernels)
        return model.train()

    # ------------------------------------------------------------------ batches

    def _pairs_of(self, step: int, micro: int) -> list[int]:
        """The pairs of one micro-batch: epochs of a permutation seeded by (seed, epoch), so resuming needs no state."""
        cfg = self.cfg
        return self._order.take((step * cfg.accumulation_steps + micro) * cfg.batch_size, cfg.batch_size)

    def get_batch(self, step: int, micro: int) -> tuple[Tensor, ...]:
        """``(x, y, mask, positions)`` of the chosen rows then the rejected rows, and the reference's log-probs."""
        index = self._pairs_of(step, micro)
        self._score_with_reference(index)
        batch = collate_pairs([self.data.train_pairs[i] for i in index], self.pad_id)
        at = torch.tensor(index, device=self.device)
        batch = (*batch, self.data.ref_chosen[at], self.data.ref_rejected[at])
        return tuple(t.to(self.device) for t in batch)

    @torch.no_grad()
    def _score_with_reference(self, index: list[int]) -> None:
        """Fill in the reference's log-probabilities of the pairs ``index`` not yet scored (one forward pass)."""
        at = torch.tensor(index, device=self.device)
        new = at[torch.isnan(self.data.ref_chosen[at])].unique()  # sorted, each pair once
        if len(new):
            chosen, rejected = sequence_logprobs(self.reference, collate_pairs(
                [self.data.train_pairs[i] for i in new.tolist()], self.pad_id)).chunk(2)
            self.data.ref_chosen[new], self.data.ref_rejected[new] = chosen, rejected

    def loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        """The mean DPO loss of a micro-batch: one forward pass of the policy scores both sides of every pair."""
        x, y, mask, positions, ref_chosen, ref_rejected = batch
        rows = Batch(x, y, mask, positions)
        policy_chosen, policy_rejected = sequence_logprobs(self.model, rows).chunk(2)
        chosen_n, rejected_n = response_lengths(rows).chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.cfg.beta, self.cfg.loss_type,
            self.cfg.label_smoothing, chosen_n, rejected_n)
        margins = chosen_rewards - rejected_rewards
        self._window.append(torch.stack([chosen_rewards.mean(), rejected_rewards.mean(), margins.mean(),
                                         (margins > 0).float().mean(), policy_chosen.detach().mean(),
                                         policy_rejected.detach().mean()]))
        return losses.mean()

    def step_tokens(self) -> int:
        """Real tokens (both sides of every pair, no padding) of the step just taken."""
        pairs = self.data.train_pairs
        return sum(len(pairs[i].chosen) + len(pairs[i].rejected) for micro in range(self.cfg.accumulation_steps)
                   for i in self._pairs_of(self.step - 1, micro))

    def log(self, record: dict, file: str = "metrics.jsonl") -> None:
        """A training record also gets the rewards and log-probs (TRL's names), averaged since the last one."""
        if file == "metrics.jsonl" and "lr" in record and self._window:
            record = {**record, **dict(zip(TRAIN_METRICS, torch.stack(self._window).mean(dim=0).tolist(),
                                           strict=True))}
            self._window.clear()
        super().log(record, file)

    def state_dict(self) -> dict:
        """``Trainer``'s training state, plus the reference's scores of the pairs drawn so far (NaN: not yet)."""
        return {**super().state_dict(), "ref_logps": torch.stack([self.data.ref_chosen, self.data.ref_rejected]).cpu()}

    def load_training_state(self, state: dict, path: Path) -> None:
        super().load_training_state(state, path)
        scores = state["ref_logps"].to(self.device)
        if scores.shape != (2, len(self.data.train_pairs)):
            raise ValueError(f"its reference scores are of {scores.shape[1]} pairs, this run has "
                             f"{len(self.data.train_pairs)}")
        self.data.ref_chosen.copy_(scores[0])
        self.data.ref_rejected.copy_(scores[1])

    # ------------------------------------------------------------------ measuring

    def validate(self) -> dict:
        """Held-out DPO loss, implicit-reward accuracy and margin, and KL to the reference, on the validation pairs."""
        cfg = self.cfg
        return implicit_reward_accuracy(self.raw_model, self.reference, self.data.val_pairs, cfg.beta, self.pad_id,
                                        cfg.eval_batch_size, cfg.loss_type, cfg.label_smoothing)

    def _evaluate_and_sample(self) -> None:
        """``Trainer``'s evaluation, with DPO's measurements in the record instead of bits per byte."""
        self._check_finite()
        result = self.validate()
        if not math.isfinite(result["loss"]):
            raise self._diverged(f"the validation loss is {result['loss']}")
        self.last_eval = {"step": self.step, "val_loss": result["loss"], "val_accuracy": result["accuracy"],
                          "val_margin": result["margin"], "val_kl": result["kl"],
                          **{"val_" + k.replace("/", "_"): result[k]
                             for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")},
                          "elapsed_s": round(self.train_seconds, 3)}
        self.log(self.last_eval)
        if self.cfg.sample_tokens:
            self.log({"step": self.step, "prompt": self.cfg.sample_prompt, "text": self.sample()}, "samples.jsonl")
        if self.is_main and self.progress:
            tqdm.write(f"step {self.step}: val loss {result['loss']:.3f}, implicit-reward accuracy "
                       f"{result['accuracy']:.1%}, margin {result['margin']:.3f}, KL {result['kl']:.4f} nats/token")

    def sample(self) -> str:
        """The policy's greedy reply to ``sample_prompt``: how its answers change as DPO goes."""
        from llmbook.posttrain.chat import reply

        was_training = self.raw_model.training
        try:
            return reply(self.raw_model, self.data.tokenizer, [Message("user", self.cfg.sample_prompt)],
                         self.template, max_new_tokens=min(self.cfg.sample_tokens, self.cfg.context_length // 2),
                         temperature=0.0)
        finally:
            self.raw_model.train(was_training)

    # ------------------------------------------------------------------ what a finished run keeps

    def _summary(self, finished: bool) -> dict:
        summary = super()._summary(finished)
        pairs = self.data.train_pairs
        tokens = sum(len(pairs[i].chosen) + len(pairs[i].rejected) for s in range(self.step)
                     for m in range(self.cfg.accumulation_steps) for i in self._pairs_of(s, m))
        last = self.last_eval or {}
        summary.update(tokens_seen=tokens, tokens_per_s=tokens / self.train_seconds if self.train_seconds else 0.0,
                       trainable_params=sum(p.numel() for p in self.params), train_pairs=len(pairs),
                       val_pairs=len(self.data.val_pairs), dropped_pairs=self.data.dropped,
                       **{k: last.get(k) for k in ("val_accuracy", "val_margin", "val_kl")})
        return summary

    def _finish(self) -> dict:
        """``Trainer._finish`` (model.pt, summary.json) with a DPO summary line instead of bits per byte."""
        if self.last_eval is None or self.last_eval["step"] != self.step:
            self._evaluate_and_sample()
        self._check_finite()
        summary = self._summary(finished=True)
        if self.is_main:
            checkpoint.save_checkpoint(self.run_dir / "model.pt", {"model_config": dataclasses.asdict(
                self.model_config), "state_dict": self.full_state_dict()})
            try:
                _write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            except OSError as exc:
                raise RunError(f"could not write {self.run_dir / 'summary.json'} ({exc.strerror or exc}): free "
                               "disk space, then run again with --resume") from None
            print(f"trained {summary['steps']} steps in {units.duration(summary['train_seconds'])}: "
                  f"{_describe(summary)} -> {self.run_dir}")
        return summary


def _describe(summary: dict) -> str:
    return (f"held-out implicit-reward accuracy {summary['val_accuracy']:.1%}, margin {summary['val_margin']:.3f}, "
            f"KL {summary['val_kl']:.4f} nats/token, loss {summary['val_loss']:.3f}")


# ---------------------------------------------------------------------- the book's DPO models

_COMMON = dict(base="sft-full", context_length=256, eval_batch_size=64, log_interval=5, sample_tokens=48,
               sample_prompt="Name a fruit that is yellow.", weight_decay=0.0, grad_clip=1.0, min_lr_ratio=0.1,
               seed=1337)

DPO_PRESETS: dict[str, DPOConfig] = {
    # The polite pairs (929 for training), beta 0.1 as in the DPO paper and TRL's default; 60 steps of 16 pairs are
    # about one epoch, at a tenth of sft-full's peak lr. Measured from sft-full (one thread, a shared 2-core machine
    # at load 5-6, 1 Dec 2026): held-out implicit-reward accuracy on polite_split()'s 111 test pairs 50% (all ties)
    # -> 83.8% (93/111; 82.9% after 30 steps), KL 0.18 nats/token, 101 s of training steps. lr 1e-4 gave the same
    # 83.8% at 2.5x the KL (0.45), so the lower rate stays.
    "dpo-polite": DPOConfig(name="dpo-polite", pairs="polite", beta=0.1, batch_size=16, max_steps=60, lr=5e-5,
                            warmup_steps=5, eval_interval=20, **_COMMON),
    # On-policy pairs of Chapter 9's task: the SFT model's own samples (4 per prompt, temperature 1) of 500 train
    # prompts, one passing the check and one failing; 219 of the 500 prompts gave a pair (84 of the 200 val prompts).
    # Measured (one thread, load 4-7): sampling 57-77 s, training 44 s; held-out implicit-reward accuracy 50 -> 81%,
    # greedy task success on the 400 test prompts 50.2% [45.4, 55.1] (SFT) -> 49.2% [44.4, 54.1]: no change.
    # beta 0.5 gave 50.0%; lr 2e-4 reached 91.7% implicit accuracy but *lowered* task success to 38.8% [34.1, 43.6]
    # (KL 1.0 nats/token): ranking the pairs better is not writing better answers.
    "dpo-task": DPOConfig(name="dpo-task", pairs="onpolicy", beta=0.1, batch_size=16, max_steps=60, lr=5e-5,
                          warmup_steps=5, eval_interval=20, samples_per_prompt=4, n_task_train=500,
                          **{**_COMMON, "sample_prompt": "Write the last word of this line.\n\nIt is a truth "
                             "universally acknowledged."}),
    # seconds: tests (which set base to a tiny SFT model's folder; sft-tiny itself starts from the full base)
    "dpo-tiny": DPOConfig(name="dpo-tiny", pairs="polite", beta=0.1, batch_size=4, max_steps=4, lr=1e-4,
                          warmup_steps=0, eval_interval=2, log_interval=1, sample_tokens=8, base="sft-tiny",
                          context_length=256, eval_batch_size=16),
}


def run_dir(name: str) -> Path:
    """Where the DPO model ``name`` is cached: named by its recipe and by the SFT model it starts from."""
    if name not in DPO_PRESETS:
        raise ValueError(f"no DPO model {name!r}; the presets are: {', '.join(DPO_PRESETS)}")

    cfg = DPO_PRESETS[name]
    base = sft.run_dir(cfg.base).name if cfg.base in sft.SFT_PRESETS else str(Path(cfg.base).resolve())
    return recipe_dir(name, cfg, extra=f"|base={base}")


def ensure(name: str = "dpo-polite", progress: bool = True, retrain: bool = False) -> Path:
    """The folder of the DPO model ``name``, trained first (with its SFT model, if need be) if it is not cached."""
    folder = run_dir(name)  # ValueError naming the presets for an unknown name
    cfg = DPO_PRESETS[name]
    return ensure_trained(name, folder, lambda d: DPOTrainer(cfg, d, progress=progress), cfg.max_steps, progress,
                          retrain)


def load(name: str = "dpo-polite", device: str | torch.device = "cpu", progress: bool = True,
         retrain: bool = False) -> Pretrained:
    """The DPO model ``name`` (a ``DPO_PRESETS`` key) in eval mode, with its tokenizer, recipe and logs."""
    folder = ensure(name, progress, retrain)
    model, tokenizer = load_model(folder, device)
    config = DPOConfig.from_file(folder / "config.json")
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return Pretrained(model.eval(), tokenizer, config, folder, summary)


def metrics(name: str) -> list[dict]:
    """The training log of a cached DPO model (``metrics.jsonl``): rewards, margins, log-probs, held-out accuracy."""
    return read_jsonl(run_dir(name) / "metrics.jsonl")


def main(argv: list[str] | None = None) -> int:
    """``python -m llmbook.posttrain.dpo NAME [--retrain]``: train (or resume) and cache a DPO model."""
    return cache_cli(argv, "python -m llmbook.posttrain.dpo", "DPO models", DPO_PRESETS, "dpo-polite", ensure,
                     _describe)


if __name__ == "__main__":
    raise SystemExit(main())
