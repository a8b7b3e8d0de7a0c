"""The trainer: its config, accumulation, precision, evaluation, exact resume, run files and command line."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import subprocess
import sys

import pytest
import torch
from torch import nn

from llmbook.checkpoint import load_checkpoint
from llmbook.train import TRAIN_PRESETS, TrainConfig, Trainer, evaluate, load_model, main, steps_for_budget

WORDS = "the king queen lord good night day love death sword crown thou art my heart speak".split()


def write_text(path, n_chars: int = 20_000):
    """A small ASCII corpus with some structure to learn (capitals, full stops, a fixed vocabulary)."""
    rng, lines, size = random.Random(0), [], 0
    while size < n_chars:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "."
        lines.append(line)
        size += len(line) + 1
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def cfg(tmp_path, monkeypatch, seed_and_one_thread) -> TrainConfig:
    """A gpt-tiny run on a 20 KB text; the cache (tokenized data) goes to tmp_path, never to ~/.cache."""
    monkeypatch.setenv("LLMBOOK_CACHE_DIR", str(tmp_path / "cache"))
    text = write_text(tmp_path / "words.txt")
    return TrainConfig(
        name="t", model="gpt-tiny", dataset=str(text), tokenizer="bytes", context_length=16, batch_size=4,
        max_steps=8, eval_interval=4, eval_batches=2, eval_batch_size=8, log_interval=2, sample_tokens=6,
        threads=1, device="cpu",
    )


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"tokenizer": "wordpiece"}, "unknown tokenizer"),
        ({"model": "gpt-huge"}, "unknown model preset"),
        ({"precision": "fp16", "device": "cpu"}, "needs a CUDA GPU"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"warmup_steps": 20, "max_steps": 10}, "warmup_steps <= decay_steps"),
        ({"model_overrides": {"vocab_size": 5}}, "comes from the tokenizer"),
        ({"model_overrides": {"depth": 5}}, "not a ModelConfig field"),
        ({"model_overrides": {"n_heads": 5}}, "not divisible"),
        ({"max_steps": "abc"}, "max_steps must be int"),
        ({"max_steps": 1.5}, "max_steps must be int"),
        ({"name": "a/b"}, "plain folder name"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"beta2": 1.0}, "beta1 and beta2"),
        ({"sample_prompt": ""}, "sample_prompt must not be empty"),
    ],
)
def test_impossible_configs_fail_clearly(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**change)


def test_derived_settings():
    cfg = TrainConfig(max_steps=1000, lr=1, context_length=48)
    assert (cfg.warmup, cfg.decay) == (20, 1000)  # 2% warmup, decay over the whole run
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # ints normalized: the same recipe hashes the same
    assert cfg.tokens_per_step == 12 * 48
    assert cfg.model_config(256).vocab_size == 256
    assert cfg.model_config(1000).vocab_size == 1024  # padded to a multiple of 64
    assert cfg.model_config(50257).vocab_size == 50304
    assert cfg.model_config(256).context_length == 48


def test_presets_follow_the_spec():
    for name, preset in TRAIN_PRESETS.items():
        assert preset.name == name
    tiny = TRAIN_PRESETS["tiny"]
    assert (tiny.model, tiny.tokenizer, tiny.context_length, tiny.batch_size, tiny.max_steps) == (
        "gpt-tiny", "bytes", 32, 4, 20)
    assert (tiny.eval_interval, tiny.eval_batches) == (10, 4)
    nano = TRAIN_PRESETS["shakespeare-nanogpt"]
    assert (nano.model, nano.tokenizer, nano.context_length, nano.batch_size, nano.lr, nano.max_steps) == (
        "nanogpt-char-cpu", "bytes", 64, 12, 1e-3, 2000)
    assert (nano.warmup, nano.min_lr_ratio, nano.beta2, nano.weight_decay) == (100, 0.1, 0.99, 0.1)
    assert nano.model_config(256).dropout == 0.0


def test_resolve_presets_files_and_overrides(tmp_path):
    cfg = TrainConfig.resolve("tiny", ["lr=3e-3", "warmup_steps=null", "name=fast", "model_overrides.d_model=96",
                                       "sample_prompt=ROMEO:"])
    assert (cfg.lr, cfg.warmup_steps, cfg.name, cfg.model_overrides, cfg.sample_prompt) == (
        3e-3, None, "fast", {"d_model": 96}, "ROMEO:")
    assert TRAIN_PRESETS["tiny"].model_overrides == {}  # the preset itself is untouched

    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps(dataclasses.asdict(cfg)))
    assert TrainConfig.from_file(json_file) == cfg
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('name = "toml"\nmax_steps = 5\n[model_overrides]\nn_layers = 1\n')
    from_toml = TrainConfig.resolve(str(toml_file), ["max_steps=6"])
    assert (from_toml.name, from_toml.max_steps, from_toml.model_overrides) == ("toml", 6, {"n_layers": 1})

    with pytest.raises(ValueError, match="unknown setting 'lrr'"):
        TrainConfig.resolve("tiny", ["lrr=1"])
    with pytest.raises(ValueError, match="key=value"):
        TrainConfig.resolve("tiny", ["lr"])
    with pytest.raises(ValueError, match="unknown config 'huge'.*tiny"):
        TrainConfig.resolve("huge", [])
    with pytest.raises(FileNotFoundError, match="not found"):
        TrainConfig.resolve(str(tmp_path / "missing.toml"), [])
    json_file.write_text('{"max_stepz": 3}')
    with pytest.raises(ValueError, match="unknown setting.*max_stepz"):
        TrainConfig.from_file(json_file)


# ---------------------------------------------------------------------- the pieces of a step


def test_batches_depend_only_on_seed_step_and_micro(cfg, tmp_path):
    a, b = Trainer(cfg, tmp_path / "a"), Trainer(cfg, tmp_path / "b")
    x, y = a.get_batch(3, 1)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert torch.equal(x, b.get_batch(3, 1)[0])  # another trainer, the same batch
    assert not torch.equal(x, a.get_batch(3, 0)[0]) and not torch.equal(x, a.get_batch(4, 1)[0])
    other = Trainer(dataclasses.replace(cfg, seed=7), tmp_path / "c")
    assert not torch.equal(x, other.get_batch(3, 1)[0])


def test_accumulation_equals_one_big_batch(cfg, tmp_path):
    trainer = Trainer(dataclasses.replace(cfg, accumulation_steps=3), tmp_path / "acc")
    loss = trainer.forward_backward(0)
    accumulated = grads(trainer.raw_model)

    batches = [trainer.get_batch(0, micro) for micro in range(3)]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])  # (12, T)
    trainer.optimizer.zero_grad(set_to_none=True)
    _, big_loss = trainer.raw_model(x, y)
    big_loss.backward()
    assert loss.item() == pytest.approx(big_loss.item(), abs=1e-6)
    for name, g in grads(trainer.raw_model).items():
        torch.testing.assert_close(accumulated[name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("model", ["gpt-tiny", "llama-tiny"])
def test_activation_checkpointing_gives_the_same_gradients(cfg, tmp_path, model):
    cfg = dataclasses.replace(cfg, model=model, model_overrides={"dropout": 0.1})  # dropout: the RNG replays too
    plain = Trainer(cfg, tmp_path / "plain")
    plain.forward_backward(0)
    recomputed = Trainer(dataclasses.replace(cfg, activation_checkpointing=True), tmp_path / "ckpt")
    assert recomputed.raw_model.activation_checkpointing
    recomputed.forward_backward(0)
    for name, g in grads(plain.raw_model).items():
        torch.testing.assert_close(grads(recomputed.raw_model)[name], g, atol=1e-6, rtol=1e-6, msg=name)


def test_bf16_autocast_on_cpu_is_close_to_fp32(cfg, tmp_path):
    fp32 = Trainer(cfg, tmp_path / "fp32")
    bf16 = Trainer(dataclasses.replace(cfg, precision="bf16"), tmp_path / "bf16")
    assert bf16.forward_backward(0).item() == pytest.approx(fp32.forward_backward(0).item(), abs=0.02)
    assert all(p.dtype == torch.float32 for p in bf16.raw_model.parameters())  # master weights stay fp32
    assert all(p.grad.dtype == torch.float32 for p in bf16.raw_model.parameters())
    summary = bf16.train()
    assert math.isfinite(summary["val_loss"]) and summary["val_loss"] < math.log(256)


def test_lr_follows_the_schedule(cfg, tmp_path):
    trainer = Trainer(dataclasses.replace(cfg, max_steps=10, warmup_steps=2, lr=1e-2), tmp_path / "lr")
    seen = []
    for _ in range(10):
        trainer.train_step()
        seen.append(trainer.optimizer.param_groups[0]["lr"])
    assert seen == [trainer.schedule(s) for s in range(10)]
    assert seen[2] == pytest.approx(1e-2) and seen[-1] > 1e-3  # peak after warmup, floor (0.1·peak) reached at step 10


# ---------------------------------------------------------------------- evaluation


class Uniform(nn.Module):
    """A model that knows nothing: equal logits for every token."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab_size), None


def test_evaluate_uniform_model(cfg, tmp_path):
    trainer = Trainer(cfg, tmp_path / "u")
    model = Uniform(256).train()
    result = evaluate(model, trainer.data.val, trainer.token_lengths, 8, 16, "cpu")
    assert result["loss"] == pytest.approx(math.log(256))
    assert result["bpb"] == pytest.approx(8.0)  # log2(256) bits for each one-byte token
    assert result["tokens"] == (len(trainer.data.val) - 1) // 16 * 16  # the whole split, each target once
    assert model.training  # handed back in the mode it came in
    limited = evaluate(model, trainer.data.val, trainer.token_lengths, 8, 16, "cpu", max_batches=2)
    assert limited["tokens"] == 2 * 8 * 16


def test_evaluate_bits_per_byte_counts_token_bytes():
    tokens = torch.tensor([0, 1, 2, 1, 2, 1, 2, 1, 2]).numpy()
    lengths = torch.tensor([1, 3, 2])  # id 1 stands for 3 bytes, id 2 for 2
    result = evaluate(Uniform(4), tokens, lengths, batch_size=2, context_length=4, device="cpu")
    assert result["tokens"] == 8 and result["bytes"] == 4 * 3 + 4 * 2
    assert result["bpb"] == pytest.approx(8 * math.log(4) / (math.log(2) * 20))


# ---------------------------------------------------------------------- whole runs


def test_run_writes_its_files(cfg, tmp_path, capsys):
    run = tmp_path / "run"
    summary = Trainer(cfg, run, progress=False).train()
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("trained 8 steps in ") and out.strip().endswith(f"-> {run}")
    assert "nats/token" in out and "bits per byte" in out
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.jsonl", "samples.jsonl", "checkpoint.pt",
                                               "model.pt", "tokenizer.json", "summary.json"}
    assert TrainConfig.from_file(run / "config.json") == cfg

    records = read_jsonl(run / "metrics.jsonl")
    logs = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in logs] == [2, 4, 6, 8]
    assert [r["step"] for r in evals] == [0, 4, 8]  # before training, every eval_interval, the last step
    assert set(logs[0]) >= {"step", "lr", "loss", "tokens_per_s", "elapsed_s"}
    assert set(evals[0]) == {"step", "val_loss", "val_bpb", "elapsed_s"}
    assert evals[0]["val_loss"] == pytest.approx(math.log(256), abs=0.05)  # untrained: a uniform guess
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert [s["step"] for s in read_jsonl(run / "samples.jsonl")] == [0, 4, 8]

    saved = json.loads((run / "summary.json").read_text())
    assert saved == summary
    assert summary["steps"] == 8 and summary["tokens_seen"] == 8 * 4 * 16
    assert summary["val_loss"] == evals[-1]["val_loss"] and summary["finished"]
    assert summary["total_seconds"] >= summary["train_seconds"] > 0
    assert summary["params"] == load_model(run)[0].num_params()

    state = load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 8 and set(state) >= {"model", "optimizer", "rng_state", "config", "scaler"}
    model, tokenizer = load_model(run)
    assert not model.training and tokenizer.vocab_size == 256
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(x)[0], load_model(run / "model.pt")[0](x)[0])


def test_resume_is_exact(cfg, tmp_path):
    """2N steps straight == N steps, stop, a new Trainer, resume, N more: every parameter bit for bit."""
    cfg = dataclasses.replace(cfg, max_steps=12, eval_interval=5, accumulation_steps=2,
                              model_overrides={"dropout": 0.1})
    straight = Trainer(cfg, tmp_path / "straight", progress=False)
    straight.train()

    first = Trainer(cfg, tmp_path / "split", progress=False)
    partial = first.train(stop_at=6)
    assert partial["steps"] == 6 and not partial["finished"]
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 6
    assert not (tmp_path / "split" / "model.pt").exists()
    second = Trainer(cfg, tmp_path / "split", progress=False)
    taken = []
    forward_backward = second.forward_backward
    second.forward_backward = lambda step: taken.append(step) or forward_backward(step)
    second.train(resume=True)

    assert taken == list(range(6, 12))  # it really went on from the checkpoint
    for name, value in params(straight.raw_model).items():
        assert torch.equal(value, second.raw_model.state_dict()[name]), name
    for i, state in straight.optimizer.state_dict()["state"].items():
        assert torch.equal(state["exp_avg_sq"], second.optimizer.state_dict()["state"][i]["exp_avg_sq"])

    def losses(run):  # the logged numbers agree too, without duplicates from the stop
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_jsonl(tmp_path / run / "metrics.jsonl")]

    assert losses("split") == losses("straight")


def test_runs_are_deterministic_under_a_seed(cfg, tmp_path):
    a = Trainer(cfg, tmp_path / "a", progress=False)
    a.train()
    b = Trainer(cfg, tmp_path / "b", progress=False)
    b.train()
    c = Trainer(dataclasses.replace(cfg, seed=1), tmp_path / "c", progress=False)
    c.train()
    assert all(torch.equal(v, b.raw_model.state_dict()[k]) for k, v in a.raw_model.state_dict().items())
    assert not torch.equal(a.raw_model.tok_emb.weight, c.raw_model.tok_emb.weight)
    assert read_jsonl(tmp_path / "a" / "samples.jsonl") == read_jsonl(tmp_path / "b" / "samples.jsonl")


def test_interrupt_saves_a_checkpoint(cfg, tmp_path, monkeypatch):
    trainer = Trainer(cfg, tmp_path / "int", progress=False)
    forward_backward = trainer.forward_backward

    def interrupt_at_3(step):
        if step == 3:
            raise KeyboardInterrupt  # Ctrl-C while computing gradients: the weights are those after step 3
        return forward_backward(step)

    monkeypatch.setattr(trainer, "forward_backward", interrupt_at_3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert load_checkpoint(tmp_path / "int" / "checkpoint.pt")["step"] == 3
    model, _ = load_model(tmp_path / "int")  # a stopped run still gives its model
    assert torch.equal(model.tok_emb.weight, trainer.raw_model.tok_emb.weight)


def test_interrupt_during_an_update_keeps_the_last_checkpoint(cfg, tmp_path, monkeypatch):
    trainer = Trainer(dataclasses.replace(cfg, checkpoint_interval=2), tmp_path / "upd", progress=False)
    optimizer_step = trainer.optimizer_step

    def half_an_update(lr):
        if trainer.step == 3:
            trainer.raw_model.tok_emb.weight.data.add_(1.0)  # some weights already changed ...
            raise KeyboardInterrupt  # ... when Ctrl-C strikes
        return optimizer_step(lr)

    monkeypatch.setattr(trainer, "optimizer_step", half_an_update)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert load_checkpoint(tmp_path / "upd" / "checkpoint.pt")["step"] == 2  # not a torn step 3


def test_resume_refuses_another_model(cfg, tmp_path):
    Trainer(cfg, tmp_path / "r", progress=False).train(stop_at=2)
    other = Trainer(dataclasses.replace(cfg, model_overrides={"n_layers": 1}), tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="different model"):
        other.train(resume=True)


def test_steps_for_budget(cfg):
    few, many = steps_for_budget(cfg, 0.01, probe_steps=2), steps_for_budget(cfg, 1000.0, probe_steps=2)
    assert isinstance(many, int) and 1 <= few < many


# ---------------------------------------------------------------------- the command line


def test_cli_trains_tiny(cfg, tmp_path, capsys):
    code = main(["--config", "tiny", "--out", str(tmp_path / "runs"), "--no-progress",
                 "--set", f"dataset={cfg.dataset}", "max_steps=4", "eval_interval=2", "--set", "name=smoke"])
    assert code == 0
    run = tmp_path / "runs" / "smoke"
    assert (run / "model.pt").is_file() and json.loads((run / "summary.json").read_text())["steps"] == 4
    assert "trained 4 steps" in capsys.readouterr().out
    # --resume of a finished run trains no further and reports again
    assert main(["--config", str(run / "config.json"), "--out", str(tmp_path / "runs"), "--resume",
                 "--no-progress"]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 4
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r] == [0, 2, 4]  # no repeats


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "lrr=1"], "unknown setting 'lrr'"),
        (["--set", "max_steps=abc"], "max_steps must be int"),
        (["--set", "dataset=/nonexistent/text.txt"], "neither a name in the registry"),
        (["--set", "tokenizer=bpe-100"], "more than the 256 byte tokens"),
        (["--set", "context_length=100000"], "too few for one window"),
    ],
)
def test_cli_errors_are_one_line(cfg, tmp_path, capsys, args, message):
    if "dataset" not in args[1]:
        args += [f"dataset={cfg.dataset}"]
    assert main(["--config", "tiny", "--out", str(tmp_path), "--no-progress", *args]) == 2
    err = capsys.readouterr().err  # after tokenizing (its progress bars), one line
    assert [line for line in err.splitlines() if "error" in line] == [err.strip().splitlines()[-1]]
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err


def test_python_dash_m_reports_bad_config(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llmbook.train", "--config", "nope", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown config 'nope'") and "Traceback" not in result.stderr

