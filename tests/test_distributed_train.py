"""The trainer on several processes (PyTorch's DDP and FSDP2): equal to one process, resumable across rank counts."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import write_text
from torch.distributed.tensor import DTensor

from llmbook.checkpoint import load_checkpoint
from llmbook.distributed import dcp_checkpoint
from llmbook.distributed.launcher import spawn
from llmbook.errors import RunError
from llmbook.train import DCP_CHECKPOINT, TrainConfig, Trainer, load_model, main, read_jsonl

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


def _train_rank(rank: int, world_size: int, jobs: list[tuple], cache: str) -> list[dict]:
    """One rank of several DistributedTrainer runs in turn, each ``(config dict, run_dir, resume, stop_at)``.

    Several runs per spawn: a rank pays its imports (FSDP, DCP) once. The cache
    variable is set here because spawn's ranks fork from a server started before the test set it.
    """
    os.environ["LLMBOOK_CACHE_DIR"] = cache
    from llmbook.distributed.trainer import DistributedTrainer

    results = []
    for cfg_dict, run_dir, resume, stop_at in jobs:
        trainer = DistributedTrainer(TrainConfig(**cfg_dict), run_dir, progress=False)
        dropout_seed = torch.initial_seed()  # the seed of the generator dropout draws from
        trainer.train(resume=resume, stop_at=stop_at, overwrite=not resume)
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in trainer.params)
        results.append({"step": trainer.step, "main": trainer.is_main, "batch": trainer.local_batch,
                        "optimizer": type(trainer.optimizer).__name__, "local_params": local,
                        "params": trainer.raw_model.num_params(), "dropout_seed": dropout_seed})
    return results


def run_ranks(world_size: int, *jobs: tuple[TrainConfig, Path, bool, int | None]) -> list[list[dict]]:
    """Spawn ``world_size`` ranks (~0.1 s to start) that run the ``(cfg, run_dir, resume, stop_at)`` jobs in turn."""
    plain = [(dataclasses.asdict(cfg), str(run_dir), resume, stop_at) for cfg, run_dir, resume, stop_at in jobs]
    return spawn(_train_rank, world_size, plain, os.environ["LLMBOOK_CACHE_DIR"])


def one_process(cfg: TrainConfig, run_dir: Path, **kwargs) -> dict[int, float]:
    Trainer(cfg, run_dir, progress=False).train(**kwargs)
    return losses(run_dir)


def max_weight_difference(a: Path, b: Path) -> float:
    (model_a, _), (model_b, _) = load_model(a), load_model(b)
    return max((x - y).abs().max().item() for x, y in zip(model_a.state_dict().values(),
                                                          model_b.state_dict().values(), strict=True))


# ---------------------------------------------------------------------- equivalence


def test_two_ranks_follow_one_process(cfg, tmp_path):
    """2 ranks × b (DDP and FSDP2) give the loss of 1 process × 2b at every one of 20 steps, accumulating or not.

    FSDP once more with activation checkpointing (each block recomputed in backward, its weights gathered again).
    """
    runs = [("ddp", 1, False), ("fsdp", 1, False), ("ddp", 2, False), ("fsdp", 2, False), ("fsdp", 1, True)]
    jobs = [(dataclasses.replace(cfg, parallel=parallel, accumulation_steps=accumulation,
                                 activation_checkpointing=recompute),
             tmp_path / f"{parallel}-{accumulation}-{recompute}", False, None)
            for parallel, accumulation, recompute in runs]
    results = run_ranks(2, *jobs)
    rank0, rank1 = results
    assert [r["main"] for r in rank0] == [True] * 5 and [r["main"] for r in rank1] == [False] * 5
    assert all(r["batch"] == cfg.batch_size // 2 and r["optimizer"] == "ForeachAdamW" for r in rank0)
    assert {r["dropout_seed"] for r in rank0} == {cfg.seed} and {r["dropout_seed"] for r in rank1} == {cfg.seed + 1}
    for (parallel, _, _), r0, r1 in zip(runs, rank0, rank1, strict=True):
        if parallel == "ddp":  # every rank holds the whole model
            assert r0["local_params"] == r1["local_params"] == r0["params"]
        else:  # each rank holds about half of every tensor (dim 0 split in 2, rounded up)
            assert r0["local_params"] + r1["local_params"] == r0["params"] and r1["local_params"] <= r0["params"] // 2
    references = {}
    for accumulation in (1, 2):
        one = tmp_path / f"one-{accumulation}"
        references[accumulation] = one_process(dataclasses.replace(cfg, accumulation_steps=accumulation), one)
        assert sorted(references[accumulation]) == list(range(1, STEPS + 1))
        assert references[accumulation][STEPS] < references[accumulation][1] - 0.5  # it learned: not flat lines
    for parallel, accumulation, recompute in runs:
        run, reference = tmp_path / f"{parallel}-{accumulation}-{recompute}", references[accumulation]
        got = losses(run)
        assert sorted(got) == sorted(reference)  # rank 0 alone logs: one record per step
        diff = max(abs(got[s] - reference[s]) for s in reference)
        weights = max_weight_difference(run, tmp_path / f"one-{accumulation}")
        print(f"{parallel}, accumulation {accumulation}{', activation checkpointing' if recompute else ''}: "
              f"max |loss difference| over {STEPS} steps = {diff:.2e}, final weights {weights:.2e}")
        assert diff < TOL and weights < 1e-4, (parallel, accumulation, diff, weights)


# ---------------------------------------------------------------------- checkpoints across rank counts


def test_resume_across_rank_counts_and_layouts(cfg, tmp_path):
    """One run, stopped and resumed in other layouts: 1 process, 2 FSDP ranks, 2 DDP, 2 FSDP, 4 FSDP, 1 DDP rank.

    Each stop writes the checkpoint its layout writes (checkpoint.pt, or DCP's
    checkpoint.dcp when sharded) and the next session resumes it with another
    number of ranks or layout; the 20 losses equal the uninterrupted run's.
    """
    reference = one_process(cfg, tmp_path / "one")
    run = tmp_path / "run"
    fsdp, ddp = dataclasses.replace(cfg, parallel="fsdp"), dataclasses.replace(cfg, parallel="ddp")
    one_process(cfg, run, stop_at=4)  # 1 process: checkpoint.pt
    assert (run / "checkpoint.pt").is_file()
    run_ranks(2, (fsdp, run, True, 8),  # checkpoint.pt -> 2 FSDP ranks -> DCP, 2 shards
              (ddp, run, True, 11),  # DCP 2 shards -> 2 DDP ranks -> checkpoint.pt
              (fsdp, run, True, 14))  # checkpoint.pt -> 2 FSDP ranks -> DCP, 2 shards
    assert (run / DCP_CHECKPOINT / ".metadata").is_file() and not (run / "checkpoint.pt").exists()
    meta = dcp_checkpoint.read_meta(run / DCP_CHECKPOINT)
    assert meta["step"] == 14 and meta["world_size"] == 2 and len(meta["rng_states"]) == 2
    run_ranks(4, (fsdp, run, True, 17))  # DCP 2 shards -> 4 FSDP ranks (one sequence each) -> DCP, 4 shards
    assert dcp_checkpoint.read_meta(run / DCP_CHECKPOINT)["world_size"] == 4
    with pytest.raises(RunError, match="resume it with --set parallel=fsdp"):  # Chapter 7's trainer: one line
        Trainer(cfg, run, progress=False).train(resume=True)
    run_ranks(1, (ddp, run, True, None))  # DCP 4 shards -> 1 process, to the end -> checkpoint.pt
    assert (run / "checkpoint.pt").is_file() and not (run / DCP_CHECKPOINT).exists()
    got = losses(run)
    assert sorted(got) == sorted(reference)  # every step logged once, across the six sessions
    diff = max(abs(got[s] - reference[s]) for s in reference)
    print(f"resumed 5 times across layouts: max |loss difference| over {STEPS} steps = {diff:.2e}")
    assert diff < TOL and max_weight_difference(run, tmp_path / "one") < 1e-4
    assert load_checkpoint(run / "checkpoint.pt")["step"] == STEPS


def test_sharded_checkpoint_converts_to_one_file(cfg, tmp_path, capsys):
    """``python -m llmbook.distributed.dcp_checkpoint RUN`` writes the model.pt that load_model reads."""
    run = tmp_path / "run"
    run_ranks(2, (dataclasses.replace(cfg, parallel="fsdp"), run, False, 6))
    assert not (run / "model.pt").exists()
    with pytest.raises(FileNotFoundError, match="python -m llmbook.distributed.dcp_checkpoint"):
        load_model(run)  # says how to convert
    assert dcp_checkpoint.main([str(run)]) == 0 and "wrote" in capsys.readouterr().out
    model, tokenizer = load_model(run)
    reference = tmp_path / "one"
    Trainer(cfg, reference, progress=False).train(stop_at=6)
    expected = load_checkpoint(reference / "checkpoint.pt")["model"]
    assert model.state_dict().keys() == expected.keys()  # the tied head included
    err = max((model.state_dict()[k] - v).abs().max().item() for k, v in expected.items())
    assert err < 1e-5, err
    assert tokenizer.vocab_size == model.cfg.vocab_size
    # a second conversion would overwrite: refused, as are folders without a sharded checkpoint
    for argv, message in [([str(run)], "already exists"), ([str(reference)], "has no checkpoint.dcp"),
                          ([str(tmp_path / "nowhere")], "is not a folder")]:
        assert dcp_checkpoint.main(argv) == 2
        err_text = capsys.readouterr().err
        assert err_text.startswith("error: ") and message in err_text and len(err_text.strip().splitlines()) == 1


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "settings, env, message",
    [
        (["parallel=zero"], {}, "parallel must be one of none, ddp, fsdp"),
        (["parallel=fsdp", "batch_size=5"], {"WORLD_SIZE": "2"}, "set batch_size to a multiple of 2"),
        (["parallel=ddp", "device=cuda"], {}, "needs the NCCL backend"),
        (["parallel=none"], {"WORLD_SIZE": "2"}, "add --set parallel=ddp or --set parallel=fsdp"),
    ],
)
def test_bad_parallel_settings_are_one_line(cfg, tmp_path, capsys, monkeypatch, settings, env, message):
    if "cuda" in " ".join(settings) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main(["--config", "tiny", "--out", str(tmp_path), "--no-progress", "--set", f"dataset={cfg.dataset}",
                 *settings])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err.strip().splitlines()[-1]


# ---------------------------------------------------------------------- the real launcher


def test_torchrun_trains_with_fsdp(cfg, tmp_path):
    """``torchrun --nproc_per_node=2 -m llmbook.train --set parallel=fsdp``: one model.pt, logs written once."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "llmbook.train", "--config", "tiny", "--out", str(tmp_path / "runs"), "--no-progress",
               "--set", f"dataset={cfg.dataset}", "parallel=fsdp", "max_steps=6", "eval_interval=3",
               "context_length=16"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    assert result.stdout.count("trained 6 steps") == 1  # rank 0 alone prints
    evals = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
    assert evals == [0, 3, 6]  # written once, by rank 0
    assert [r["step"] for r in read_jsonl(run / "samples.jsonl")] == [0, 3, 6]
    model, _ = load_model(run)
    assert sum(p.numel() for p in model.parameters()) == json.loads((run / "summary.json").read_text())["params"]
    assert (run / DCP_CHECKPOINT / ".metadata").is_file()


def test_resume_with_dropout_is_exact(cfg, tmp_path):
    """With dropout, each rank draws its own masks (seed + rank) and gets its own RNG state back on resume.

    So a run stopped and resumed on as many ranks follows the uninterrupted run exactly, dropout and all.
    """
    noisy = dataclasses.replace(cfg, parallel="fsdp", model_overrides={"dropout": 0.1}, max_steps=8)
    run_ranks(2, (noisy, tmp_path / "straight", False, None), (noisy, tmp_path / "stopped", False, 4),
              (noisy, tmp_path / "stopped", True, None))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert sorted(resumed) == sorted(straight) == list(range(1, 9))
    assert resumed == straight, max(abs(resumed[s] - straight[s]) for s in straight)
    dropless = one_process(dataclasses.replace(noisy, parallel="none", model_overrides={"dropout": 0.0}),
                           tmp_path / "dropless")
    assert all(straight[s] != dropless[s] for s in range(2, 9))  # dropout really was on


def test_torchrun_error_is_one_line_from_rank_0(cfg, tmp_path):
    """Both ranks refuse a batch they cannot split; rank 0 alone says so, in one line (torchrun adds its report)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "llmbook.train", "--config", "tiny", "--out", str(tmp_path / "runs"), "--no-progress",
               "--set", f"dataset={cfg.dataset}", "parallel=ddp", "batch_size=5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=os.environ.copy())
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: batch_size=5 is the global batch and 2 ranks cannot share it evenly: set batch_size to "
                    "a multiple of 2 (e.g. --set batch_size=4)"]
    assert "exitcode  : 2" in result.stderr  # both ranks exited with the same code, and no rank's traceback shows:
    assert not [line for line in result.stderr.splitlines() if 'File "' in line and "/llmbook/" in line]


def _diverge_rank(rank: int, world_size: int, cfg_dict: dict, run_dir: str, cache: str) -> tuple[str, int]:
    os.environ["LLMBOOK_CACHE_DIR"] = cache
    from llmbook.distributed.trainer import DistributedTrainer
    from llmbook.errors import DivergedError

    trainer = DistributedTrainer(TrainConfig(**cfg_dict), run_dir, progress=False)
    try:
        trainer.train()
    except DivergedError as exc:
        return str(exc), trainer.step
    return "no error", trainer.step


def test_divergence_stops_every_rank_at_the_same_step(cfg, tmp_path):
    """A NaN is found by every rank at the same step (the loss is averaged, the weight check all-reduced): no hang."""
    wild = dataclasses.replace(cfg, parallel="fsdp", lr=1e4, grad_clip=0.0, checkpoint_interval=2)
    (message0, step0), (message1, step1) = spawn(_diverge_rank, 2, dataclasses.asdict(wild), str(tmp_path / "run"),
                                                 os.environ["LLMBOOK_CACHE_DIR"])
    assert message0 == message1 and step0 == step1 < STEPS and "training diverged" in message0
    assert "checkpoint.dcp" in message0  # the last good checkpoint it names is the sharded one
