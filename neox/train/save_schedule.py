"""When the training loop writes checkpoints: gpt-neox's checkpoint_factor / checkpoint_scale / extra_save_iters.

- linear scale: every multiple of checkpoint_factor (factor 20, 100 iterations -> 20, 40, 60, 80, 100);
- log scale: the integer parts of factor^0, factor^1, ... (factor 2 -> 1, 2, 4, 8, 16, 32, 64);
- extra_save_iters: these iterations too (0 means "before the first step" in a run that starts at 0);
- save_iters: an explicit list, used as it is (gpt-neox's older releases derived it from the keys above);
- the last iteration of a run is always saved (the loop's job, not this schedule's).
Our `save_interval` is checkpoint_factor at linear scale.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SaveSchedule:
    factor: float | None = None
    scale: str = "linear"
    extra: tuple[int, ...] = ()
    explicit: tuple[int, ...] | None = None  # save_iters as given

    def __post_init__(self) -> None:
        if self.scale not in ("linear", "log"):
            raise ValueError(f"checkpoint_scale must be 'linear' or 'log', got {self.scale!r}")
        if self.factor is not None:
            if self.scale == "linear" and (self.factor < 1 or not float(self.factor).is_integer()):
                raise ValueError(f"checkpoint_factor must be a whole number >= 1 with linear checkpoint_scale, "
                                 f"got {self.factor}")
            if self.scale == "log" and self.factor <= 1:
                raise ValueError(f"checkpoint_factor must be > 1 with log checkpoint_scale, got {self.factor}")

    def due(self, iteration: int) -> bool:
        """Is a checkpoint due after `iteration` steps (0: before the first step)?"""
        if self.explicit is not None:
            return iteration in self.explicit
        if iteration in self.extra:
            return True
        if self.factor is None or iteration < 1:
            return False
        if self.scale == "linear":
            return iteration % int(self.factor) == 0
        power = 1.0
        while int(power) <= iteration:
            if int(power) == iteration:
                return True
            power *= self.factor
        return False

    def iterations(self, train_iters: int, start: int = 0) -> list[int]:
        """The iterations a run from `start` to train_iters saves at, the final one included (`start` itself only
        when it is 0: the step-0 checkpoint of extra_save_iters)."""
        found = [0] if start == 0 and self.due(0) else []
        found += [it for it in range(start + 1, train_iters + 1) if self.due(it)]
        if train_iters > start and (not found or found[-1] != train_iters):
            found.append(train_iters)
        return found


def schedule_from_config(train) -> SaveSchedule:
    """The schedule of a TrainConfig (validated: save_interval and checkpoint_factor agree)."""
    factor = train.checkpoint_factor if train.checkpoint_factor is not None else train.save_interval
    return SaveSchedule(factor=factor, scale=train.checkpoint_scale, extra=tuple(train.extra_save_iters or ()),
                        explicit=None if train.save_iters is None else tuple(train.save_iters))
