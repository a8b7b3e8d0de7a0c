"""The order in which a post-training run visits its examples: epochs of seeded permutations.

Position k of the run (the k-th example drawn, counting over all steps) is
item ``permutation(seed, epoch)[k mod n]`` of epoch ``k // n``. The order is a
pure function of (seed, k), so a resumed run draws exactly what an
uninterrupted one would, with no sampler state in the checkpoint. SFT (rows),
DPO and reward models (pairs) and GRPO (prompts) all draw this way.
"""

from __future__ import annotations

import numpy as np


class EpochOrder:
    """``order.take(start, count)``: the item indices at run positions ``start .. start + count - 1``."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"there is nothing to order: {n} items")
        self.n, self.seed = n, seed
        self._epochs: dict[int, np.ndarray] = {}  # epoch -> its permutation, made once when first needed

    def take(self, start: int, count: int) -> list[int]:
        out = []
        for k in range(start, start + count):
            epoch, at = divmod(k, self.n)
            if epoch not in self._epochs:
                self._epochs[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out.append(int(self._epochs[epoch][at]))
        return out
