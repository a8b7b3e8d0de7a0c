"""Checkpoints of sharded runs with ``torch.distributed.checkpoint`` (DCP), and their conversion to one file.

With FSDP no rank holds the whole model: each holds a shard of every weight
and of AdamW's moments. Gathering them all on rank 0 to write one
``checkpoint.pt`` would need the whole model's memory on one rank, which is
what sharding avoids. DCP instead has every rank write its own pieces, in
parallel, into one folder, with a metadata file that says which piece of
which tensor each file holds. Loading reads that map, so a checkpoint
written by 2 ranks loads into 1, 3 or 8 ranks (or into a plain model in one
process): each rank reads the byte ranges its own shards need.

    RUN/checkpoint.dcp/
        .metadata         DCP's map of every tensor's pieces
        __0_0.distcp ...  the pieces, one file per rank
        meta.pt           step, RNG states, config, timings (llmbook.checkpoint: checksummed)

A checkpoint is written atomically: into ``RUN/.checkpoint.dcp.tmp``, then
renamed into place, so a crash mid-write leaves the previous checkpoint.
``torch.distributed.checkpoint.state_dict`` translates between each layout's
parameters (DTensor shards under FSDP2, plain tensors otherwise) and one
naming, the parameters' names ("blocks.0.attn.qkv.weight"), for the model
and for the optimizer alike; that naming is why layouts can change.

``python -m llmbook.distributed.dcp_checkpoint RUN_DIR`` writes the single
``model.pt`` that ``llmbook.train.load_model`` reads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from llmbook import checkpoint
from llmbook.errors import CheckpointError, RunError, one_line
from llmbook.model import GPT, ModelConfig
from llmbook.train import DCP_CHECKPOINT

META = "meta.pt"


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns when it loads without a process group; one process reading every piece is what we want here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)
        yield


def recover_interrupted_save(folder: Path | str) -> None:
    """Put back the previous checkpoint if a save crashed between its two renames (rank 0 only).

    A save moves the old folder aside (``.NAME.old``), then the new one into
    place; a crash in between leaves only the old one, under its other name.
    """
    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    if old.is_dir() and not folder.exists():
        os.replace(old, folder)


def save_sharded(folder: Path | str, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> Path:
    """Write model and optimizer with DCP into ``folder`` (every rank calls this), plus ``meta`` (rank 0), atomically.

    Each rank writes only its own shards; rank 0 also writes the small
    ``meta.pt`` and renames the finished temporary folder into place.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)  # the leftovers of a save that crashed
        recover_interrupted_save(folder)  # never delete the only good checkpoint as "old" below
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
        if _is_rank0():
            checkpoint.save_checkpoint(tmp / META, meta)
            shutil.rmtree(old, ignore_errors=True)
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)
            checkpoint._fsync_dir(folder.parent)
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, dcp.api.CheckpointException) as exc:
        if _is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"could not write the checkpoint {folder} ({one_line(exc)}): free disk space or make the "
                       "folder writable; the previous checkpoint, if any, is untouched") from None
    _barrier()  # nobody goes on (or saves again) before the folder is in place
    return folder


def read_meta(folder: Path | str) -> dict:
    """The small part of a sharded checkpoint: step, config, model_config, RNG states, timings."""
    folder = Path(folder)
    if not (folder / META).is_file() or not (folder / ".metadata").is_file():
        raise CheckpointError(f"{folder} is not a complete sharded checkpoint (no {META} or .metadata): delete it "
                              "and start over with --overwrite, or resume from a good copy")
    return checkpoint.load_checkpoint(folder / META)


def load_sharded(folder: Path | str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a DCP checkpoint into ``model`` and ``optimizer``, whatever their layout (every rank calls this).

    Sharded (FSDP2) or not, on any number of ranks, or in one process with no
    process group at all: the state dicts name what this layout needs, and DCP
    reads just those pieces.
    """
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=Path(folder))
    except (OSError, dcp.api.CheckpointException, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{folder} cannot be loaded ({one_line(exc)}): delete it and start over with "
                              "--overwrite, or resume from a good copy") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A ``optimizer.state_dict()`` (parameters numbered 0, 1, ... in group order) with names instead of numbers.

    The numbers only mean something next to one optimizer's list of
    parameters; names mean the same in every layout, which is what
    ``set_optimizer_state_dict`` needs to shard a full state over the ranks.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {order[int(i)]: s for i, s in state["state"].items()},
        "param_groups": [{**group, "params": [order[int(i)] for i in group["params"]]}
                         for group in state["param_groups"]],
    }


def load_full(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a single-file ``checkpoint.pt`` (full tensors) into a model and optimizer of any layout, e.g. sharded.

    Every rank reads the whole file and keeps its own shard of each tensor.
    """
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(model, optimizer, state["optimizer"]),
                             options=options)


# ---------------------------------------------------------------------- conversion to one file


def to_model_file(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write the weights of ``RUN_DIR/checkpoint.dcp`` as the single ``model.pt`` that ``load_model`` reads.

    Runs in one process, without a process group: DCP reads every rank's
    pieces into full tensors. ``out`` defaults to ``RUN_DIR/model.pt``, which
    must not exist yet (a finished run already has its model.pt).
    """
    run_dir = Path(run_dir)
    folder = run_dir / DCP_CHECKPOINT
    if not folder.is_dir():
        what = "is not a folder" if not run_dir.is_dir() else f"has no {DCP_CHECKPOINT}"
        raise FileNotFoundError(f"{run_dir} {what}: give the folder of a run trained with parallel=fsdp")
    out = run_dir / "model.pt" if out is None else Path(out)
    if out.exists():
        raise RunError(f"{out} already exists: give another file with --out, or move it away")
    meta = read_meta(folder)
    try:
        config = ModelConfig(**meta["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / META} holds no valid model_config ({one_line(exc)})") from None
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG where it was
        model = GPT(config)
    weights = model.state_dict()  # DCP fills these tensors in place
    try:
        with _quiet_single_process():
            dcp.load({"model": weights}, checkpoint_id=folder)
    except (OSError, dcp.api.CheckpointException, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{folder} cannot be loaded ({one_line(exc)}): it is damaged or incomplete") from None
    state_dict = {k: v.detach().cpu() for k, v in weights.items()}
    return checkpoint.save_checkpoint(out, {"model_config": asdict(config), "state_dict": state_dict})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmbook.distributed.dcp_checkpoint",
        description="Convert a sharded run's checkpoint.dcp into the single model.pt that load_model reads.",
    )
    parser.add_argument("run_dir", help="the run folder (it holds checkpoint.dcp)")
    parser.add_argument("--out", help="the file to write (default: RUN_DIR/model.pt)")
    args = parser.parse_args(argv)
    try:
        path = to_model_file(args.run_dir, args.out)
    except (OSError, RunError, ValueError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
