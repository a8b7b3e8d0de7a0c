"""GRPO: group advantages, the k3 KL estimator, the clipped loss and its gradient, and a smoke run on the Trainer.

The smoke runs start from a tiny SFT model (llama-tiny, a 300-token BPE with
the chat tokens, 3 steps of pretraining and 3 of SFT on the task), built once
per module as tests/test_sft.py does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from llmbook import data
from llmbook.posttrain import grpo
from llmbook.posttrain.grpo import GRPOConfig, GRPOTrainer, group_advantages, grpo_loss, kl_k3
from llmbook.posttrain.logprobs import token_logprobs
from llmbook.posttrain.sft import SFTConfig, SFTTrainer
from llmbook.train import TrainConfig, Trainer, load_model, read_jsonl

CONTEXT = 256


# ---------------------------------------------------------------------- advantages


def test_advantages_are_normalized_within_each_group():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(5, 8, generator=g)
    adv = group_advantages(rewards)
    assert adv.shape == (5, 8)
    assert torch.allclose(adv.mean(dim=1), torch.zeros(5), atol=1e-6)
    assert torch.allclose(adv.std(dim=1), torch.ones(5), atol=1e-3)  # eps=1e-4 over a std of ~0.3
    # each group on its own: shifting or scaling one group's rewards changes nothing
    assert torch.allclose(group_advantages(torch.cat([rewards[:1] * 3 + 2, rewards[1:]])), adv, atol=1e-3)
    unscaled = group_advantages(rewards, scale=False)  # Dr. GRPO
    assert torch.allclose(unscaled, rewards - rewards.mean(dim=1, keepdim=True))


def test_zero_variance_groups_give_exactly_zero_advantages():
    rewards = torch.tensor([[0.3] * 8, [1.0] * 8, [0.0] * 7 + [1.0]])
    adv = group_advantages(rewards)
    assert (adv[:2] == 0).all()  # not 1e-8: exactly nothing to learn
    assert adv[2, 7] > 2 and (adv[2, :7] < 0).all()  # the one success stands out
    assert (group_advantages(rewards, scale=False)[:2] == 0).all()


def test_group_of_one_is_a_clear_error():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.ones(4, 1))
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOConfig(group_size=1)


# ---------------------------------------------------------------------- the KL estimator


def test_k3_is_nonnegative_and_zero_at_equal_policies():
    g = torch.Generator().manual_seed(1)
    logp, ref = -torch.rand(100, generator=g) * 5, -torch.rand(100, generator=g) * 5
    assert (kl_k3(logp, ref) >= 0).all()
    assert (kl_k3(logp, logp) == 0).all()


def test_k3_mean_estimates_kl_on_a_toy_categorical():
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])  # the policy, which samples
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])  # the reference
    kl = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(2))
    estimate = kl_k3(p.log()[x], q.log()[x]).mean().item()
    assert estimate == pytest.approx(kl, rel=0.03)


# ---------------------------------------------------------------------- the loss


def _toy(seed: int = 0, n: int = 6, t: int = 5, v: int = 7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, v, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[0, 3:] = -100  # answers of different lengths
    labels[2, 1:] = -100
    return logits, labels, labels != -100, torch.randn(n, generator=g)


def test_loss_gradient_is_reinforce_with_baseline_when_mu_is_one():
    logits, labels, mask, adv = _toy()
    logp = token_logprobs(logits, labels)
    loss, metrics = grpo_loss(logp, logp.detach(), logp.detach() - 0.3, adv, mask, kl_beta=0.0)
    (grad,) = torch.autograd.grad(loss, logits)
    # REINFORCE with the group mean as baseline: -(1/N) sum_i A_i (1/|o_i|) sum_t grad log pi(o_t)
    logp2 = token_logprobs(logits, labels)
    surrogate = -(adv.unsqueeze(1) * logp2 * mask).sum(dim=1).div(mask.sum(dim=1)).mean()
    (want,) = torch.autograd.grad(surrogate, logits)
    assert torch.allclose(grad, want, atol=1e-6)
    assert metrics["ratio"].item() == pytest.approx(1.0) and metrics["clip_fraction"].item() == 0.0
    assert loss.item() == pytest.approx(-(adv.mean()).item(), abs=1e-6)  # ratio 1: the mean advantage


def test_clipping_stops_the_gradient_only_past_the_clip_in_the_advantages_direction():
    eps = 0.2
    logp = torch.zeros(4, 1, requires_grad=True)
    # ratios 1.5, 0.5, 1.5, 1.1 for advantages +1, -1, -1, +1
    old = torch.log(torch.tensor([[1 / 1.5], [1 / 0.5], [1 / 1.5], [1 / 1.1]]))
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, metrics = grpo_loss(logp, old, logp.detach(), adv, torch.ones(4, 1, dtype=torch.bool), eps, kl_beta=0.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[0].item() == 0.0  # ratio above 1 + eps and A > 0: clipped, no more push up
    assert grad[1].item() == 0.0  # ratio below 1 - eps and A < 0: clipped, no more push down
    assert grad[2].item() != 0.0  # above 1 + eps but A < 0: the unclipped term is the smaller; it pulls back
    assert grad[3].item() != 0.0  # inside the clip range
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)


def test_kl_penalty_pulls_towards_the_reference():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-0.5, -2.5]])
    loss, metrics = grpo_loss(logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 2, dtype=torch.bool),
                              kl_beta=1.0)
    (grad,) = torch.autograd.grad(loss, logp)
    # d k3 / d logp = 1 - exp(ref - logp): descending the loss raises logp where ref is above it
    assert grad[0, 0] < 0 < grad[0, 1]
    assert metrics["kl"].item() == pytest.approx(kl_k3(logp, ref).mean().item())


def test_bad_loss_inputs_are_clear():
    logits, labels, mask, adv = _toy()
    logp = token_logprobs(logits, labels)
    with pytest.raises(ValueError, match="advantages must be"):
        grpo_loss(logp, logp, logp, adv[:3], mask)
    with pytest.raises(ValueError, match="no token in mask"):
        grpo_loss(logp, logp, logp, adv, torch.zeros_like(mask))


# ---------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grpo-base")
    text = folder / "text.txt"
    text.write_text(data.read_text("tinyshakespeare")[:20_000], encoding="utf-8")
    cfg = TrainConfig(name="base", model="llama-tiny", dataset=str(text), tokenizer="bpe-300+chat",
                      context_length=CONTEXT, batch_size=4, max_steps=3, eval_interval=0, sample_tokens=0,
                      threads=1, model_overrides={"dropout": 0.0})
    Trainer(cfg, folder / "base", progress=False).train()
    sft_cfg = SFTConfig(name="sft", base=str(folder / "base"), context_length=CONTEXT, data="task", n_task_train=40,
                        batch_size=4, max_steps=3, lr=3e-3, eval_interval=0, eval_batch_size=16, sample_tokens=0,
                        threads=1, warmup_steps=0)
    SFTTrainer(sft_cfg, folder / "sft", progress=False).train()
    return folder / "sft"


def tiny(sft_dir: Path, **overrides) -> GRPOConfig:
    return dataclasses.replace(grpo.GRPO_PRESETS["grpo-tiny"], base=str(sft_dir), **overrides)


def test_smoke_run_trains_logs_and_keeps_the_reference_frozen(sft_dir, tmp_path):
    trainer = GRPOTrainer(tiny(sft_dir), tmp_path / "run", progress=False)
    ref_before = {k: v.clone() for k, v in trainer.ref.state_dict().items()}
    assert not any(p is q for p in trainer.ref.parameters() for q in trainer.raw_model.parameters())
    assert not any(name.startswith("ref") for name, _ in trainer.raw_model.named_parameters())
    policy_before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    summary = trainer.train()
    assert summary["finished"] and summary["steps"] == 4 and summary["rollouts"] == 4 * 2 * 4
    for k, v in trainer.ref.state_dict().items():
        assert torch.equal(v, ref_before[k]), k  # the reference never changes
    assert all(not p.requires_grad for p in trainer.ref.parameters())
    changed = [k for k, v in trainer.raw_model.state_dict().items() if not torch.equal(v, policy_before[k])]
    assert changed  # the policy does
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert 0 <= r["reward"] <= 1 and 0 <= r["pass_rate"] <= 1 and r["kl"] >= 0 and r["length"] >= 1
        assert 0 <= r["clip_fraction"] <= 1 and r["ratio"] == pytest.approx(1.0)  # mu = 1
    evals = [r for r in records if "val_success" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all(0 <= r["val_reward"] <= 1 for r in evals)
    model, _ = load_model(tmp_path / "run")
    assert all(torch.equal(v, trainer.raw_model.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("mu", [1, 2])
def test_resume_is_exact(sft_dir, tmp_path, mu):
    cfg = tiny(sft_dir, mu=mu, eval_interval=0, sample_tokens=0)
    straight = GRPOTrainer(cfg, tmp_path / "a", progress=False)
    straight.train()
    first = GRPOTrainer(cfg, tmp_path / "b", progress=False)
    first.train(stop_at=3)  # with mu=2: in the middle of the second batch of rollouts
    resumed = GRPOTrainer(cfg, tmp_path / "b", progress=False)
    resumed.train(resume=True)
    for k, v in straight.raw_model.state_dict().items():
        assert torch.equal(v, resumed.raw_model.state_dict()[k]), k
    rewards = [[r["reward"] for r in read_jsonl(tmp_path / d / "metrics.jsonl") if "reward" in r] for d in "ab"]
    assert rewards[0] == rewards[1]
    if mu == 2:
        ratios = [r["ratio"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "ratio" in r]
        assert ratios[0] == pytest.approx(1.0) and ratios[1] != pytest.approx(1.0, abs=1e-7)  # reused rollouts


def test_without_kl_no_reference_model_is_kept(sft_dir, tmp_path):
    trainer = GRPOTrainer(tiny(sft_dir, kl_beta=0.0, max_steps=1, eval_interval=0, sample_tokens=0),
                          tmp_path / "run", progress=False)
    assert trainer.ref is None
    trainer.train()
    steps = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert len(steps) == 1 and "kl" not in steps[0]  # no reference, no KL to report


def test_bad_configs_are_one_clear_line(sft_dir):
    with pytest.raises(ValueError, match="unknown task families"):
        GRPOConfig(families="haiku")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        GRPOConfig(temperature=0.0)
    with pytest.raises(FileNotFoundError, match="neither an SFT preset"):
        GRPOTrainer(GRPOConfig(base="/nonexistent", context_length=CONTEXT), "/tmp/unused", progress=False)
    with pytest.raises(ValueError, match="context_length"):
        GRPOTrainer(tiny(sft_dir, context_length=128), "/tmp/unused", progress=False)
    with pytest.raises(ValueError, match="no GRPO model"):
        grpo.run_dir("nope")
