"""One place to seed every random number generator the book uses.

Chapters call ``seed_everything()`` once at the top, so a run on the same CPU
with the same library versions prints the same numbers every time.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

DEFAULT_SEED = 1337


def seed_everything(seed: int = DEFAULT_SEED, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (CPU and CUDA); return a torch generator seeded alike.

    ``deterministic=True`` also asks PyTorch for deterministic kernels where they
    exist (``warn_only``, so an op without one warns instead of failing).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too, when present
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)
