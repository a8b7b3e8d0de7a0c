"""Ctrl-C, SIGTERM and kill -9 at random moments never lose a run, and never make the trainer lie (issue 10).

Each run is a forked process that runs the command line's ``main`` (a fresh
``python -m llmbook.train`` would spend seconds importing torch before every
signal); one test sends SIGINT to the real ``python -m llmbook.train``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmbook import pretrained, train
from llmbook.checkpoint import load_checkpoint
from llmbook.train import TRAIN_PRESETS, TrainConfig

WORDS = "the king queen lord good night day love death sword crown thou art my heart speak".split()
FORK = multiprocessing.get_context("fork")
SAVED = re.compile(r"at step (\d+); checkpoint of step (\d+) saved in (\S+); continue with --resume")
LAST = re.compile(r"at step (\d+), inside a step \(not saved\); the last checkpoint, of step (\d+), is in (\S+);")


@pytest.fixture
def text(tmp_path, monkeypatch, seed_and_one_thread) -> Path:
    """A 20 KB text, tokenized into a cache in tmp_path; and a first training step in this process.

    The forked runs inherit what that step loaded (torch imports parts of
    itself lazily, seconds on a busy machine), so their signals strike the run.
    """
    monkeypatch.setenv("LLMBOOK_CACHE_DIR", str(tmp_path / "cache"))
    rng = random.Random(0)
    lines = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "." for _ in range(700))
    path = tmp_path / "words.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    warm = train.Trainer(_mini(path), tmp_path / "warm-up", progress=False)
    warm.train_step()
    warm.sample()
    return path


def _run_main(argv: list[str], out: str, err: str) -> None:
    """The child: ``python -m llmbook.train ARGV`` without the interpreter start, output to two files."""
    for fd, name in ((1, out), (2, err)):
        os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout, sys.stderr = open(1, "w", buffering=1, closefd=False), open(2, "w", buffering=1, closefd=False)
    code = train.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_and_signal(argv: list[str], tmp_path: Path, sig: int | None, delay: float) -> tuple[int, str, str]:
    """Fork ``main(argv)``, send ``sig`` after ``delay`` seconds (None: let it finish); exit code, stdout, stderr."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    child = FORK.Process(target=_run_main, args=(argv, str(out), str(err)))
    child.start()
    if sig is not None:
        time.sleep(delay)
        os.kill(child.pid, sig)
    child.join(120)
    if child.exitcode is None:
        child.kill()
        pytest.fail(f"the trainer did not stop within 120 s of {sig}")
    return child.exitcode, out.read_text(), err.read_text()


def check_the_message(code: int, stdout: str, err: str, sig: int, run: Path, before: int | None) -> tuple[str, int]:
    """What the trainer said is true; returns what to do next ("resume", "again", "done") and the saved step."""
    assert "Traceback" not in err, err
    if code == 0:  # the signal came after the last step: a finished run
        summary = json.loads((run / "summary.json").read_text())
        assert summary["finished"] and f"trained {summary['steps']} steps" in stdout
        return "done", summary["steps"]
    assert code == 128 + sig, (code, err)
    line = err.strip().splitlines()[-1]
    if match := SAVED.search(line):
        assert match.group(1) == match.group(2) and Path(match.group(3)) == run / "checkpoint.pt"
        assert load_checkpoint(run / "checkpoint.pt")["step"] == int(match.group(2))  # the message is true
        assert before is None or int(match.group(2)) >= before  # never went back
        return "resume", int(match.group(2))
    if match := LAST.search(line):  # a second signal struck mid-step: only possible with two signals
        pytest.fail(f"one signal must let the step finish: {line}")
    assert line in ("interrupted before training started; nothing was saved",
                    "interrupted while starting; nothing was saved"), line
    now = load_checkpoint(run / "checkpoint.pt")["step"] if (run / "checkpoint.pt").exists() else None
    assert now == before  # nothing was saved, as it said
    return "again", before


def test_sigint_and_sigterm_at_random_moments(text, tmp_path):
    """13 signals (10 SIGINT, 3 SIGTERM) at seeded random moments; each time the message is true and --resume goes on.

    A run of 100,000 steps is stopped over and over; at the end a resume with
    a nearby max_steps (the only way to finish in seconds) completes it, and
    the logs hold each step once.
    """
    rng = random.Random(10)
    signals = [signal.SIGINT] * 10 + [signal.SIGTERM] * 3
    rng.shuffle(signals)
    run = tmp_path / "runs" / "tiny"
    base = ["--config", "tiny", "--out", str(tmp_path / "runs"), "--no-progress"]
    settings = ["--set", f"dataset={text}", "max_steps=100000", "eval_interval=10", "log_interval=5"]
    mode, step, said = [], None, []
    for sig in signals:
        code, stdout, err = run_and_signal(base + mode + settings, tmp_path, sig, rng.uniform(0.05, 0.8))
        action, step = check_the_message(code, stdout, err, sig, run, step)
        said.append((signal.Signals(sig).name, action, step))
        mode = ["--resume"] if step is not None else []
    assert sum(action == "resume" for _, action, _ in said) >= 8, said  # most signals struck during training
    assert len({s for _, _, s in said}) >= 5, said  # at different steps

    code, stdout, _ = run_and_signal(base + ["--resume"] + settings + [f"max_steps={step + 12}"], tmp_path, None, 0)
    assert code == 0 and f"trained {step + 12} steps" in stdout
    records = train.read_jsonl(run / "metrics.jsonl")
    logs = [r["step"] for r in records if "loss" in r]
    evals = [r["step"] for r in records if "val_loss" in r]
    assert logs == sorted(set(logs)) and evals == sorted(set(evals))  # every step once, in order
    assert logs[-1] == step + 12 and evals[0] == 0


def test_sigint_to_python_dash_m(text, tmp_path):
    """The real entry point: SIGINT while torch imports, then at a random moment of training; true messages."""
    run = tmp_path / "runs" / "tiny"
    args = [sys.executable, "-m", "llmbook.train", "--config", "tiny", "--out", str(tmp_path / "runs"),
            "--no-progress", "--set", f"dataset={text}", "max_steps=100000", "eval_interval=10"]
    starting = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.2)  # the interpreter is still loading torch
    starting.send_signal(signal.SIGINT)
    _, err = starting.communicate(timeout=120)
    assert starting.returncode == 130 and err.strip() == "interrupted while starting; nothing was saved", err
    assert not run.exists()

    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / "metrics.jsonl").exists():  # training has begun
        assert time.time() < deadline and child.poll() is None, child.communicate()
        time.sleep(0.02)
    time.sleep(random.Random(3).uniform(0.0, 0.5))
    child.send_signal(signal.SIGINT)
    stdout, err = child.communicate(timeout=120)
    action, step = check_the_message(child.returncode, stdout, err, signal.SIGINT, run, None)
    assert action == "resume"
    assert train.main(args[3:] + ["--resume", "--set", f"max_steps={step + 5}"]) == 0  # it goes on from there
    assert json.loads((run / "summary.json").read_text())["steps"] == step + 5


# ---------------------------------------------------------------------- the reference model


def _mini(dataset: Path, **changes) -> TrainConfig:
    values = dict(name="mini", model="gpt-tiny", dataset=str(dataset), tokenizer="bytes", context_length=16,
                  batch_size=4, max_steps=120, eval_interval=20, eval_batches=2, eval_batch_size=8, log_interval=5,
                  sample_tokens=4, threads=1, device="cpu")
    return TrainConfig(**{**values, **changes})


def _load_in_child(cfg: TrainConfig, out: str) -> None:
    with open(out, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        TRAIN_PRESETS[cfg.name] = cfg
        ref = pretrained.load(cfg.name, progress=False)
        print(f"loaded {ref.summary['steps']} steps")
        sys.stdout.flush()
    os._exit(0)


def test_pretrained_resumes_after_kill_9(text, tmp_path, monkeypatch, capsys):
    cfg = _mini(text)
    monkeypatch.setitem(TRAIN_PRESETS, "mini", cfg)
    partial = pretrained.model_dir("mini").with_name(pretrained.model_dir("mini").name + ".partial")
    child = FORK.Process(target=_load_in_child, args=(cfg, str(tmp_path / "child.txt")))
    child.start()
    deadline = time.time() + 60
    while not (partial / "checkpoint.pt").is_file():  # the checkpoint of the first evaluation
        assert time.time() < deadline and child.is_alive(), (tmp_path / "child.txt").read_text()
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)  # no handler runs, nothing is flushed: like a crash or the OOM killer
    child.join()
    killed_at = load_checkpoint(partial / "checkpoint.pt")["step"]
    assert child.exitcode == -signal.SIGKILL and 20 <= killed_at < 120

    trained = []
    forward_backward = train.Trainer.forward_backward
    monkeypatch.setattr(train.Trainer, "forward_backward",
                        lambda self, step: trained.append(step) or forward_backward(self, step))
    ref = pretrained.load("mini", progress=False)
    assert f"resuming the training of the model 'mini' in {partial}" in capsys.readouterr().out
    assert trained[0] == killed_at and trained[-1] == 119  # it went on from the checkpoint, not from step 0
    assert ref.summary["steps"] == 120 and not partial.exists()
    evals = [m["step"] for m in ref.metrics() if "val_loss" in m]
    assert evals == list(range(0, 121, 20))  # records the crash left after the checkpoint were dropped


def test_two_processes_load_the_same_model_at_once(text, tmp_path, monkeypatch):
    cfg = _mini(text, name="mini2", max_steps=40)
    monkeypatch.setitem(TRAIN_PRESETS, "mini2", cfg)
    children = [FORK.Process(target=_load_in_child, args=(cfg, str(tmp_path / f"child{i}.txt"))) for i in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    outputs = [(tmp_path / f"child{i}.txt").read_text() for i in range(2)]
    assert [child.exitcode for child in children] == [0, 0], outputs
    assert all("loaded 40 steps" in out for out in outputs)
    assert sum("training the model 'mini2'" in out for out in outputs) == 1  # one trained, one waited
    ref = pretrained.load("mini2", progress=False)
    logs = [m["step"] for m in ref.metrics() if "loss" in m]
    assert logs == list(range(5, 41, 5))  # no step twice, nothing interleaved
    assert torch.isfinite(ref.model.tok_emb.weight).all()
