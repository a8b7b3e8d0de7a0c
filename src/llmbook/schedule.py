"""The learning rate as a function of the step alone: linear warmup, cosine decay, a floor.

    lr
    peak |      .-''-.
         |    /        '.
         |   /           '.
    min  |  /               '-.________
         +--+--------------------+------ step
           warmup            decay_steps

Warmup: at step 0 Adam's second-moment estimates are one gradient old, so
its steps are large and noisy; a small learning rate that grows over the
first few hundred steps keeps the early updates from wrecking the
initialization. Cosine decay: big steps early to make progress, small steps
late to settle into a minimum. The floor (``min_ratio · peak``, 10% as in
nanoGPT and Chinchilla) keeps learning after ``decay_steps``.

Because the rate depends on the step and nothing else, resuming a run needs
no scheduler state: step 500 gets step 500's rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CosineSchedule:
    """``schedule(step) -> lr``.

    With peak 1e-3, warmup 99 and decay_steps 1000: 1e-5 at step 0, 1e-3 at step 99, 1e-4 from step 1000 on.
    """

    peak_lr: float
    warmup_steps: int
    decay_steps: int  # the step where the cosine reaches the floor; usually the run's last step
    min_ratio: float = 0.1  # the floor as a fraction of the peak

    def __post_init__(self) -> None:
        if self.peak_lr <= 0:
            raise ValueError(f"peak_lr must be positive, got {self.peak_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps < self.warmup_steps:
            raise ValueError(
                f"decay_steps={self.decay_steps} is before the end of warmup ({self.warmup_steps}): "
                "the cosine starts where warmup ends; make decay_steps >= warmup_steps"
            )
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio}")

    @property
    def min_lr(self) -> float:
        return self.min_ratio * self.peak_lr

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        # 1. warmup: a straight line from peak/(warmup+1) at step 0 up to the peak at step == warmup
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / (self.warmup_steps + 1)
        # 2. after the decay: the floor
        if step > self.decay_steps:
            return self.min_lr
        if self.decay_steps == self.warmup_steps:  # no room for a cosine: the peak for one step, then the floor
            return self.peak_lr
        # 3. cosine: progress 0 -> 1 takes the rate from the peak down to the floor
        progress = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group the learning rate ``lr``; optimizers read it afresh at each step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
