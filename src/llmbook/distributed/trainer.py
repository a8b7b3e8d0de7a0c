"""The book's trainer on several processes, on PyTorch's own engine: DDP or FSDP2 under ``torchrun``.

    torchrun --standalone --nproc_per_node=2 -m llmbook.train --config tiny --set parallel=fsdp

Chapter 8 builds data parallelism and sharding by hand to show how they work;
real runs use PyTorch's implementations, which this trainer plugs into
Chapter 7's ``Trainer`` through the methods it left for the purpose:

- ``wrap_model``: ``DistributedDataParallel`` (``parallel="ddp"``), or FSDP2's
  ``fully_shard`` on every block and then on the whole model (``"fsdp"``):
  each block's weights are gathered just before it runs and freed after.
- ``get_batch``: the step's *global* batch of ``cfg.batch_size`` sequences is
  drawn exactly as one process draws it (the generator seeded with
  ``(seed, step, micro)``), and rank r keeps rows r·b .. (r+1)·b, b =
  batch_size / world_size. So 2 ranks × b train on what 1 process × 2b does,
  and the losses match step by step (tests/test_distributed_train.py).
- ``no_sync``: gradients are synchronised once per optimizer step, on the
  last micro-batch (DDP's ``no_sync()``, FSDP2's ``set_requires_gradient_sync``).
- ``optimizer_step``: with FSDP the gradients are DTensor shards; PyTorch's
  ``clip_grad_norm_`` computes their norm over all ranks. The optimizer stays
  the book's ``ForeachAdamW``: its ``torch._foreach_*`` calls accept DTensors
  and work shard by shard, so each rank keeps AdamW's moments for its shards only.
- ``forward_backward`` returns the loss averaged over the ranks, so what is
  logged (and checked for NaN) is the global batch's loss, the same on every rank.

Seeds: every rank builds the model from ``cfg.seed`` (identical weights; DDP
broadcasts rank 0's anyway), then reseeds its dropout generator with
``cfg.seed + rank``, so ranks drop different units, as different processes
of one big batch should. Batches do not depend on the rank's generator.
Checkpoints keep every rank's generator state; resumed on as many ranks,
each gets its own back (exact, dropout included); on another number of
ranks each is reseeded from ``(seed, rank, step)``.

Rank 0 alone writes files, prints and shows the progress bar. Evaluation and
sampling run on every rank: with FSDP every forward is a collective (the
blocks' weights are gathered from all ranks), so all must take part; the
results are the same everywhere and rank 0 logs them.

Checkpoints: DDP's state is the same on every rank, so rank 0 writes the
usual single-file ``checkpoint.pt``. FSDP's is not on any one rank, so every
rank writes its shards with ``torch.distributed.checkpoint`` into
``checkpoint.dcp`` (``llmbook.distributed.dcp_checkpoint``). Either resumes
with any number of ranks and either ``parallel`` (and with ``parallel="none"``).
The final ``model.pt`` is always the single file ``load_model`` reads.

Stopping: a signal reaches the ranks at different moments, so they agree at
every step (one tiny all-reduce) and all stop after the same one, then save.
After an error on one rank nothing is saved (a save needs every rank, and
the others may never arrive); ``torchrun`` stops the other ranks, and only
rank 0 prints, one line. fp16 is refused with FSDP: each rank's GradScaler
would see only its own shard's overflow; use bf16.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from llmbook import checkpoint, loader
from llmbook.distributed import dcp_checkpoint
from llmbook.distributed.process_group import ENV_VARS, init_from_env, require_distributed
from llmbook.errors import RunError
from llmbook.model import GPT
from llmbook.schedule import set_lr
from llmbook.train import DCP_CHECKPOINT, TrainConfig, Trainer


def _world_size_from_env() -> int:
    value = os.environ.get("WORLD_SIZE") or "1"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE={value!r} must be an integer") from None


class DistributedTrainer(Trainer):
    """``Trainer`` for ``cfg.parallel`` in ("ddp", "fsdp"), one instance per rank (torchrun or ``spawn`` starts them).

    Joins the process group from torchrun's environment (gloo on CPU, nccl on
    CUDA); started without torchrun it forms a group of one process, so
    ``python -m llmbook.train --set parallel=fsdp`` runs too.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path | str, progress: bool = True):
        require_distributed()
        device = torch.device(cfg.resolved_device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError(f"device={cfg.device!r} with parallel={cfg.parallel!r} needs the NCCL backend, which "
                             "needs CUDA GPUs, and this machine has none; use device='cpu' (the gloo backend)")
        world_size = dist.get_world_size() if dist.is_initialized() else _world_size_from_env()
        if cfg.parallel == "none" and world_size > 1:
            raise ValueError(f"{world_size} processes were started but parallel='none' would train {world_size} "
                             "separate copies: add --set parallel=ddp or --set parallel=fsdp")
        if cfg.parallel == "none":
            raise ValueError("DistributedTrainer is for parallel='ddp' or 'fsdp'; use Trainer for parallel='none'")
        if cfg.batch_size % world_size:
            fit = max(world_size, cfg.batch_size // world_size * world_size)
            raise ValueError(f"batch_size={cfg.batch_size} is the global batch and {world_size} ranks cannot share "
                             f"it evenly: set batch_size to a multiple of {world_size} (e.g. --set batch_size={fit})")
        self._owns_group = not dist.is_initialized()
        if dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        elif all(os.environ.get(name) for name in ENV_VARS):
            self.rank, self.world_size = init_from_env(backend)
        else:  # no torchrun: a group of one process, all in memory
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self.rank, self.world_size = 0, 1
        self.is_main = self.rank == 0
        self.local_batch = cfg.batch_size // self.world_size
        # control messages (stop?) on the CPU: a gloo group, so asking never waits for the GPU
        self._cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else None
        self._resume_rngs: list | None = None
        if self.world_size > 1:  # rank 0 tokenizes the text into the cache once; the others then read it
            if self.is_main:
                loader.prepare_data(cfg.dataset, cfg.tokenizer, cfg.val_fraction)
            dist.barrier()
        super().__init__(cfg, run_dir, progress)

    # ------------------------------------------------------------------ the pieces of a step

    @property
    def sharded(self) -> bool:
        return self.cfg.parallel == "fsdp"

    def wrap_model(self, model: GPT) -> nn.Module:
        """DDP around the model, or FSDP2 on each block and then the root; then dropout's seed becomes seed + rank."""
        if self.sharded:
            mesh = init_device_mesh(self.device.type, (self.world_size,))
            for block in model.blocks:  # each block's weights gathered just before it runs, freed after
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, head (tied to the embedding)
            wrapped = model  # in place: its parameters are now DTensors, this rank's shards of the weights
        else:
            device_ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None
            wrapped = self._ddp = DistributedDataParallel(model, device_ids=device_ids)
        torch.manual_seed(self.cfg.seed + self.rank)  # dropout: each rank drops different units
        return torch.compile(wrapped) if self.cfg.compile else wrapped

    def get_batch(self, step: int, micro: int) -> tuple[Tensor, Tensor]:
        """This rank's rows of the global batch a single process would draw for ``(step, micro)``."""
        rng = np.random.default_rng([self.cfg.seed, step, micro])
        x, y = loader.get_batch(self.data.train, self.cfg.batch_size, self.cfg.context_length, "cpu", rng)
        rows = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        return x[rows].to(self.device), y[rows].to(self.device)

    def no_sync(self, micro: int) -> contextlib.AbstractContextManager:
        """Synchronise gradients on the last micro-batch only: one all-reduce (or reduce-scatter) per step."""
        last = micro == self.cfg.accumulation_steps - 1
        if self.sharded:
            self.raw_model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self._ddp.no_sync()

    def forward_backward(self, step: int) -> Tensor:
        """The local gradient (synchronised by DDP/FSDP) and the global batch's loss, averaged over the ranks."""
        loss = super().forward_backward(step)
        dist.all_reduce(loss)  # gloo has no AVG: sum, then divide
        return loss / self.world_size

    def optimizer_step(self, lr: float) -> Tensor | None:
        """DDP: as one process (every rank holds the same averaged gradients). FSDP: clip the sharded gradients."""
        if not self.sharded:
            return super().optimizer_step(lr)
        set_lr(self.optimizer, lr)
        norm = None
        if self.cfg.grad_clip > 0:  # the norm of DTensor shards, summed over the ranks; the same scale everywhere
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        self.optimizer.step()  # llmbook's ForeachAdamW: its _foreach_ calls work on DTensor shards
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _weights_finite(self) -> Tensor:
        """Every rank's shards finite? The same answer on every rank, so all stop together or none does."""
        local = [p.to_local() if isinstance(p, DTensor) else p for p in self.params]
        ok = torch.stack([torch.isfinite(t).all() for t in local]).all()
        bad = (~ok).to(torch.float32)
        dist.all_reduce(bad)
        return bad == 0

    def _should_stop(self, stop) -> bool:
        """A signal reaches the ranks at different moments; they agree (one tiny all-reduce) to stop after one step."""
        flag = torch.tensor([float(stop.signum or 0)])
        if self._cpu_group is None:
            flag = flag.to(self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._cpu_group)
        signum = int(flag.item())
        if signum and stop.signum is None:
            stop.signum = signum  # this rank stops as if it had received the signal itself
        return signum != 0

    def _save_after_error(self, exc: BaseException) -> None:
        """Nothing: saving takes every rank, and after an error on one the others may never come (a hang).

        The last periodic checkpoint is kept; Ctrl-C and SIGTERM still save, as the ranks agree on those.
        """

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_file(self) -> Path:
        return self.run_dir / (DCP_CHECKPOINT if self.sharded else "checkpoint.pt")

    def _gather_rngs(self) -> list:
        rngs: list = [None] * self.world_size
        dist.all_gather_object(rngs, checkpoint.rng_state())
        return rngs

    def save_checkpoint(self) -> Path | None:
        """FSDP: every rank writes its shards (DCP). DDP: rank 0 writes ``checkpoint.pt``, as one process would.

        Either way the file holds every rank's RNG state, and the other format's
        older checkpoint is removed, so resuming finds the newest.
        """
        self._check_finite()
        rngs = self._gather_rngs()
        if self.sharded:
            meta = {"step": self.step, "rng_state": rngs[0], "config": asdict(self.cfg),
                    "model_config": asdict(self.model_config), "scaler": self.scaler.state_dict(),
                    "train_seconds": self.train_seconds, "total_seconds": self.total_seconds + self._session_seconds(),
                    "last_eval": self.last_eval}  # Trainer.state_dict's keys but the tensors, which DCP writes
            path = dcp_checkpoint.save_sharded(self.checkpoint_file, self.raw_model, self.optimizer,
                                               {**meta, "rng_states": rngs, "world_size": self.world_size})
            if self.is_main:
                (self.run_dir / "checkpoint.pt").unlink(missing_ok=True)
        else:
            path = None
            if self.is_main:
                path = checkpoint.save_checkpoint(self.checkpoint_file, {**self.state_dict(), "rng_states": rngs,
                                                                         "world_size": self.world_size})
                shutil.rmtree(self.run_dir / DCP_CHECKPOINT, ignore_errors=True)
            dist.barrier()
        self.checkpoint_step = self.step
        return path

    def resume_file(self) -> Path | None:
        """``checkpoint.pt`` or ``checkpoint.dcp``, whichever is newer (saving one removes the other); or None."""
        if self.is_main:
            dcp_checkpoint.recover_interrupted_save(self.run_dir / DCP_CHECKPOINT)
        dist.barrier()
        found = [path for path in (self.run_dir / "checkpoint.pt", self.run_dir / DCP_CHECKPOINT) if path.exists()]
        return max(found, key=lambda path: path.stat().st_mtime_ns) if found else None

    def read_training_state(self, path: Path) -> dict:
        """A sharded checkpoint's metadata (step, config, RNG; the tensors come in ``load_training_state``)."""
        return dcp_checkpoint.read_meta(path) if path.name == DCP_CHECKPOINT else super().read_training_state(path)

    def load_training_state(self, state: dict, path: Path) -> None:
        """DCP reads any layout; a single-file checkpoint is read whole by every rank, which keeps its shards."""
        self._resume_rngs = state.get("rng_states")
        if path.name == DCP_CHECKPOINT:
            dcp_checkpoint.load_sharded(path, self.raw_model, self.optimizer)
        elif self.sharded:
            dcp_checkpoint.load_full(self.raw_model, self.optimizer, state)
        else:
            super().load_training_state(state, path)

    def restore(self) -> bool:
        """As one process does; then each rank takes back its own RNG state (reseeded if the rank count changed)."""
        was_restored = self._restored
        restored = super().restore()
        if restored and not was_restored:
            rngs = self._resume_rngs
            if isinstance(rngs, list) and len(rngs) == self.world_size:
                checkpoint.set_rng_state(rngs[self.rank])
            else:  # another rank count (or a one-process checkpoint): a fresh stream per rank and step
                seed = np.random.SeedSequence([self.cfg.seed, self.rank, self.step]).generate_state(1)[0]
                torch.manual_seed(int(seed))
        return restored

    def _prepare_run_dir(self, resumed: bool) -> None:
        super()._prepare_run_dir(resumed)
        dist.barrier()  # the folder exists (and an old run is gone) before any rank writes into it

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole model on rank 0's CPU (FSDP gathers the shards block by block); empty on the other ranks."""
        if not self.sharded:
            return super().full_state_dict() if self.is_main else {}
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.raw_model, options=options)

    # ------------------------------------------------------------------ the run

    def train(self, resume: bool = False, stop_at: int | None = None, overwrite: bool = False) -> dict:
        """``Trainer.train`` on every rank; a lost peer (another rank died) becomes one line instead of a traceback."""
        try:
            return super().train(resume=resume, stop_at=stop_at, overwrite=overwrite)
        except dist.DistError as exc:
            raise RunError(f"rank {self.rank} lost contact with the other ranks (one of them stopped; its output says "
                           f"why): {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'DistError'}"
                           ) from None

    def close(self) -> None:
        """Leave the process group, if this trainer joined it (``spawn``'s ranks leave their own)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
