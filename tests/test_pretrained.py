"""The reference model: trained once into the cache, then loaded; a changed recipe trains anew."""

from __future__ import annotations

import dataclasses
import os
import random
import signal

import pytest
import torch

from llmbook import pretrained
from llmbook.errors import Interrupted
from llmbook.train import TRAIN_PRESETS, TrainConfig, Trainer

WORDS = "the king queen lord good night day love death sword crown thou art my heart speak".split()


@pytest.fixture
def preset(tmp_path, monkeypatch, seed_and_one_thread) -> TrainConfig:
    """A six-step gpt-tiny recipe registered as the preset 'mini'; the cache is tmp_path."""
    monkeypatch.setenv("LLMBOOK_CACHE_DIR", str(tmp_path / "cache"))
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(6)) + "." for _ in range(600))
    (tmp_path / "mini.txt").write_text(text, encoding="utf-8")
    cfg = TrainConfig(
        name="mini", model="gpt-tiny", dataset=str(tmp_path / "mini.txt"), tokenizer="bytes", context_length=16,
        batch_size=4, max_steps=6, eval_interval=3, eval_batches=2, eval_batch_size=8, log_interval=2,
        sample_tokens=4, threads=1, device="cpu",
    )
    monkeypatch.setitem(TRAIN_PRESETS, "mini", cfg)
    return cfg


def test_trains_once_then_loads(preset, tmp_path, monkeypatch, capsys):
    ref = pretrained.load("mini", progress=False)
    out = capsys.readouterr().out
    assert "training the model 'mini' once" in out and "6 steps" in out and "resumes" in out

    folder = ref.run_dir
    assert folder.parent == tmp_path / "cache" / "models" and folder.name.startswith("mini-")
    assert len(folder.name) == len("mini-") + 8 and folder == pretrained.model_dir("mini")
    assert sorted(p.name for p in folder.parent.iterdir() if p.name[0] != ".") == [folder.name]  # no .partial, .old
    assert not ref.model.training and ref.config == preset
    assert ref.summary["steps"] == 6 and ref.summary["finished"]
    assert [m["step"] for m in ref.metrics() if "val_loss" in m] == [0, 3, 6]
    assert [s["step"] for s in ref.samples()] == [0, 3, 6]

    # the second time nothing trains: the cached folder is loaded as it is
    monkeypatch.setattr(Trainer, "train", lambda *a, **k: pytest.fail("trained again"))
    again = pretrained.load("mini", progress=False)
    assert capsys.readouterr().out == ""
    assert again.run_dir == folder
    assert all(torch.equal(p, q) for p, q in zip(ref.model.parameters(), again.model.parameters(), strict=True))


def test_generate(preset, monkeypatch):
    ref = pretrained.load("mini", progress=False)
    assert ref.generate("the king", 10, seed=1) == ref.generate("the king", 10, seed=1)
    assert ref.generate("the king", 5, temperature=0) == ref.generate("the king", 5, temperature=0)

    # longer than the 16-token context: written in pieces, the model continuing from half a window
    pieces = []
    generate_ids = pretrained.generate_ids

    def spy(model, prompts, n, **kw):
        assert len(prompts[0]) + n <= model.cfg.context_length
        assert kw["vocab_size"] == ref.tokenizer.vocab_size  # never an id of the output layer's padding
        pieces.append(generate_ids(model, prompts, n, **kw)[0])
        return [pieces[-1]]

    monkeypatch.setattr(pretrained, "generate_ids", spy)
    ref.generate("the king", 40, seed=0)
    assert sum(len(p) for p in pieces) == 40 and len(pieces) > 2
    with pytest.raises(ValueError, match="prompt must not be empty"):
        ref.generate("", 5)


def test_training_leaves_the_callers_random_state_alone(preset):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    pretrained.load("mini", progress=False)  # trains
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(5)
    pretrained.load("mini", progress=False)  # loads from the cache
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == 1


def test_a_changed_recipe_is_a_new_model(preset, monkeypatch):
    first = pretrained.model_dir("mini")
    monkeypatch.setitem(TRAIN_PRESETS, "mini", dataclasses.replace(preset, lr=2e-3))
    assert pretrained.model_dir("mini") != first
    monkeypatch.setitem(TRAIN_PRESETS, "mini", dataclasses.replace(preset))
    assert pretrained.model_dir("mini") == first


def test_unknown_name_lists_the_presets(preset):
    with pytest.raises(ValueError, match="no reference model 'gpt5'.*shakespeare.*mini"):
        pretrained.load("gpt5")


def test_interrupted_training_resumes_and_retrain_starts_over(preset, tmp_path, monkeypatch):
    # a reference run killed after 3 of its 6 steps leaves a .partial folder with a checkpoint
    folder = pretrained.model_dir("mini")
    Trainer(preset, folder.with_name(folder.name + ".partial"), progress=False).train(stop_at=3)
    resumed = pretrained.load("mini", progress=False)

    monkeypatch.setenv("LLMBOOK_CACHE_DIR", str(tmp_path / "other-cache"))
    straight = pretrained.load("mini", progress=False)
    assert all(torch.equal(p, q) for p, q in zip(resumed.model.parameters(), straight.model.parameters(), strict=True))

    calls = []
    train = Trainer.train
    monkeypatch.setattr(Trainer, "train", lambda self, **kw: calls.append(kw) or train(self, **kw))
    retrained = pretrained.load("mini", progress=False, retrain=True)
    assert len(calls) == 1 and retrained.summary["steps"] == 6
    assert sorted(p.name for p in retrained.run_dir.parent.iterdir() if p.name[0] != ".") == [retrained.run_dir.name]
    assert all(torch.equal(p, q) for p, q in zip(retrained.model.parameters(), straight.model.parameters(),
                                                 strict=True))


def test_ensure_and_the_command_line(preset, capsys, monkeypatch):
    folder = pretrained.ensure("mini", progress=False)
    assert folder == pretrained.model_dir("mini") and (folder / "summary.json").is_file()
    assert "training the model 'mini' once" in capsys.readouterr().out
    assert pretrained.ensure("mini") == folder and capsys.readouterr().out == ""  # cached: nothing to do

    assert pretrained.main(["mini", "--retrain"]) == 0  # trains again, with a progress bar
    out, err = capsys.readouterr()
    assert "training the model 'mini' once" in out and "mini: 100%" in err  # tqdm's bar, named
    assert out.strip().splitlines()[-1].startswith("mini: 6 steps, ") and out.strip().endswith(f"-> {folder}")
    assert "bits per byte" in out

    assert pretrained.main(["gpt5"]) == 2
    assert capsys.readouterr().err.startswith("error: no reference model 'gpt5'")


def test_an_interrupted_training_is_resumed_by_the_next_call(preset, monkeypatch, capsys):
    """Ctrl-C while the reference model trains: a checkpoint, no finished folder; the next load goes on."""
    forward_backward, interrupted = Trainer.forward_backward, []

    def ctrl_c_at_step_4(self, step):
        if step == 4 and not interrupted and self.run_dir.name.endswith(".partial"):  # not the speed probe
            interrupted.append(step)
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: the step finishes, a checkpoint is saved
        return forward_backward(self, step)

    monkeypatch.setattr(Trainer, "forward_backward", ctrl_c_at_step_4)
    with pytest.raises(Interrupted, match="SIGINT: stopped at step 5; checkpoint of step 5 saved"):
        pretrained.load("mini", progress=False)
    assert not pretrained.model_dir("mini").exists()
    assert pretrained.main(["mini", "--no-progress"]) == 0
    assert "resuming the training of the model 'mini'" in capsys.readouterr().out
    assert [m["step"] for m in pretrained.load("mini").metrics() if "val_loss" in m] == [0, 3, 6]
