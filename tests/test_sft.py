"""SFT on the Trainer: examples instead of a token stream, response-only validation, LoRA runs, resume, bad input.

A tiny base model (llama-tiny, a 300-token BPE with the chat special tokens,
a few steps on 20 KB of Shakespeare) is trained once per module; every SFT
run here is a handful of steps of the verifiable task on top of it.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmbook import checkpoint, data
from llmbook.model import GPT
from llmbook.posttrain import sft
from llmbook.posttrain.collate import collate
from llmbook.posttrain.lora import LoRALinear
from llmbook.posttrain.masking import IGNORE_INDEX
from llmbook.posttrain.sft import SFTConfig, SFTTrainer, response_loss
from llmbook.train import TrainConfig, Trainer, load_model

CONTEXT = 256


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    text = folder / "text.txt"
    text.write_text(data.read_text("tinyshakespeare")[:20_000], encoding="utf-8")
    cfg = TrainConfig(name="base", model="llama-tiny", dataset=str(text), tokenizer="bpe-300+chat",
                      context_length=CONTEXT, batch_size=4, max_steps=3, eval_interval=0, sample_tokens=0,
                      threads=1, model_overrides={"dropout": 0.0})
    Trainer(cfg, folder / "run", progress=False).train()
    return folder / "run"


def tiny(base_dir: Path, **overrides) -> SFTConfig:
    values = dict(name="sft", base=str(base_dir), context_length=CONTEXT, data="task", n_task_train=40,
                  batch_size=4, max_steps=4, lr=3e-3, eval_interval=2, eval_batch_size=16, log_interval=1,
                  sample_tokens=4, threads=1, warmup_steps=0)
    values.update(overrides)
    return SFTConfig(**values)


def test_base_tokenizer_reserves_the_chat_tokens(base_dir):
    _, tok = load_model(base_dir)
    assert tok.vocab_size == 300
    assert set(tok.special_tokens) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}


def test_sft_trains_on_response_tokens_and_writes_a_loadable_model(base_dir, tmp_path):
    trainer = SFTTrainer(tiny(base_dir), tmp_path / "run", progress=False)
    rows = trainer.data.train_rows
    assert rows.examples and all(sum(len(rows.examples[i]) for i in row) <= CONTEXT for row in rows.rows)
    x, y, mask, positions = trainer.get_batch(0, 0)
    assert x.shape == y.shape == (4, CONTEXT) and mask.shape == (4, 1, CONTEXT, CONTEXT)
    assert (y != IGNORE_INDEX).sum() < (x != trainer.pad_id).sum()  # the prompts carry no loss
    summary = trainer.train()
    assert summary["finished"] and summary["trainable_params"] == summary["params"]
    assert 0 < summary["tokens_seen"] <= 4 * 4 * CONTEXT  # real tokens, not padding
    model, tok = load_model(tmp_path / "run")
    assert tok.special_tokens == trainer.data.tokenizer.special_tokens
    metrics = [m for m in sft.read_jsonl(tmp_path / "run" / "metrics.jsonl") if "val_loss" in m]
    assert [m["step"] for m in metrics] == [0, 2, 4]
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"]  # four steps at lr 3e-3 learn the format's tokens


def test_validation_is_the_mean_over_response_tokens(base_dir, tmp_path):
    trainer = SFTTrainer(tiny(base_dir), tmp_path / "run", progress=False)
    examples = trainer.data.val_examples[:5]
    got = response_loss(trainer.raw_model, examples, trainer.token_lengths, trainer.pad_id, batch_size=2)
    nats, n = 0.0, 0
    with torch.no_grad():
        trainer.raw_model.eval()
        for e in examples:  # one at a time, no padding
            x, y, _, _ = collate([e], trainer.pad_id)
            logits, _ = trainer.raw_model(x)
            keep = y != IGNORE_INDEX
            nats += torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum").item()
            n += int(keep.sum())
    assert got["tokens"] == n == sum(e.n_trained for e in examples) - len(examples) + len(examples)
    assert got["loss"] == pytest.approx(nats / n, rel=1e-5)


def test_packed_and_padded_batches_give_the_same_per_example_loss(base_dir, tmp_path):
    packed = SFTTrainer(tiny(base_dir), tmp_path / "a", progress=False)
    padded = SFTTrainer(tiny(base_dir, packing=False), tmp_path / "b", progress=False)
    assert len(padded.data.train_rows.rows) == len(packed.data.train_rows.examples) > len(packed.data.train_rows.rows)
    x, y, mask, positions = packed.get_batch(0, 0)
    model = packed.raw_model.eval()
    with torch.no_grad():
        logits, _ = model(x, positions=positions, mask=mask)
        packed_nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        row_examples = [packed.data.train_rows.examples[i] for r in packed._rows_of(0, 0)
                        for i in packed.data.train_rows.rows[r]]
        alone = response_loss(model, row_examples, packed.token_lengths, packed.pad_id)
    assert packed_nats.item() / alone["tokens"] == pytest.approx(alone["loss"], rel=1e-5)


def test_resume_continues_exactly(base_dir, tmp_path):
    straight = SFTTrainer(tiny(base_dir), tmp_path / "a", progress=False)
    straight.train()
    first = SFTTrainer(tiny(base_dir), tmp_path / "b", progress=False)
    first.train(stop_at=2)
    second = SFTTrainer(tiny(base_dir), tmp_path / "b", progress=False)
    second.train(resume=True)
    for (name, a), (_, b) in zip(straight.raw_model.state_dict().items(), second.raw_model.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_lora_run_trains_only_adapters_and_saves_them_apart(base_dir, tmp_path):
    base_model, _ = load_model(base_dir)
    trainer = SFTTrainer(tiny(base_dir, lora_r=4, lora_alpha=8.0, lora_targets="qkv,proj"), tmp_path / "run",
                         progress=False)
    lora = [m for m in trainer.raw_model.modules() if isinstance(m, LoRALinear)]
    assert lora and all(not p.requires_grad for p in trainer.raw_model.tok_emb.parameters())
    summary = trainer.train()
    assert summary["trainable_params"] == sum(m.lora_A.numel() + m.lora_B.numel() for m in lora)
    for m in lora:  # the frozen base weights did not move; the adapters did
        assert m.lora_B.abs().sum() > 0
    for name, p in base_model.state_dict().items():
        if not name.endswith(("qkv.weight", "proj.weight")) or "mlp" in name:
            assert torch.equal(p, dict(trainer.raw_model.named_parameters()).get(name, p)), name
    merged, _ = load_model(tmp_path / "run")  # model.pt: a plain GPT with the adapters merged in
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(x)[0], trainer.raw_model.eval()(x)[0], rtol=1e-5, atol=1e-5)
    adapter = checkpoint.load_checkpoint(tmp_path / "run" / sft.ADAPTER_FILE)
    assert adapter["lora"]["r"] == 4 and all("lora_" in k for k in adapter["state_dict"])


def test_a_base_without_the_template_tokens_is_resized(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(data.read_text("tinyshakespeare")[:20_000], encoding="utf-8")
    cfg = TrainConfig(name="plain", model="gpt-tiny", dataset=str(text), tokenizer="bpe-300", context_length=CONTEXT,
                      batch_size=4, max_steps=1, eval_interval=0, sample_tokens=0, threads=1)
    Trainer(cfg, tmp_path / "plain", progress=False).train()
    trainer = SFTTrainer(tiny(tmp_path / "plain", max_steps=1), tmp_path / "run", progress=False)
    assert {"<|im_start|>", "<|im_end|>"} <= set(trainer.data.tokenizer.special_tokens)
    assert trainer.raw_model.cfg.vocab_size >= trainer.data.tokenizer.vocab_size
    trainer.train()
    _, tok = load_model(tmp_path / "run")
    assert "<|im_end|>" in tok.special_tokens


@pytest.mark.parametrize("change, message", [
    ({"data": "poems"}, "data must be one of task, instructions, mixed"),
    ({"template": "vicuna"}, "vicuna"),
    ({"lora_r": -1}, "lora_r must be >= 0"),
    ({"parallel": "ddp"}, "one process"),
])
def test_bad_settings_are_one_line(base_dir, change, message):
    with pytest.raises(ValueError, match=message):
        tiny(base_dir, **change)


def test_bad_base_and_context_are_one_line(base_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a pretrained preset"):
        SFTTrainer(tiny(tmp_path / "nothing"), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="set context_length=256"):
        SFTTrainer(tiny(base_dir, context_length=128), tmp_path / "run", progress=False)
    with pytest.raises(TypeError, match="needs an SFTConfig"):
        SFTTrainer(TrainConfig(), tmp_path / "run", progress=False)


def test_presets_are_valid_and_cached_by_recipe_and_base(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMBOOK_CACHE_DIR", str(tmp_path))
    a, b = sft.run_dir("sft-full"), sft.run_dir("sft-lora")
    assert a.parent == b.parent == tmp_path / "models" and a.name.startswith("sft-full-") and a != b
    changed = dataclasses.replace(sft.SFT_PRESETS["sft-full"], lr=1e-4)
    monkeypatch.setitem(sft.SFT_PRESETS, "sft-full", changed)
    assert sft.run_dir("sft-full") != a  # another recipe, another folder: never a stale model
    with pytest.raises(ValueError, match="no fine-tuned model 'gpt5'"):
        sft.run_dir("gpt5")


def test_command_line_reports_an_unknown_model_in_one_line():
    result = subprocess.run([sys.executable, "-m", "llmbook.posttrain.sft", "gpt5"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no fine-tuned model 'gpt5'; the presets are: " + ", ".join(sft.SFT_PRESETS)]


def test_merged_lora_model_is_a_plain_gpt_state(base_dir, tmp_path):
    trainer = SFTTrainer(tiny(base_dir, lora_r=2, max_steps=1), tmp_path / "run", progress=False)
    state = trainer.full_state_dict()
    skeleton = GPT(trainer.model_config)
    assert set(state) == set(skeleton.state_dict())


def test_epoch_order_visits_each_item_once_per_epoch_and_depends_only_on_the_position():
    from llmbook.posttrain.order import EpochOrder

    order = EpochOrder(5, seed=3)
    first, second = order.take(0, 5), order.take(5, 5)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    assert EpochOrder(5, seed=3).take(3, 4) == first[3:] + second[:2]  # a fresh object (a resumed run) agrees
    with pytest.raises(ValueError, match="nothing to order"):
        EpochOrder(0, seed=3)
