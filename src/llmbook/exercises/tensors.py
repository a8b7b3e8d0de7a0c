"""Checking tensors a reader's exercise returns: shape, dtype, values, and the likely mistake.

Shared by the checks of the chapters whose exercises return tensors (4 and 5):
``returned_tensor`` rejects the wrong kind of answer with a message that names
it, ``first_hint`` compares a wrong answer with the wrong answers that typical
mistakes produce and names the mistake.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_tensor(*shape: int, seed: int) -> Tensor:
    """Reproducible standard-normal test data, independent of the notebook's RNG state."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def returned_tensor(got, name: str, shape: tuple[int, ...], what: str) -> Tensor:
    """Assert ``got`` is a float tensor of ``shape``; return it as float32."""
    if got is None:
        raise AssertionError(f"{name} returned None; did you forget `return`?")
    if not isinstance(got, Tensor):
        raise AssertionError(f"{name}({what}) should return a torch.Tensor, got {type(got).__name__}: {got!r:.60}")
    if tuple(got.shape) != shape:
        raise AssertionError(f"{name}({what}) should return shape {shape}, got {tuple(got.shape)}")
    if not got.is_floating_point():
        raise AssertionError(f"{name}({what}) should return a float tensor, got {got.dtype}")
    return got.float()


def close(a: Tensor, b: Tensor, atol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=atol, rtol=1e-4))


def first_hint(got: Tensor, candidates: list[tuple[Tensor, str]]) -> str:
    """The hint of the first wrong answer that ``got`` matches, or ''."""
    for wrong, hint in candidates:
        if close(got, wrong):
            return f"; {hint}"
    return ""
