"""posttrain.reward_model: the scalar head on the SFT model, the Bradley–Terry loss (= TRL's), the trainer, bad input.

Everything runs on llama-tiny / gpt-tiny with a byte tokenizer plus the chat
tokens, and toy pairs (chosen answers end in "A", rejected in "B"): seconds.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmbook import checkpoint
from llmbook.bpe import Tokenizer
from llmbook.errors import CheckpointError
from llmbook.model import GPT
from llmbook.posttrain import reward_model as rm
from llmbook.posttrain.masking import IGNORE_INDEX, Example
from llmbook.posttrain.pairs import PreferencePair, TokenizedPair, tokenize_pair
from llmbook.posttrain.templates import CHATML, CHATML_SPECIAL_TOKENS, ENDOFTEXT, Message
from llmbook.posttrain.vocab import add_special_tokens
from llmbook.train import load_model

CONTEXT = 128

pytestmark = pytest.mark.usefixtures("seed_and_one_thread")


def chat_tokenizer() -> Tokenizer:
    return add_special_tokens(Tokenizer({i: bytes([i]) for i in range(256)}, [], [ENDOFTEXT], name="bytes"),
                              CHATML_SPECIAL_TOKENS)


def tiny_gpt(preset: str = "llama-tiny", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT.from_preset(preset, **{"vocab_size": 320, "context_length": CONTEXT, **overrides}).eval()


def toy_pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    """A separable preference: the same answer, ending in "A" (chosen) or "B" (rejected)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(rng.choice(["red", "blue", "tea", "sun", "cat"]) for _ in range(rng.randint(1, 4)))
        out.append(PreferencePair((Message("user", f"Say something {i}."),), f"{words} A", f"{words} B"))
    return out


def tokenized(pairs: list[PreferencePair], tok: Tokenizer) -> list[TokenizedPair]:
    return [tokenize_pair(tok, p, CHATML, CONTEXT) for p in pairs]


# ---------------------------------------------------------------------- the model


def test_reward_is_read_at_the_last_real_token_so_padding_changes_nothing():
    tok = chat_tokenizer()
    model = rm.RewardModel(tiny_gpt()).eval()
    pairs = tokenized(toy_pairs(6), tok)
    batch = rm.reward_batch(pairs, pad_id=0)
    together = model(batch.x, batch.mask, batch.positions)
    assert together.shape == (12,)
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    for i, example in enumerate(rows):
        alone = rm.ends_at_response(example)
        x = torch.tensor([alone.input_ids])
        assert x[0, -1] == tok.special_tokens["<|im_end|>"]  # the last real token is the response's end token
        assert torch.allclose(model(x), together[i:i + 1], atol=1e-5)
    # other pad ids, and more padding: the same rewards
    x2 = torch.cat([batch.x.masked_fill(~batch.mask, 7), torch.full((12, 5), 9)], dim=1)
    mask2 = torch.cat([batch.mask, torch.zeros(12, 5, dtype=torch.bool)], dim=1)
    assert torch.allclose(model(x2, mask2), together, atol=1e-5)
    # the reward is the head on the final hidden state (after norm_f) at that token
    gpt = model.transformer
    h = gpt.norm_f(gpt.blocks[1](gpt.blocks[0](gpt.tok_emb(x))))[0, -1]
    assert torch.allclose(model.score(h), model(x), atol=1e-5)


def test_the_chatml_newline_after_the_end_token_is_cut():
    tok = chat_tokenizer()
    pair = tokenized(toy_pairs(1), tok)[0]
    assert pair.chosen.input_ids[-1] == tok.encode_ordinary("\n")[0]  # what tokenize_example ends with
    cut = rm.ends_at_response(pair.chosen)
    assert cut.input_ids == pair.chosen.input_ids[:-1] and cut.labels[-1] == tok.special_tokens["<|im_end|>"]
    with pytest.raises(ValueError, match="no response token"):
        rm.ends_at_response(Example([1, 2], [IGNORE_INDEX, IGNORE_INDEX]))


def test_tied_embedding_stays_and_the_sft_model_is_not_changed():
    gpt = tiny_gpt("gpt-tiny")
    assert gpt.cfg.tied_embeddings and gpt.lm_head.weight is gpt.tok_emb.weight
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    model = rm.RewardModel(gpt)
    assert isinstance(model.transformer.lm_head, nn.Identity) and isinstance(gpt.lm_head, nn.Linear)
    assert torch.equal(model.transformer.tok_emb.weight, gpt.tok_emb.weight)
    assert model.transformer.tok_emb.weight is not gpt.tok_emb.weight  # a copy
    assert "transformer.lm_head.weight" not in model.state_dict() and "transformer.tok_emb.weight" in model.state_dict()
    assert model.cfg.dropout == 0.0  # TRL's disable_dropout
    # a training step moves the reward model's embedding, never the SFT model's
    pairs = tokenized(toy_pairs(4), chat_tokenizer())
    batch = rm.reward_batch(pairs, pad_id=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rm.bradley_terry_loss(*model(batch.x, batch.mask, batch.positions).chunk(2)).backward()
    assert model.transformer.tok_emb.weight.grad is not None
    opt.step()
    assert all(torch.equal(v, gpt.state_dict()[k]) for k, v in before.items())
    assert gpt.lm_head.weight is gpt.tok_emb.weight  # still tied
    assert model.num_params() == gpt.num_params() + gpt.cfg.d_model  # the tied matrix once, plus the head


def test_head_init_is_small_and_biasless():
    torch.manual_seed(0)
    model = rm.RewardModel(tiny_gpt(d_model=256, n_heads=4))
    assert model.score.bias is None and model.score.weight.shape == (1, 256)
    assert abs(model.score.weight.std().item() - rm.HEAD_STD) < 0.005


def test_freeze_below_trains_only_the_head_and_the_last_blocks():
    model = rm.RewardModel(tiny_gpt())
    model.freeze_below(1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and "transformer.norm_f.weight" in trainable
    assert all(n.startswith(("score", "transformer.norm_f", "transformer.blocks.1.")) for n in trainable)
    model.freeze_below(0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"score.weight", "transformer.norm_f.weight"}
    model.freeze_below(-1)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="train_blocks"):
        model.freeze_below(3)


def test_bad_input_is_one_clear_line():
    model = rm.RewardModel(tiny_gpt())
    x = torch.tensor([[1, 2, 3], [4, 5, 0]])
    with pytest.raises(ValueError, match="right-padded"):
        model(x, torch.tensor([[True, True, True], [False, True, True]]))
    with pytest.raises(ValueError, match="no real token"):
        model(x, torch.tensor([[True, True, True], [False, False, False]]))
    with pytest.raises(ValueError, match="mask must be"):
        model(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="one shape"):
        rm.bradley_terry_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="no pairs"):
        rm.pairwise_accuracy(model, [], pad_id=0)
    with pytest.raises(ValueError, match="pairs must be one of"):
        rm.RMConfig(pairs="human")
    with pytest.raises(ValueError, match="train_blocks"):
        rm.RMConfig(train_blocks=-2)
    with pytest.raises(ValueError, match="no reward model"):
        rm.run_dir("rm-nope")


# ---------------------------------------------------------------------- the loss


def test_bradley_terry_loss_is_the_negative_log_likelihood():
    r_c, r_r = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    by_hand = -torch.log(1 / (1 + torch.exp(-(r_c - r_r)))).mean()
    assert torch.allclose(rm.bradley_terry_loss(r_c, r_r), by_hand)
    assert rm.bradley_terry_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(0.693147, abs=1e-6)
    big = rm.bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]))  # logsigmoid: no overflow
    assert big.item() == pytest.approx(400.0)


class _Accelerator:
    def gather_for_metrics(self, t):
        return t

    def gather(self, t):
        return t


def trl_reward_loss(rewards: torch.Tensor, center: float | None = None, margin: torch.Tensor | None = None):
    """TRL's own ``RewardTrainer.compute_loss`` (trl 1.16), run on a model whose logits are ``rewards``.

    The method is called unbound, with only the attributes it reads: the
    accelerator (identity gathers, one process), the metrics store and args.
    """
    from trl.trainer.reward_trainer import RewardTrainer

    fake = SimpleNamespace(model=SimpleNamespace(training=False), accelerator=_Accelerator(),
                           _metrics={"eval": __import__("collections").defaultdict(list)},
                           _total_train_tokens=0, _tp_size=1,
                           args=SimpleNamespace(center_rewards_coefficient=center))
    inputs = {"input_ids": torch.zeros(len(rewards), 3, dtype=torch.long),
              "attention_mask": torch.ones(len(rewards), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    model = lambda **kw: SimpleNamespace(logits=rewards.unsqueeze(-1))  # noqa: E731 (B, 1): num_labels=1
    return RewardTrainer.compute_loss(fake, model, inputs), fake._metrics["eval"]


def test_loss_equals_trls_reward_trainer():
    torch.manual_seed(0)
    for scale in (0.1, 1.0, 10.0):
        rewards = torch.randn(16) * scale  # 8 chosen then 8 rejected: TRL's collator's layout, and collate_pairs'
        ours = rm.bradley_terry_loss(*rewards.chunk(2))
        theirs, trl_metrics = trl_reward_loss(rewards)
        assert torch.allclose(ours, theirs, atol=1e-7, rtol=0)
        assert trl_metrics["accuracy"][0] == pytest.approx((rewards[:8] > rewards[8:]).float().mean().item())
        # center_rewards_coefficient (Eisenstein et al. 2023) is an extra term on top of the same loss
        centered, _ = trl_reward_loss(rewards, center=0.01)
        r_c, r_r = rewards.chunk(2)
        assert torch.allclose(ours + 0.01 * ((r_c + r_r) ** 2).mean(), centered, atol=1e-6)


def test_pairs_are_laid_out_like_trls_preference_collator():
    from trl.trainer.reward_trainer import DataCollatorForPreference

    tok = chat_tokenizer()
    pairs = tokenized(toy_pairs(3), tok)
    ours = rm.reward_batch(pairs, pad_id=0)
    cut = [(rm.ends_at_response(p.chosen).input_ids, rm.ends_at_response(p.rejected).input_ids) for p in pairs]
    theirs = DataCollatorForPreference(pad_token_id=0)([{"chosen_ids": c, "rejected_ids": r} for c, r in cut])
    assert torch.equal(ours.x, theirs["input_ids"]) and torch.equal(ours.mask.long(), theirs["attention_mask"])


def test_pairwise_accuracy_counts_ties_half():
    model = rm.RewardModel(tiny_gpt())
    nn.init.zeros_(model.score.weight)  # every reward 0: all ties
    pairs = tokenized(toy_pairs(5), chat_tokenizer())
    assert rm.pairwise_accuracy(model, pairs, pad_id=0, batch_size=2) == 0.5
    assert rm.accuracy_of(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])) == pytest.approx(0.5)


def test_reward_model_learns_a_separable_preference():
    tok = chat_tokenizer()
    train, test = tokenized(toy_pairs(32, seed=1), tok), tokenized(toy_pairs(16, seed=2), tok)
    torch.manual_seed(0)
    model = rm.RewardModel(tiny_gpt()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    r_c, r_r = rm.pair_rewards(model, test, pad_id=0)
    assert float((r_c - r_r).abs().max()) < 0.1  # untrained: the small head scores every answer about alike
    losses = []
    for step in range(8):
        batch = rm.reward_batch(train[8 * (step % 4):8 * (step % 4) + 8], pad_id=0)
        loss = rm.bradley_terry_loss(*model(batch.x, batch.mask, batch.positions).chunk(2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(0.693, abs=0.05)  # small head: every reward near 0, a coin flip
    assert losses[-1] < 0.05
    assert rm.pairwise_accuracy(model, test, pad_id=0) == 1.0  # held-out pairs, all ranked right
    r_c, r_r = rm.pair_rewards(model, test, pad_id=0)
    assert float((r_c - r_r).min()) > 2.0  # by a wide margin: sigmoid(2) = 0.88


# ---------------------------------------------------------------------- the trainer


@pytest.fixture
def sft_dir(tmp_path) -> Path:
    """A run folder that holds an "SFT model": llama-tiny (random weights) and the byte + chat tokenizer."""
    folder = tmp_path / "sft"
    folder.mkdir()
    gpt = tiny_gpt(dropout=0.1)
    checkpoint.save_checkpoint(folder / "model.pt", {"model_config": dataclasses.asdict(gpt.cfg),
                                                     "state_dict": gpt.state_dict()})
    chat_tokenizer().save(folder / "tokenizer.json")
    return folder


def tiny_cfg(sft_dir: Path, **overrides) -> rm.RMConfig:
    values = dict(name="rm", base=str(sft_dir), pairs="polite", context_length=CONTEXT, batch_size=4, max_steps=4,
                  lr=3e-3, eval_interval=2, eval_batch_size=8, log_interval=1, threads=1, warmup_steps=0,
                  weight_decay=0.0)
    values.update(overrides)
    return rm.RMConfig(**values)


@pytest.fixture
def toy_polite(monkeypatch):
    """polite_split replaced by toy pairs (train, val, test), so a run takes seconds."""
    split = (toy_pairs(24, seed=1), toy_pairs(8, seed=2), toy_pairs(8, seed=3))
    monkeypatch.setattr(rm, "polite_split", lambda: split)
    return split


def test_rm_trainer_writes_a_loadable_reward_model(sft_dir, tmp_path, toy_polite):
    trainer = rm.RMTrainer(tiny_cfg(sft_dir), tmp_path / "run", progress=False)
    x, _, mask, _ = trainer.get_batch(0, 0)
    assert x.shape[0] == 8  # 4 pairs: 4 chosen rows, then 4 rejected rows
    ends = x[torch.arange(8), mask.sum(1) - 1]
    assert bool((ends == trainer.data.tokenizer.special_tokens["<|im_end|>"]).all())
    summary = trainer.train()
    assert summary["finished"] and summary["pairs_seen"] == 16 and summary["train_pairs"] == 24
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    evals = [m for m in rm.read_jsonl(tmp_path / "run" / "metrics.jsonl") if "val_loss" in m]
    assert [m["step"] for m in evals] == [0, 2, 4] and all("val_accuracy" in m for m in evals)
    assert evals[0]["val_loss"] == pytest.approx(0.693, abs=0.05)
    # model.pt holds the reward model, read with weights_only=True (llmbook.checkpoint)
    model, tok = rm.load_reward_model(tmp_path / "run")
    assert tok.special_tokens == trainer.data.tokenizer.special_tokens
    val = trainer.data.val_pairs
    # (the trainer's copy runs PyTorch's fused norm kernels, the loaded one the book's: equal to rounding)
    assert torch.allclose(rm.pair_rewards(model, val, 0)[0], rm.pair_rewards(trainer.raw_model, val, 0)[0],
                          atol=1e-5)
    assert rm.pairwise_accuracy(model, val, 0) == pytest.approx(summary["val_accuracy"])
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(tmp_path / "run")  # a language-model loader refuses it in one line
    with pytest.raises(CheckpointError, match="no reward head"):
        rm.load_reward_model(sft_dir)


def test_rm_trainer_resumes_exactly(sft_dir, tmp_path, toy_polite):
    cfg = tiny_cfg(sft_dir)
    whole = rm.RMTrainer(cfg, tmp_path / "whole", progress=False)
    whole.train()
    first = rm.RMTrainer(cfg, tmp_path / "split", progress=False)
    first.train(stop_at=2)
    second = rm.RMTrainer(cfg, tmp_path / "split", progress=False)
    second.train(resume=True)
    assert second.step == 4
    for (name, a), b in zip(whole.raw_model.state_dict().items(), second.raw_model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_rm_trainer_can_freeze_the_lower_blocks(sft_dir, tmp_path, toy_polite):
    trainer = rm.RMTrainer(tiny_cfg(sft_dir, train_blocks=0, max_steps=1), tmp_path / "run", progress=False)
    frozen = {k: v.clone() for k, v in trainer.raw_model.state_dict().items() if "blocks" in k}
    summary = trainer.train()
    assert summary["trainable_params"] == trainer.raw_model.cfg.d_model * 2  # the head and norm_f's gain
    assert all(torch.equal(v, trainer.raw_model.state_dict()[k]) for k, v in frozen.items())


def test_onpolicy_pairs_come_from_the_sft_model_on_the_task(sft_dir, tmp_path, monkeypatch):
    import llmbook.posttrain.onpolicy as onpolicy

    calls = []

    def fake(model, tokenizer, items, n_samples, template="chatml", seed=0, temperature=1.0, max_new_tokens=48):
        calls.append((len(items), n_samples, seed, max_new_tokens))
        return [PreferencePair(tuple(item.messages(with_reference=False)), "yes A", "no B") for item in items]

    monkeypatch.setattr(onpolicy, "onpolicy_pairs", fake)
    cfg = tiny_cfg(sft_dir, pairs="onpolicy", onpolicy_prompts=12, onpolicy_samples=3, onpolicy_tokens=16,
                   n_task_train=40, max_steps=1, eval_interval=0)
    trainer = rm.RMTrainer(cfg, tmp_path / "run", progress=False)
    # one pair per prompt (the fake pairs every one), less the few over 128 bytes (a byte tokenizer here)
    assert 10 <= len(trainer.data.train_pairs) <= 12 and 180 <= len(trainer.data.val_pairs) <= 200
    assert len(trainer.data.train_pairs) + len(trainer.data.val_pairs) + trainer.data.dropped == 212
    assert calls == [(12, 3, cfg.seed, 16), (200, 3, cfg.seed + 1, 16)]
    trainer.train()


def test_too_few_pairs_and_a_wrong_context_are_one_line(sft_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(rm, "polite_split", lambda: (toy_pairs(2), toy_pairs(2), toy_pairs(2)))
    with pytest.raises(ValueError, match="at least batch_size=4"):
        rm.RMTrainer(tiny_cfg(sft_dir), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="context_length=64 differs"):
        rm.RMTrainer(tiny_cfg(sft_dir, context_length=64), tmp_path / "run", progress=False)
    with pytest.raises(FileNotFoundError, match="neither an SFT preset"):
        rm.RMTrainer(tiny_cfg(tmp_path / "nothing"), tmp_path / "run", progress=False)


def test_presets_and_cache_folders():
    assert set(rm.RM_PRESETS) >= {"rm-polite", "rm-task", "rm-tiny"}
    assert rm.RM_PRESETS["rm-polite"].pairs == "polite" and rm.RM_PRESETS["rm-task"].pairs == "onpolicy"
    assert all(cfg.base == "sft-full" for name, cfg in rm.RM_PRESETS.items() if name != "rm-tiny")
    assert rm.run_dir("rm-polite") != rm.run_dir("rm-task")
    assert rm.run_dir("rm-polite").name.startswith("rm-polite-")


def test_main_names_the_presets_on_a_wrong_name(capsys):
    assert rm.main(["rm-nope"]) == 2
    assert "rm-polite" in capsys.readouterr().err


def test_loss_gradient_ignores_a_shared_reward_offset():
    """Only differences count: the BT loss's gradient with respect to a shared bias is exactly zero."""
    r = torch.randn(8)
    bias = torch.zeros((), requires_grad=True)
    rm.bradley_terry_loss(r[:4] + bias, r[4:] + bias).backward()
    assert bias.grad.item() == 0.0
    assert F.logsigmoid(torch.tensor(0.0)).item() == pytest.approx(-0.693147, abs=1e-6)


def test_preference_pairs_of_each_split():
    from llmbook.posttrain.pairs import polite_split

    train, val, test = polite_split()
    cfg = rm.RMConfig(name="x")
    assert rm.preference_pairs(cfg, "test") == test and rm.preference_pairs(cfg, "train") == train
    with pytest.raises(ValueError, match="pass model and tokenizer"):
        rm.preference_pairs(rm.RMConfig(name="x", pairs="onpolicy"), "val")
    with pytest.raises(ValueError, match="split is"):
        rm.preference_pairs(cfg, "dev")
