"""DPO: the loss equal to TRL's, its fixed points and gradient, held-out accuracy, the trainer, bad input.

The trainer tests run on a tiny chain built once per module, as tests/test_sft.py
does: a tiny base (llama-tiny, a 300-token BPE with the chat tokens, 3 steps
on 20 KB of Shakespeare), a tiny SFT model on it (3 steps of the task), and
DPO runs of a few steps on the polite pairs on top.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from llmbook import checkpoint, data
from llmbook.model import GPT
from llmbook.posttrain import dpo
from llmbook.posttrain.dpo import DPOConfig, DPOTrainer, dpo_loss, dpo_metrics, implicit_reward_accuracy, trl_dpo_loss
from llmbook.posttrain.logprobs import sequence_logprobs
from llmbook.posttrain.masking import Example
from llmbook.posttrain.pairs import PreferencePair, TokenizedPair, collate_pairs, polite_split, tokenize_pairs
from llmbook.posttrain.sft import SFTConfig, SFTTrainer
from llmbook.posttrain.templates import Message, get_template
from llmbook.train import TrainConfig, Trainer, load_model, read_jsonl

CONTEXT = 256


# ---------------------------------------------------------------------- the loss against TRL


def logps(B: int = 64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Four (B,) float32 log-probabilities of responses of tens of tokens (-5 to -200 nats), and (B,) lengths."""
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-5 - 195 * torch.rand(B, generator=g) for _ in range(4))
    pc, pr = rc + (pc - rc) * 0.05, rr + (pr - rr) * 0.05  # a policy near its reference: margins of a few nats
    lengths = torch.randint(5, 120, (2, B), generator=g)
    return pc, pr, rc, rr, lengths[0], lengths[1]


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_equals_trl(beta, loss_type):
    """TRL 1.16's ``DPOTrainer._compute_loss`` run on the same log-probabilities (``dpo.trl_dpo_loss`` says how)."""
    pc, pr, rc, rr, nc, nr = logps()
    ours = dpo_loss(pc, pr, rc, rr, beta, loss_type, chosen_lengths=nc, rejected_lengths=nr)
    theirs = trl_dpo_loss(pc, pr, rc, rr, beta, loss_type, chosen_lengths=nc, rejected_lengths=nr)
    error = (ours[0] - theirs[0]).abs().max().item()
    print(f"DPO loss vs TRL 1.16, {loss_type}, beta={beta}: max abs error {error:.2e} over {len(pc)} pairs "
          f"(losses {ours[0].min():.3f} to {ours[0].max():.3f})")
    assert error <= 1e-6
    for a, b in zip(ours[1:], theirs[1:], strict=True):  # the implicit rewards TRL logs
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_cdpo_equals_trl(label_smoothing):
    """cDPO (label smoothing): checked against TRL's 'aot' loss, which is cDPO for one pair (see trl_dpo_loss)."""
    pc, pr, rc, rr, _, _ = logps(B=32, seed=1)
    error = (dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", label_smoothing)[0]
             - trl_dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", label_smoothing)[0]).abs().max().item()
    print(f"cDPO (label_smoothing={label_smoothing}) vs TRL 1.16: max abs error {error:.2e}")
    assert error <= 1e-6
    smoothed, plain = dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", label_smoothing)[0], dpo_loss(pc, pr, rc, rr, 0.1)[0]
    assert (smoothed - plain).abs().max() > 1e-3  # the check is not vacuous


def test_metrics_are_batch_means_in_trl_names():
    pc, pr, rc, rr, _, _ = logps(B=8)
    _, chosen, rejected = dpo_loss(pc, pr, rc, rr, 0.1)
    got = dpo_metrics(chosen, rejected, pc, pr)
    assert list(got) == ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                         "logps/chosen", "logps/rejected"]
    assert got["rewards/margins"] == pytest.approx((chosen - rejected).mean().item())
    assert got["rewards/accuracies"] == pytest.approx((chosen > rejected).float().mean().item())
    assert got["logps/chosen"] == pytest.approx(pc.mean().item())


# ---------------------------------------------------------------------- fixed points and the gradient


def test_policy_equal_to_reference_gives_log_2_and_zero_margins():
    pc, pr, _, _, nc, nr = logps()
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, pc, pr)
    assert torch.equal(losses, torch.full_like(losses, math.log(2)))
    assert not chosen_rewards.any() and not rejected_rewards.any()
    ipo = dpo_loss(pc, pr, pc, pr, 0.5, "ipo", chosen_lengths=nc, rejected_lengths=nr)[0]
    assert torch.allclose(ipo, torch.full_like(ipo, 1.0))  # (0 - 1/(2 * 0.5))**2


def test_gradient_is_minus_beta_sigmoid_of_minus_beta_h():
    pc, pr, rc, rr, _, _ = logps(B=8)
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    dpo_loss(pc, pr, rc, rr, beta=0.5)[0].sum().backward()
    h = (pc - rc) - (pr - rr)
    weight = 0.5 * torch.sigmoid(-0.5 * h.detach())  # larger where the implicit reward ranks the pair wrongly
    torch.testing.assert_close(pc.grad, -weight)
    torch.testing.assert_close(pr.grad, weight)


def test_a_step_raises_the_margin_on_a_toy(seed_and_one_thread):
    """One SGD step on the DPO loss of a random tiny model: the chosen log-ratio rises, the rejected falls."""
    policy = GPT(GPT.from_preset("llama-tiny").cfg)
    reference = GPT(policy.cfg)
    reference.load_state_dict(policy.state_dict())
    reference.requires_grad_(False)
    prompt = [5, 6, 7, 8]
    chosen, rejected = [9, 10, 11, 12, 13], [20, 21, 22]
    pair = TokenizedPair(Example(prompt + chosen, [-100] * 4 + chosen),
                         Example(prompt + rejected, [-100] * 4 + rejected))
    batch = collate_pairs([pair], pad_id=0)
    with torch.no_grad():
        rc, rr = sequence_logprobs(reference, batch).chunk(2)
    pc, pr = sequence_logprobs(policy, batch).chunk(2)
    dpo_loss(pc, pr, rc, rr, beta=0.1)[0].mean().backward()
    with torch.no_grad():
        for p in policy.parameters():
            p -= 0.05 * p.grad
        pc2, pr2 = sequence_logprobs(policy, batch).chunk(2)
    assert (pc2 - rc).item() > 0 > (pr2 - rr).item()


# ---------------------------------------------------------------------- the tiny chain: base -> SFT -> DPO


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chain")
    text = folder / "text.txt"
    text.write_text(data.read_text("tinyshakespeare")[:20_000], encoding="utf-8")
    base = TrainConfig(name="base", model="llama-tiny", dataset=str(text), tokenizer="bpe-300+chat",
                       context_length=CONTEXT, batch_size=4, max_steps=3, eval_interval=0, sample_tokens=0, threads=1,
                       model_overrides={"dropout": 0.1})  # dropout, so the trainer's dropout-free copy is tested
    Trainer(base, folder / "base", progress=False).train()
    sft = SFTConfig(name="sft", base=str(folder / "base"), context_length=CONTEXT, data="task", n_task_train=40,
                    batch_size=4, max_steps=3, lr=3e-3, eval_interval=0, eval_batch_size=16, sample_tokens=0,
                    threads=1, warmup_steps=0)
    SFTTrainer(sft, folder / "sft", progress=False).train()
    return folder / "sft"


@pytest.fixture
def few_pairs(monkeypatch):
    """The polite split cut to 64 training and 12 validation pairs: the trainer's tests take seconds, not tens."""
    train, val, test = polite_split()
    monkeypatch.setattr(dpo, "polite_split", lambda: (train[:64], val[:12], test))


def tiny(sft_dir: Path, **overrides) -> DPOConfig:
    return dataclasses.replace(DPO_TINY, base=str(sft_dir), **overrides)


DPO_TINY = dataclasses.replace(dpo.DPO_PRESETS["dpo-tiny"], threads=1)


def param_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_tiny_run_writes_a_loadable_model_and_logs_trl_metrics(sft_dir, tmp_path, few_pairs):
    trainer = DPOTrainer(tiny(sft_dir), tmp_path / "run", progress=False)
    assert trainer.raw_model.cfg.dropout == 0.0  # the SFT model had dropout 0.1: DPO trains without (as TRL)
    assert len(trainer.data.train_pairs) == 64 and len(trainer.data.val_pairs) == 12
    summary = trainer.train()
    assert summary["finished"] and summary["trainable_params"] == summary["params"]
    assert 0 < summary["tokens_seen"] and summary["train_pairs"] == 64
    model, tok = load_model(tmp_path / "run")
    assert tok.special_tokens == trainer.data.tokenizer.special_tokens
    for a, b in zip(model.state_dict().values(), trainer.raw_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in records if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert {"val_rewards_chosen", "val_rewards_rejected", "val_logps_chosen", "val_logps_rejected"} <= set(evals[0])
    assert evals[0]["val_accuracy"] == 0.5 and evals[0]["val_margin"] == 0.0 and evals[0]["val_kl"] == 0.0
    assert evals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]["val_kl"] > 0
    train = [r for r in records if "lr" in r]
    assert len(train) == 4 and all(set(dpo.TRAIN_METRICS) <= set(r) for r in train)
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # step 0: policy == reference
    assert read_jsonl(tmp_path / "run" / "samples.jsonl")


def test_reference_is_frozen_and_outside_the_model(sft_dir, tmp_path, few_pairs):
    trainer = DPOTrainer(tiny(sft_dir), tmp_path / "run", progress=False)
    before = param_hash(trainer.reference)
    policy_before = param_hash(trainer.raw_model)
    assert before == policy_before  # both are the SFT model
    trainer.train()
    assert param_hash(trainer.reference) == before
    assert param_hash(trainer.raw_model) != policy_before
    ref_ids = {id(p) for p in trainer.reference.parameters()}
    assert not ref_ids & {id(p) for p in trainer.raw_model.parameters()}  # not a submodule of the policy
    assert not ref_ids & {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(not p.requires_grad for p in trainer.reference.parameters()) and not trainer.reference.training
    saved = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert set(saved["model"]) == set(trainer.raw_model.state_dict())  # the reference is not checkpointed
    assert int((~saved["ref_logps"].isnan()).sum()) == 2 * 4 * 4  # the 16 pairs drawn, each scored once


def test_resume_continues_exactly(sft_dir, tmp_path, few_pairs):
    straight = DPOTrainer(tiny(sft_dir), tmp_path / "a", progress=False)
    straight.train()
    first = DPOTrainer(tiny(sft_dir), tmp_path / "b", progress=False)
    first.train(stop_at=2)
    second = DPOTrainer(tiny(sft_dir), tmp_path / "b", progress=False)
    second.train(resume=True)
    for (name, a), (_, b) in zip(straight.raw_model.state_dict().items(), second.raw_model.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(straight.data.ref_chosen.nan_to_num(), second.data.ref_chosen.nan_to_num())


def test_held_out_accuracy_counts_ties_as_half(sft_dir):
    model, tok = load_model(sft_dir)
    _, val, _ = polite_split()
    pairs, _ = tokenize_pairs(tok, val[:10], get_template("chatml"), CONTEXT)
    result = implicit_reward_accuracy(model, model, pairs, beta=0.1, pad_id=0, batch_size=4)
    assert result["accuracy"] == 0.5 and result["ties"] == 10 and result["margin"] == 0.0 and result["kl"] == 0.0
    assert result["loss"] == pytest.approx(math.log(2))
    other = dpo.without_dropout(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)  # a different policy: no more ties, a positive KL
    result = implicit_reward_accuracy(other, model, pairs, beta=0.1, pad_id=0, batch_size=4)
    assert result["ties"] == 0 and result["kl"] > 0 and result["accuracy"] in {i / 10 for i in range(11)}
    assert model.training is False and other.training is True  # modes restored


def test_onpolicy_pairs_come_from_the_reference(sft_dir, tmp_path, monkeypatch):
    """``llmbook.posttrain.onpolicy`` (Chapter 10's sampler) replaced by a stand-in with the agreed signature."""
    calls = []

    def onpolicy_pairs(model, tokenizer, items, n_samples, template="chatml", seed=0, temperature=1.0,
                       max_new_tokens=48):
        calls.append((model, len(items), n_samples, seed))
        return [PreferencePair(tuple(item.messages(with_reference=False)), item.reference, "no")
                for item in items[:12]]

    monkeypatch.setitem(sys.modules, "llmbook.posttrain.onpolicy", types.SimpleNamespace(onpolicy_pairs=onpolicy_pairs))
    trainer = DPOTrainer(tiny(sft_dir, pairs="onpolicy", n_task_train=30, samples_per_prompt=3), tmp_path / "run",
                         progress=False)
    assert [c[1:] for c in calls] == [(30, 3, DPO_TINY.seed), (200, 3, DPO_TINY.seed + 1)]  # train, then val prompts
    assert all(c[0] is trainer.reference for c in calls)
    assert len(trainer.data.train_pairs) == len(trainer.data.val_pairs) == 12
    assert trainer.train()["finished"]


def test_no_onpolicy_pairs_is_one_line(sft_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llmbook.posttrain.onpolicy",
                        types.SimpleNamespace(onpolicy_pairs=lambda *a, **k: []))
    with pytest.raises(ValueError, match="no task prompt gave both a passing and a failing sample"):
        DPOTrainer(tiny(sft_dir, pairs="onpolicy", n_task_train=5), tmp_path / "run", progress=False)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": 0.0}, "beta must be a positive number"),
    ({"beta": -0.1}, "beta must be a positive number"),
    ({"beta": math.nan}, "beta must be a positive number"),
    ({"loss_type": "kto"}, "loss_type must be one of sigmoid, ipo"),
    ({"label_smoothing": 0.5}, r"in \[0, 0.5\)"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "IPO has no labels to smooth"),
    ({"loss_type": "ipo"}, "pass chosen_lengths and rejected_lengths"),
])
def test_bad_loss_settings_are_one_line(kwargs, message):
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=message):
        dpo_loss(x, x, x, x, **kwargs)


def test_bad_log_probabilities_are_one_line():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="got no pairs"):
        dpo_loss(*(torch.zeros(0),) * 4)
    with pytest.raises(ValueError, match="of one shape"):
        dpo_loss(x, x, x, torch.zeros(4))
    with pytest.raises(ValueError, match="at least one held-out pair"):
        implicit_reward_accuracy(GPT.from_preset("gpt-tiny"), GPT.from_preset("gpt-tiny"), [], 0.1)


@pytest.mark.parametrize("change, message", [
    ({"beta": 0.0}, "beta must be a positive number"),
    ({"loss_type": "hinge"}, "loss_type must be one of"),
    ({"pairs": "rude"}, "pairs must be one of polite, onpolicy"),
    ({"samples_per_prompt": 1}, "a passing and a failing sample"),
    ({"template": "vicuna"}, "vicuna"),
    ({"parallel": "ddp"}, "one process"),
])
def test_bad_settings_are_one_line(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(DPO_TINY, **change)


def test_bad_pairs_and_bases_are_one_line(sft_dir, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="neither an SFT preset"):
        DPOTrainer(tiny(tmp_path / "nothing"), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="set context_length=256"):
        DPOTrainer(tiny(sft_dir, context_length=128), tmp_path / "run", progress=False)
    with pytest.raises(TypeError, match="needs a DPOConfig"):
        DPOTrainer(TrainConfig(), tmp_path / "run", progress=False)
    long = PreferencePair((Message("user", "Say a lot."),), "word " * 400, "other " * 400)
    monkeypatch.setattr(dpo, "polite_split", lambda: ([long] * 5, [long], []))
    with pytest.raises(ValueError, match="none of the 5 training pairs fits context_length=256"):
        DPOTrainer(tiny(sft_dir), tmp_path / "run", progress=False)
    monkeypatch.setattr(dpo, "polite_split", lambda: ([], [long], []))
    with pytest.raises(ValueError, match="no training pairs"):
        DPOTrainer(tiny(sft_dir), tmp_path / "run", progress=False)


def test_a_base_model_without_the_chat_tokens_is_refused(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(data.read_text("tinyshakespeare")[:20_000], encoding="utf-8")
    cfg = TrainConfig(name="plain", model="gpt-tiny", dataset=str(text), tokenizer="bpe-300", context_length=CONTEXT,
                      batch_size=4, max_steps=1, eval_interval=0, sample_tokens=0, threads=1)
    Trainer(cfg, tmp_path / "plain", progress=False).train()
    with pytest.raises(ValueError, match="DPO starts from a model fine-tuned"):
        DPOTrainer(tiny(tmp_path / "plain"), tmp_path / "run", progress=False)


# ---------------------------------------------------------------------- presets and the command line


def test_presets_are_valid_and_cached_by_recipe_and_base(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMBOOK_CACHE_DIR", str(tmp_path))
    a, b = dpo.run_dir("dpo-polite"), dpo.run_dir("dpo-task")
    assert a.parent == b.parent == tmp_path / "models" and a.name.startswith("dpo-polite-") and a != b
    assert dpo.DPO_PRESETS["dpo-polite"].beta == 0.1 and dpo.DPO_PRESETS["dpo-task"].pairs == "onpolicy"
    changed = dataclasses.replace(dpo.DPO_PRESETS["dpo-polite"], beta=0.5)
    monkeypatch.setitem(dpo.DPO_PRESETS, "dpo-polite", changed)
    assert dpo.run_dir("dpo-polite") != a  # another recipe, another folder: never a stale model
    from llmbook.posttrain import sft

    monkeypatch.setitem(sft.SFT_PRESETS, "sft-full", dataclasses.replace(sft.SFT_PRESETS["sft-full"], lr=1e-4))
    assert dpo.run_dir("dpo-polite") != a  # another SFT model under it, another folder
    with pytest.raises(ValueError, match="no DPO model 'gpt5'"):
        dpo.run_dir("gpt5")


def test_command_line_reports_an_unknown_model_in_one_line():
    result = subprocess.run([sys.executable, "-m", "llmbook.posttrain.dpo", "gpt5"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no DPO model 'gpt5'; the presets are: " + ", ".join(dpo.DPO_PRESETS)]
