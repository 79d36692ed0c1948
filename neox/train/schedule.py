"""Learning-rate schedule: linear warmup, then constant, linear or cosine decay down to min_lr.

`lr_at(step)` is a pure function of the step, so resuming needs nothing but the iteration number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    max_lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    decay_style: str = "cosine"

    def __post_init__(self) -> None:
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"lr_decay_style must be one of {DECAY_STYLES}, got {self.decay_style!r}")
        if self.min_lr > self.max_lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed the optimizer lr ({self.max_lr})")
        if self.warmup_iters < 0 or self.decay_iters < 0:
            raise ValueError("warmup and lr_decay_iters must be >= 0")

    def lr_at(self, step: int) -> float:
        """The lr used by optimizer step number `step` (0-based)."""
        if step < self.warmup_iters:
            # (step + 1): the first step already learns, as in Megatron-core, rather than wasting it at lr 0.
            return self.max_lr * (step + 1) / self.warmup_iters
        if self.decay_style == "constant":
            return self.max_lr
        span = self.decay_iters - self.warmup_iters
        if span <= 0 or step >= self.decay_iters:
            return self.min_lr
        progress = (step - self.warmup_iters) / span
        if self.decay_style == "linear":
            coeff = 1.0 - progress
        else:
            coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.max_lr - self.min_lr) * coeff


def warmup_iters_from_fraction(warmup: float, decay_iters: int) -> int:
    """gpt-neox's `warmup` is a fraction of lr_decay_iters."""
    if not 0.0 <= warmup <= 1.0:
        raise ValueError(f"warmup is a fraction of lr_decay_iters in [0, 1], got {warmup}")
    return int(round(warmup * decay_iters))
