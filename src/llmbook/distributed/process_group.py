"""Process groups: join one from torchrun's environment.

Every distributed program starts the same way: each process learns its ``rank``
(0..world_size-1), the ``world_size`` and where to meet the others (a key-value
*store* at ``MASTER_ADDR:MASTER_PORT``), then calls ``init_process_group``.
``torchrun`` provides that environment; :func:`init_from_env` reads it.
``llmbook.distributed.launcher.spawn`` provides it for N local ranks started
from a notebook cell or a test.
"""

from __future__ import annotations

import os

import torch

from llmbook.errors import RunError

BACKENDS = ("gloo", "nccl")
ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def require_distributed() -> None:
    """Fail with one line if this PyTorch build has no ``torch.distributed`` (some macOS/mobile builds)."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RunError(
            "torch.distributed is not available in this PyTorch build; "
            "install an official torch wheel for Linux, macOS or Windows, which include it"
        )


def default_backend() -> str:
    """``nccl`` where CUDA GPUs are visible, ``gloo`` (CPU tensors) otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def check_backend(backend: str) -> None:
    """One clear line for a backend this machine cannot run."""
    import torch.distributed as dist

    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use 'gloo' (CPU tensors) or 'nccl' (CUDA tensors)")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA GPUs and torch.cuda.is_available() is False; use backend='gloo'")
    if backend == "nccl" and not dist.is_nccl_available():
        raise ValueError("backend='nccl' is not built into this PyTorch; install a CUDA build of torch or use 'gloo'")


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Join the process group described by torchrun's environment and return ``(rank, world_size)``.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (and
    ``LOCAL_RANK`` to pick this process's GPU under ``nccl``). ``backend=None``
    picks ``nccl`` on CUDA and ``gloo`` on CPU. Calling it again in a process
    that already joined returns the same pair.
    """
    require_distributed()
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [name for name in ENV_VARS if not os.environ.get(name)]
    if missing:
        raise RunError(
            f"init_from_env: {', '.join(missing)} not set; start the script with "
            "`torchrun --nproc_per_node=N script.py`, or call spawn(fn, N) from a notebook"
        )
    backend = default_backend() if backend is None else backend
    check_backend(backend)
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} must lie in 0..WORLD_SIZE-1 (WORLD_SIZE={world_size})")
    if backend == "nccl":
        local_rank = _env_int("LOCAL_RANK") if os.environ.get("LOCAL_RANK") else rank
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                "start at most one process per GPU on each node"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)  # binds the communicator to this GPU up front
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, device_id=device)
    else:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
    return rank, world_size
