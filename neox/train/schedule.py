"""Learning-rate schedule: linear warmup, then constant, linear, cosine or exponential decay down to min_lr.

`lr_at(step)` is a pure function of the step, so resuming needs nothing but the step count. A checkpoint also
stores the schedule's settings (`state`); resuming compares them with the config as gpt-neox's AnnealingLR does
(`resume_schedule`): they must agree, unless override_lr_scheduler (the config wins) or
use_checkpoint_lr_scheduler (the checkpoint wins) says which one to take.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

DECAY_STYLES = ("constant", "linear", "cosine", "exponential")
# gpt-neox's exponential decay: lr = max_lr * exp(-0.693 * progress), i.e. halved (ln 2 ~ 0.693) at the end of
# the decay span; the same constant keeps the numbers equal to gpt-neox's.
_EXP_HALVING = 0.693


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
        if self.decay_style == "exponential":
            # As gpt-neox: the curve goes on past decay_iters (a quarter of max_lr at twice the span), floored.
            progress = (step - self.warmup_iters) / max(span, 1)
            return max(self.max_lr * math.exp(-_EXP_HALVING * progress), self.min_lr)
        if span <= 0 or step >= self.decay_iters:
            return self.min_lr
        progress = (step - self.warmup_iters) / span
        if self.decay_style == "linear":
            coeff = 1.0 - progress
        else:
            coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.max_lr - self.min_lr) * coeff

    def state(self, steps_done: int) -> dict:
        """What a checkpoint stores: the settings, and how many steps of this schedule have been taken."""
        return {**dataclasses.asdict(self), "num_iters": int(steps_done)}


def warmup_iters_from_fraction(warmup: float, decay_iters: int) -> int:
    """gpt-neox's `warmup` is a fraction of lr_decay_iters."""
    if not 0.0 <= warmup <= 1.0:
        raise ValueError(f"warmup is a fraction of lr_decay_iters in [0, 1], got {warmup}")
    return int(round(warmup * decay_iters))


def decay_iters_for(lr_decay_iters: int | None, lr_decay_fraction: float | None, train_iters: int) -> int:
    """gpt-neox's order: lr_decay_iters if set, else floor(train_iters x lr_decay_fraction), else train_iters;
    at least 1."""
    if lr_decay_iters is not None:
        iters = lr_decay_iters
    elif lr_decay_fraction is not None:
        iters = math.floor(train_iters * lr_decay_fraction)
    else:
        iters = train_iters
    return max(1, int(iters))


class ScheduleMismatch(ValueError):
    pass


# Setting -> the config key(s) a user changes to make it agree.
_SETTING_KEYS = {
    "max_lr": "'optimizer.params.lr'",
    "min_lr": "'min_lr'",
    "warmup_iters": "'warmup' x the decay iterations",
    "decay_iters": "'lr_decay_iters', else 'lr_decay_fraction' x 'train_iters', else 'train_iters'",
    "decay_style": "'lr_decay_style'",
}


def resume_schedule(configured: LRSchedule, saved: dict, *, override: bool,
                    use_checkpoint: bool) -> tuple[LRSchedule, list[str]]:
    """The schedule a resumed run follows, and one line per setting that differs and how it was settled.

    gpt-neox's AnnealingLR.load_state_dict: override_lr_scheduler takes the config's values; otherwise the
    checkpoint's are taken, and without use_checkpoint_lr_scheduler they must equal the config's."""
    if override and use_checkpoint:
        raise ScheduleMismatch("'override_lr_scheduler' and 'use_checkpoint_lr_scheduler' are both true; "
                               "set at most one")
    values: dict = {}
    notes: list[str] = []
    for name, key in _SETTING_KEYS.items():
        mine, theirs = getattr(configured, name), saved.get(name, getattr(configured, name))
        if mine == theirs or override:
            values[name] = mine
            if mine != theirs:
                notes.append(f"{name}: config {mine!r} replaces checkpoint {theirs!r} (override_lr_scheduler)")
            continue
        if not use_checkpoint:
            raise ScheduleMismatch(
                f"the checkpoint's learning-rate schedule has {name} = {theirs!r} but the config gives {mine!r} "
                f"(set by {key}): make them agree, or set 'override_lr_scheduler: true' to use the config's "
                "schedule, or 'use_checkpoint_lr_scheduler: true' to keep the checkpoint's")
        values[name] = theirs
        notes.append(f"{name}: checkpoint {theirs!r} kept over config {mine!r} (use_checkpoint_lr_scheduler)")
    return LRSchedule(**values), notes
