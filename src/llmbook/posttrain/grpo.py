"""GRPO: reinforcement learning from a verifiable reward, with advantages measured within a group of samples.

Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath: Pushing
the Limits of Mathematical Reasoning in Open Language Models", §4.1) is PPO
without PPO's critic. For each prompt q it samples a group of G answers
o_1..o_G from the current policy, scores them (here Chapter 9's checker,
``TaskItem.check``, a reward in [0, 1]), and uses as each answer's advantage
its reward relative to the group (§4.1.2, outcome supervision):

    A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)              every token of o_i gets A_i

The update is PPO's clipped objective with a KL penalty to a frozen reference
model (the SFT model we started from), averaged over each answer's tokens and
then over the G answers (DeepSeekMath eq. 3):

    ratio_t = π_θ(o_t | q, o_<t) / π_old(o_t | q, o_<t)
    J = mean_i (1/|o_i|) Σ_t [ min(ratio_t A_i, clip(ratio_t, 1-ε, 1+ε) A_i) - β KL_t ]

and KL_t is Schulman's k3 estimator (``kl_k3``): unbiased, never negative.

**PPO with a value head, compared on paper.** InstructGPT's PPO (Ouyang et
al. 2022) trains a second network, the critic V(s), as big as the policy,
to predict each prefix's expected reward; the advantage of each token is
then estimated with GAE (Schulman et al. 2016) from the critic's values and
a per-token reward (the reward model's score at the end, minus a per-token
KL penalty). That costs a second model in memory, a second loss to tune, and
a critic that must learn a value for every prefix from a reward given only at
the end. DeepSeekMath's argument (§4.1, paraphrased): the value model is
another model of the policy's size, a burden in memory and compute, and
since usually only the last token gets a reward, a value that is accurate
at every token is hard to train; sampling
several answers to the same prompt gives a baseline for free, their mean
reward, and dividing by the group's standard deviation puts every prompt's
advantages on one scale. GRPO therefore removes the critic and GAE, and moves
the KL term from the reward into the loss. What it keeps from PPO: sampling
from the current policy, the probability ratio and its clip.

Two choices the papers disagree on, both here as options:

- Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
  Perspective") drops the division by the std (a prompt whose answers are
  nearly all right or all wrong otherwise gets its small differences blown
  up) and the 1/|o_i| length normalisation (which favours long wrong answers):
  ``group_advantages(..., scale=False)``. DAPO (Yu et al. 2025) averages the
  loss over all tokens of the batch instead of per answer, and Dr. GRPO divides
  each answer's sum by a constant (the generation budget) instead of its
  length; this module keeps DeepSeekMath's per-answer mean, in ``grpo_loss``.
- ``mu``, the number of updates per batch of rollouts. With mu = 1 (the
  default; DeepSeekMath's runs make a single update per exploration stage,
  §4.2) the policy that sampled is the policy
  being updated, so ratio = 1 and the clip never acts, but the ratio's gradient
  is ∇ log π: the loss is REINFORCE with the group mean as baseline
  (tested). mu > 1 reuses the rollouts; then ratios leave 1 and the clip bites.
  (TRL's GRPOTrainer calls mu ``num_iterations``, 1 by default.)

The policy is trained in eval mode (no dropout): the ratio must be exactly 1
for the policy that sampled, which dropout's noise would break. The trainer is
Chapter 7's ``Trainer``: checkpoints, resume (the rollouts of step s are
seeded by (seed, s), so a resumed run samples what the uninterrupted one
would have), Ctrl-C and progress come with it.

    python -m llmbook.posttrain.grpo grpo      # train (or resume) and cache the book's GRPO model
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from llmbook.model import GPT
from llmbook.posttrain import sft
from llmbook.posttrain.logprobs import token_logprobs
from llmbook.posttrain.masking import IGNORE_INDEX
from llmbook.posttrain.measure import score_task
from llmbook.posttrain.order import EpochOrder
from llmbook.posttrain.rollouts import RolloutBatch, sample_groups
from llmbook.posttrain.tasks import FAMILIES, TaskItem, make_task_split
from llmbook.posttrain.templates import Message, get_template
from llmbook.pretrained import Pretrained, cache_cli, ensure_trained, recipe_dir
from llmbook.train import TrainConfig, Trainer, load_model, read_jsonl

# ---------------------------------------------------------------------- the pieces of the loss


def group_advantages(rewards: Tensor, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """``(P, G)`` rewards -> ``(P, G)`` advantages: each reward minus its group's mean, over the group's std.

    DeepSeekMath §4.1.2 (outcome supervision) normalizes the group's rewards,
    r̃_i = (r_i - mean(r)) / std(r), and gives every token of answer i the advantage r̃_i.
    The std is the sample std (Bessel's n - 1, as ``torch.std`` and TRL's
    GRPOTrainer); ``eps`` keeps a near-constant group from dividing by ~0.
    ``scale=False`` is Dr. GRPO's advantage (Liu et al. 2025), r_i - mean(r):
    no division, so nearly-solved and nearly-hopeless prompts are not blown up.

    A group whose rewards are all equal has advantages exactly 0: nothing to
    learn from it, and no rounding noise either. A group of one answer has no
    baseline but itself: a ValueError.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (prompts, group_size), got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"group_size must be >= 2: an answer alone is its own baseline and its advantage is 0 "
                         f"(got rewards of shape {tuple(rewards.shape)}); sample at least 2 answers per prompt")
    rewards = rewards.float()
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + eps)
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return advantages.masked_fill(constant, 0.0)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL(π_θ || π_ref) estimate, Schulman's k3 (J. Schulman, "Approximating KL divergence", 2020).

    With the token sampled from π_θ and log-ratio d = log π_ref - log π_θ:

        k3 = exp(d) - d - 1

    Unbiased, since E_πθ[exp(d)] = E_πθ[π_ref / π_θ] = 1 makes E[k3] = E[-d] = KL;
    and never negative, since e^x >= 1 + x. (k1 = -d is unbiased too but
    negative half the time; k2 = d²/2 is positive but biased.) DeepSeekMath
    eq. 4 uses this estimator.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(
    logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2,
    kl_beta: float = 0.04,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's loss (minus DeepSeekMath's objective J, eq. 3) and its metrics.

    ``logp``, ``old_logp``, ``ref_logp`` and ``mask`` are ``(N, T)`` (per token
    of N answers: the policy being trained, the policy that sampled, the frozen
    reference; ``mask`` True on the answer's tokens), ``advantages`` ``(N,)``:

        per token   min(ratio A, clip(ratio, 1-ε, 1+ε) A) - β k3,    ratio = exp(logp - old_logp)
        per answer  the mean over its tokens (1/|o_i|)
        loss        minus the mean over the answers

    (DAPO's token-level mean over the whole batch, or Dr. GRPO's constant
    divisor, would instead let long answers weigh more.) The metrics, detached: ``clip_fraction`` (tokens whose
    clipped term is the smaller, so no gradient flows), ``kl`` (mean k3 per
    token), ``ratio`` (mean ratio per token).
    """
    if not logp.shape == old_logp.shape == ref_logp.shape == mask.shape or logp.dim() != 2:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, ref_logp "
                         f"{tuple(ref_logp.shape)} and mask {tuple(mask.shape)} must all be the same (N, T)")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be (N,) = ({logp.shape[0]},), one per answer; got {tuple(advantages.shape)}")
    if clip_eps <= 0 or kl_beta < 0:
        raise ValueError(f"need clip_eps > 0 and kl_beta >= 0, got clip_eps={clip_eps}, kl_beta={kl_beta}")
    mask = mask.to(logp.dtype)
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("an answer has no token in mask: its per-answer mean is undefined")
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.detach().unsqueeze(1)  # (N, 1): every token of an answer shares it
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    per_token = torch.minimum(unclipped, clipped)
    kl = kl_k3(logp, ref_logp.detach())
    if kl_beta:
        per_token = per_token - kl_beta * kl
    per_answer = (per_token * mask).sum(dim=1) / lengths
    loss = -per_answer.mean()
    with torch.no_grad():
        n = mask.sum()
        metrics = {"clip_fraction": ((clipped < unclipped).to(mask.dtype) * mask).sum() / n,
                   "kl": (kl * mask).sum() / n, "ratio": (ratio * mask).sum() / n}
    return loss, metrics


# ---------------------------------------------------------------------- the configuration


@dataclass
class GRPOConfig(TrainConfig):
    """A GRPO run: ``TrainConfig``'s optimizer and schedule settings, plus the RL loop's.

    One optimizer step uses ``prompts_per_step`` prompts times ``group_size``
    answers; ``batch_size``, ``model``, ``dataset`` and ``tokenizer`` are not
    used (the model and tokenizer are the base's). ``context_length`` must be
    the base's.
    """

    base: str = "sft-full"  # an SFT preset (llmbook.posttrain.sft), or a run folder with model.pt and tokenizer.json
    template: str = "chatml"
    task_seed: int = 0  # make_task_split's seed: the book's test set is seed 0's
    n_task_train: int = 2000
    families: str = ""  # comma-separated task families to train on; "": all four
    group_size: int = 8  # G answers per prompt
    prompts_per_step: int = 8
    temperature: float = 1.0  # of the rollouts; validation is greedy
    max_new_tokens: int = 32
    clip_eps: float = 0.2  # PPO's ε (DeepSeekMath's value)
    kl_beta: float = 0.04  # the KL penalty's β (DeepSeekMath's value); 0: no reference model is kept
    mu: int = 1  # optimizer steps on each batch of rollouts
    scale_advantages: bool = True  # False: Dr. GRPO's unscaled advantages
    n_val: int = 100  # validation prompts (the first of the task's val split): greedy success and mean reward
    rollout_batch_size: int = 64  # rows sampled at once

    def __post_init__(self) -> None:
        super().__post_init__()
        get_template(self.template)
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (GRPO's baseline is the group's mean), got {self.group_size}")
        for name in ("prompts_per_step", "max_new_tokens", "mu", "n_val", "rollout_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (greedy groups are all equal), got {self.temperature}")
        if self.clip_eps <= 0 or self.kl_beta < 0:
            raise ValueError(f"need clip_eps > 0 and kl_beta >= 0, got {self.clip_eps} and {self.kl_beta}")
        unknown = [f for f in self.family_list if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown task families {unknown}; choose among {', '.join(FAMILIES)}")
        if self.accumulation_steps != 1 or self.parallel != "none":
            raise ValueError("GRPO here takes one batch of rollouts per step in one process: accumulation_steps=1, "
                             "parallel='none'")

    @property
    def family_list(self) -> tuple[str, ...]:
        return tuple(f.strip() for f in self.families.split(",") if f.strip()) or FAMILIES


# ---------------------------------------------------------------------- the trainer


class _GRPOData:
    """What ``Trainer`` reads of its data (``tokenizer``), plus the task's prompts."""

    def __init__(self, tokenizer, train: list[TaskItem], val: list[TaskItem], val_examples: list):
        self.tokenizer, self.train_items, self.val_items, self.val_examples = tokenizer, train, val, val_examples


class GRPOTrainer(Trainer):
    """``Trainer`` whose batches are sampled by the policy itself and scored by the task; see the module docstring.

    ``get_batch(step)`` samples ``prompts_per_step`` prompts x ``group_size``
    answers (every ``mu`` steps), ``loss`` is ``grpo_loss``; the reference
    model is a frozen copy of the starting policy, held by the trainer, not by
    the policy (so the optimizer and the checkpoints never see it).
    """

    cfg: GRPOConfig

    def load_data(self) -> _GRPOData:  # type: ignore[override]
        cfg = self.cfg
        if not isinstance(cfg, GRPOConfig):
            raise TypeError(f"GRPOTrainer needs a GRPOConfig, got {type(cfg).__name__}")
        self.template = get_template(cfg.template)
        policy, tokenizer, self.base_dir = sft.load_sft(cfg.base, progress=self.progress)
        if policy.cfg.context_length != cfg.context_length:
            raise ValueError(f"context_length={cfg.context_length} differs from the base model's "
                             f"{policy.cfg.context_length}: set context_length={policy.cfg.context_length}")
        missing = [t for t in self.template.special_tokens if t not in tokenizer.special_tokens]
        if missing:
            raise ValueError(f"the base's tokenizer lacks {missing}: start GRPO from a model fine-tuned in the "
                             f"{cfg.template!r} template")
        self.base = policy
        split = make_task_split(cfg.task_seed, n_train=cfg.n_task_train)
        train = [item for item in split.train if item.family in cfg.family_list]
        if len(train) < cfg.prompts_per_step:
            raise ValueError(f"{len(train)} training prompts, fewer than prompts_per_step={cfg.prompts_per_step}")
        val = split.val[:cfg.n_val]
        val_examples, _ = sft.tokenize_all(tokenizer, [i.messages() for i in val], self.template, cfg.context_length)
        self.pad_id = tokenizer.special_tokens.get("<|endoftext|>", 0)
        self._order = EpochOrder(len(train), cfg.seed)
        self._cache: dict | None = None  # the current batch of rollouts, its advantages and log-probs
        self._step_metrics: dict[str, float] = {}
        self._tokens_seen = 0  # prompt and answer tokens trained on, over resumes
        return _GRPOData(tokenizer, train, val, val_examples)

    def build_model(self) -> GPT:
        """The SFT model, in eval mode (no dropout: see the module docstring); a frozen copy of it is the reference."""
        import copy

        policy = self.base
        del self.base
        policy.eval()
        self.ref: GPT | None = None
        if self.cfg.kl_beta:
            self.ref = copy.deepcopy(policy).to(self.device).eval()
            self.ref.requires_grad_(False)
        return policy

    # ------------------------------------------------------------------ rollouts

    def prompts_of(self, batch_index: int) -> list[TaskItem]:
        """The prompts of rollout batch ``batch_index``: epochs of permutations seeded by (seed, epoch)."""
        per_step = self.cfg.prompts_per_step
        return [self.data.train_items[i] for i in self._order.take(batch_index * per_step, per_step)]

    def rollouts(self, batch_index: int) -> RolloutBatch:
        """Rollout batch ``batch_index``, sampled by the policy as it is now, seeded by (seed, batch_index)."""
        cfg = self.cfg
        seed = int(np.random.default_rng([cfg.seed, batch_index]).integers(2**62))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return sample_groups(self.raw_model, self.data.tokenizer, self.prompts_of(batch_index), cfg.group_size,
                             self.template, cfg.temperature, cfg.max_new_tokens, generator, cfg.rollout_batch_size)

    def _new_cache(self, batch_index: int) -> dict:
        cfg = self.cfg
        batch = self.rollouts(batch_index)
        rewards = batch.rewards
        advantages = group_advantages(rewards, scale=cfg.scale_advantages).flatten()
        x, y, _, positions = batch.to_batch(self.pad_id)
        x, y, positions = x.to(self.device), y.to(self.device), positions.to(self.device)
        if self.ref is not None:
            with torch.no_grad():  # right padding: causal attention already hides the pads from every real token
                ref_logp = token_logprobs(self.ref(x, positions=positions)[0], y)
        else:
            ref_logp = torch.zeros(y.shape, device=self.device)
        constant = (rewards == rewards[:, :1]).all(dim=1)
        stats = {"reward": rewards.mean().item(), "pass_rate": batch.passed.float().mean().item(),
                 "zero_std_groups": constant.float().mean().item(),
                 "length": batch.completion_lengths.float().mean().item(),
                 "tokens": int(sum(len(r.prompt_ids) + len(r.completion_ids) for r in batch.rollouts))}
        for family in FAMILIES:
            mine = [r.reward for r in batch.rollouts if r.item.family == family]
            if mine:
                stats[f"reward_{family}"] = sum(mine) / len(mine)
        return {"index": batch_index, "x": x, "y": y, "positions": positions, "advantages": advantages.to(self.device),
                "ref_logp": ref_logp, "old_logp": None, "stats": stats}

    def get_batch(self, step: int, micro: int) -> dict:  # type: ignore[override]
        """The rollout batch of ``step``: sampled anew every ``mu`` steps, reused in between."""
        index = step // self.cfg.mu
        if self._cache is None or self._cache["index"] != index:
            self._cache = self._new_cache(index)
        return self._cache

    def loss(self, batch: dict) -> Tensor:  # type: ignore[override]
        cfg = self.cfg
        logits, _ = self.model(batch["x"], positions=batch["positions"])
        logp = token_logprobs(logits, batch["y"])
        if batch["old_logp"] is None:  # the first step on these rollouts: the policy that sampled them is this one
            batch["old_logp"] = logp.detach()
        loss, metrics = grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"],
                                  batch["y"] != IGNORE_INDEX, cfg.clip_eps, cfg.kl_beta)
        self._step_metrics = {k: v.item() for k, v in metrics.items() if k != "kl" or self.ref is not None}
        return loss

    def train_step(self) -> tuple[Tensor, Tensor | None]:
        """One optimizer step, and a metrics record of its rollouts: the chapter's reward and KL curves."""
        loss, norm = super().train_step()
        record = {"step": self.step, **self._cache["stats"], **self._step_metrics, "grpo_loss": loss.item()}
        self._tokens_seen += record.pop("tokens")
        self.log(record)
        return loss, norm

    def step_tokens(self) -> int:
        """Tokens (prompts and answers, no padding) of the step just taken."""
        return self._cache["stats"]["tokens"] if self._cache else 0

    # ------------------------------------------------------------------ checkpoints (mu > 1 keeps its rollouts)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["tokens_seen"] = self._tokens_seen
        if self.cfg.mu > 1 and self._cache is not None and self.step % self.cfg.mu:
            state["rollouts"] = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in self._cache.items()}
        return state

    def load_training_state(self, state: dict, path: Path) -> None:
        super().load_training_state(state, path)
        self._tokens_seen = int(state.get("tokens_seen", 0))
        cache = state.get("rollouts")
        if cache is not None:
            self._cache = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in cache.items()}

    # ------------------------------------------------------------------ measuring

    @torch.no_grad()
    def validate(self) -> dict:
        """Greedy success and mean reward on ``n_val`` validation prompts; loss on their reference answers."""
        score, _ = score_task(self.raw_model, self.data.tokenizer, self.data.val_items, self.template)
        out = sft.response_loss(self.raw_model, self.data.val_examples, self.token_lengths, self.pad_id,
                                self.cfg.eval_batch_size, self.device)
        out.update(success=score.rate, reward=score.mean_score,
                   **{f"success_{f}": s.rate for f, s in score.per_family.items()})
        return out

    def _evaluate_and_sample(self) -> None:
        """``Trainer``'s evaluation, with the task's success and reward in the record."""
        self._check_finite()
        result = self.validate()
        if not math.isfinite(result["loss"]):
            raise self._diverged(f"the validation loss is {result['loss']}")
        self.last_eval = {"step": self.step, "val_loss": result["loss"], "val_bpb": result["bpb"],
                          "val_success": result["success"], "val_reward": result["reward"],
                          **{f"val_{k}": v for k, v in result.items() if k.startswith("success_")},
                          "elapsed_s": round(self.train_seconds, 3)}
        self.log(self.last_eval)
        if self.cfg.sample_tokens:
            self.log({"step": self.step, "prompt": self.cfg.sample_prompt, "text": self.sample()}, "samples.jsonl")
        if self.is_main and self.progress:
            from tqdm.auto import tqdm

            tqdm.write(f"step {self.step}: val success {result['success']:.1%}, reward {result['reward']:.3f}")

    def sample(self) -> str:
        """The greedy reply to ``sample_prompt``."""
        from llmbook.posttrain.chat import reply

        return reply(self.raw_model, self.data.tokenizer, [Message("user", self.cfg.sample_prompt)], self.template,
                     max_new_tokens=min(self.cfg.sample_tokens, self.cfg.context_length // 2), temperature=0.0)

    def _summary(self, finished: bool) -> dict:
        summary = super()._summary(finished)
        last = self.last_eval or {}
        summary.update(val_success=last.get("val_success"), val_reward=last.get("val_reward"),
                       rollouts=self.step // self.cfg.mu * self.cfg.prompts_per_step * self.cfg.group_size,
                       trainable_params=sum(p.numel() for p in self.params))
        summary.update(tokens_seen=self._tokens_seen,
                       tokens_per_s=self._tokens_seen / self.train_seconds if self.train_seconds else 0.0)
        return summary


# ---------------------------------------------------------------------- the book's GRPO models

_SAMPLE = 'Write a line of at most 8 words that uses the word "Darcy".'

GRPO_PRESETS: dict[str, GRPOConfig] = {
    # From sft-full, all four task families, 16 prompts x 8 answers a step at temperature 1, full weights at a
    # constant 5e-5 after 5 warmup steps, DeepSeekMath's clip (0.2) and KL beta (0.04), mu = 1, 40 steps. Measured
    # (seed 1337): 84 s for the whole run, evaluations included, with 2 threads on the 2-core machine otherwise
    # idle (124 CPU-seconds with threads=1). Over the 40 steps the sampled reward rose from 0.50 to 0.63 (10-step
    # means) and the pass rate from 26% to 42%, at a KL of 0.10 nats/token; greedy success on the val split's
    # first 100 prompts stayed at 51%. The gain is in *sampled* answers of the habit families (short_line,
    # capitals), which greedy decoding already passes 100%; the copying families (last_word, word_in_limit) pass
    # in under 0.5% of samples, so nearly all their groups have equal rewards and zero advantage: GRPO cannot
    # reinforce an answer the policy does not sample. Training on them alone (lr 1e-4 with G=8 for 50 steps, or lr
    # 3e-4 with G=16 for 40) left their greedy success at 0%; 113 steps of this recipe plateaued (sampled reward
    # ~0.6, KL ~0.12). Test split (400 prompts, measured once): 49.2% [44.4%, 54.1%] (mean score 0.620) against
    # sft-full's 50.2% [45.4%, 55.1%] (0.605): the mean score rises (word_in_limit's answers keep to the length
    # more often), the success rate does not. What GRPO does raise is the success of *sampled* answers: one answer
    # per test prompt at the training temperature 1.0 passes 38.0% [33.4%, 42.8%] against sft-full's 27.5% [23.4%,
    # 32.1%] (seed 0; seed 1: 38.0% vs 27.8%), intervals apart; at temperature 0.7, 48.2% vs 39.8% (seed 0) and
    # 47.8% vs 41.5% (seed 1), intervals overlapping. RL sharpened the distribution towards what greedy decoding
    # already picked.
    "grpo": GRPOConfig(name="grpo", base="sft-full", context_length=256, max_steps=40, lr=5e-5, weight_decay=0.0,
                       warmup_steps=5, min_lr_ratio=1.0, grad_clip=1.0, group_size=8, prompts_per_step=16,
                       temperature=1.0, max_new_tokens=32, eval_interval=20, log_interval=5, n_val=100,
                       sample_tokens=32, sample_prompt=_SAMPLE, seed=1337, rollout_batch_size=128),
    # seconds: tests (base: a tiny SFT run folder)
    "grpo-tiny": GRPOConfig(name="grpo-tiny", base="sft-tiny", context_length=256, max_steps=4, lr=1e-4,
                            weight_decay=0.0, warmup_steps=0, group_size=4, prompts_per_step=2, max_new_tokens=8,
                            eval_interval=2, log_interval=1, n_val=8, n_task_train=40, sample_tokens=8,
                            sample_prompt=_SAMPLE, threads=1),
}


def run_dir(name: str) -> Path:
    """Where the GRPO model ``name`` is cached: named by its recipe and by the SFT model it starts from."""
    if name not in GRPO_PRESETS:
        raise ValueError(f"no GRPO model {name!r}; the presets are: {', '.join(GRPO_PRESETS)}")
    cfg = GRPO_PRESETS[name]
    base = sft.run_dir(cfg.base).name if cfg.base in sft.SFT_PRESETS else str(Path(cfg.base).resolve())
    return recipe_dir(name, cfg, extra=f"|base={base}")


def ensure(name: str = "grpo", progress: bool = True, retrain: bool = False) -> Path:
    """The folder of the GRPO model ``name``, trained first (with its SFT base, if need be) if it is not cached."""
    folder = run_dir(name)
    cfg = GRPO_PRESETS[name]
    return ensure_trained(name, folder, lambda d: GRPOTrainer(cfg, d, progress=progress), cfg.max_steps, progress,
                          retrain)


def load(name: str = "grpo", device: str | torch.device = "cpu", progress: bool = True,
         retrain: bool = False) -> Pretrained:
    """The GRPO model ``name`` (a ``GRPO_PRESETS`` key) in eval mode, with its tokenizer, recipe and logs."""
    folder = ensure(name, progress, retrain)
    model, tokenizer = load_model(folder, device)
    config = GRPOConfig.from_file(folder / "config.json")
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return Pretrained(model.eval(), tokenizer, config, folder, summary)


def metrics(name: str) -> list[dict]:
    """The training log of a cached GRPO model (``metrics.jsonl``): per-step rollout records and evaluations."""
    return read_jsonl(run_dir(name) / "metrics.jsonl")


def main(argv: list[str] | None = None) -> int:
    """``python -m llmbook.posttrain.grpo NAME [--retrain]``: train (or resume) and cache a GRPO model."""
    return cache_cli(argv, "python -m llmbook.posttrain.grpo", "GRPO models", GRPO_PRESETS, "grpo", ensure,
                     lambda s: f"validation success {s['val_success']:.1%}, mean reward {s['val_reward']:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
