"""The trainer on several processes (PyTorch's DDP and FSDP2): equal to one process, resumable across rank counts."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmbook.checkpoint import load_checkpoint
from llmbook.distributed import dcp_checkpoint
from llmbook.distributed.launcher import spawn
from llmbook.train import DCP_CHECKPOINT, TrainConfig, Trainer, load_model, main, read_jsonl
from test_train import write_text

STEPS = 20
TOL = 2e-5  # float32: the ranks' sums of half batches round differently from one sum of the whole


@pytest.fixture
def cfg(tmp_path, monkeypatch, seed_and_one_thread) -> TrainConfig:
    """gpt-tiny without dropout on a 20 KB text, a loss record every step; the cache in tmp_path."""
    monkeypatch.setenv("LLMBOOK_CACHE_DIR", str(tmp_path / "cache"))
    text = write_text(tmp_path / "words.txt")
    return TrainConfig(
        name="t", model="gpt-tiny", model_overrides={"dropout": 0.0}, dataset=str(text), tokenizer="bytes",
        context_length=16, batch_size=4, max_steps=STEPS, lr=3e-3, eval_interval=0, eval_batches=2,
        eval_batch_size=8, log_interval=1, checkpoint_interval=0, sample_tokens=4, threads=1, device="cpu",
    )


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def _train_rank(rank: int, world_size: int, cfg_dict: dict, run_dir: str, cache: str,
                resume: bool = False, stop_at: int | None = None) -> dict:
    """One rank of a DistributedTrainer run (spawn's ranks were forked before the test set the cache variable)."""
    os.environ["LLMBOOK_CACHE_DIR"] = cache
    from llmbook.distributed.trainer import DistributedTrainer

    trainer = DistributedTrainer(TrainConfig(**cfg_dict), run_dir, progress=False)
    summary = trainer.train(resume=resume, stop_at=stop_at, overwrite=not resume)
    return {"summary": summary, "step": trainer.step, "main": trainer.is_main, "batch": trainer.local_batch}


def run_ranks(cfg: TrainConfig, world_size: int, run_dir: Path, **kwargs) -> list[dict]:
    cache = os.environ["LLMBOOK_CACHE_DIR"]
    return spawn(_train_rank, world_size, dataclasses.asdict(cfg), str(run_dir), cache, *kwargs.values()) \
        if not kwargs else spawn(_train_rank, world_size, dataclasses.asdict(cfg), str(run_dir), cache,
                                 kwargs.get("resume", False), kwargs.get("stop_at"))


def one_process(cfg: TrainConfig, run_dir: Path, **kwargs) -> dict[int, float]:
    Trainer(cfg, run_dir, progress=False).train(**kwargs)
    return losses(run_dir)


# ---------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_ranks_follow_one_process(cfg, tmp_path, accumulation):
    """2 ranks × b (DDP and FSDP2) give the loss of 1 process × 2b at every one of 20 steps."""
    cfg = dataclasses.replace(cfg, accumulation_steps=accumulation)
    reference = one_process(cfg, tmp_path / "one")
    assert sorted(reference) == list(range(1, STEPS + 1))
    for parallel in ("ddp", "fsdp"):
        run = tmp_path / parallel
        results = run_ranks(dataclasses.replace(cfg, parallel=parallel), 2, run)
        assert [r["main"] for r in results] == [True, False] and results[0]["batch"] == cfg.batch_size // 2
        got = losses(run)
        assert sorted(got) == sorted(reference)  # rank 0 alone logs: one record per step
        diff = max(abs(got[s] - reference[s]) for s in reference)
        print(f"{parallel}, accumulation {accumulation}: max |loss difference| over {STEPS} steps = {diff:.2e}")
        assert diff < TOL, (parallel, diff)
        assert reference[STEPS] < reference[1] - 0.5  # it learned: the comparison is not between two flat lines
        model, _ = load_model(run)
        ref_model, _ = load_model(tmp_path / "one")
        err = max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(),
                                                             ref_model.state_dict().values(), strict=True))
        assert err < 1e-4, (parallel, err)
