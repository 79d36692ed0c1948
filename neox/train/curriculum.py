"""Sequence-length warm-up from gpt-neox's `curriculum_learning` section (DeepSpeed's legacy curriculum).

In gpt-neox, DeepSpeed's engine calls its CurriculumScheduler with ``update_difficulty(global_steps + 1)`` before
every training forward, and the batch's tokens, position ids, labels and loss mask are cut to the first
``difficulty`` positions (never lengthened). Evaluation reads full-length batches. DeepSpeed 0.19 no longer runs
the legacy curriculum inside its engine, so the loop does it here, with the scheduler's arithmetic
(deepspeed/runtime/data_pipeline/curriculum_scheduler.py; tests/unit check it value for value):

- fixed_linear / fixed_root: floor((step / total_curriculum_step) ** (1 / root_degree) x (max - min) + min), rounded
  down to a multiple of difficulty_step but not below the first multiple at or above min_difficulty, capped at max;
- fixed_discrete: difficulty[i] for the first i with step <= max_step[i], else the last difficulty;
- the current difficulty only moves while it is below max_difficulty.

A resumed run starts the scheduler afresh, as DeepSpeed and gpt-neox do; the schedules are functions of the step,
so it continues where the uninterrupted run was. A pipeline engine keeps activation buffers of the last shape it
sent: they are reset whenever the length changes (gpt-neox's DeepSpeed does the same in train_batch).
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch

__all__ = ["CurriculumSchedule", "SeqlenWarmup", "truncate_batch"]

# Batch entries with a sequence dimension (dim 1); anything else passes through unchanged.
_SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class CurriculumSchedule:
    """DeepSpeed CurriculumScheduler's difficulty arithmetic for a validated section (neox.config.curriculum)."""

    def __init__(self, section: dict[str, Any]):
        self.min = int(section["min_difficulty"])
        self.max = int(section["max_difficulty"])
        self.kind = section["schedule_type"]
        self.params = dict(section["schedule_config"])
        self.current = self.min

    def difficulty(self, step: int) -> int:
        if self.kind == "fixed_discrete":
            levels, ends = self.params["difficulty"], self.params["max_step"]
            for level, end in zip(levels, ends):
                if step <= end:
                    return int(level)
            return int(levels[-1])
        degree = 1.0 if self.kind == "fixed_linear" else float(self.params["root_degree"])
        unit = int(self.params["difficulty_step"])
        fraction = (float(step) / self.params["total_curriculum_step"]) ** (1.0 / degree)
        value = math.floor(fraction * (self.max - self.min) + self.min)
        value -= value % unit
        value = max(value, -(-self.min // unit) * unit)
        return min(value, self.max)

    def update(self, step: int) -> int:
        if self.current < self.max:
            self.current = self.difficulty(step)
        return self.current


def truncate_batch(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """The batch's first ``length`` positions (gpt-neox: tokens, position ids, labels and loss mask)."""
    return {key: value[:, :length].contiguous() if key in _SEQUENCE_KEYS and value.dim() >= 2 else value
            for key, value in batch.items()}


class SeqlenWarmup:
    """What the training loop calls: cut each step's micro-batches, and restore full length for evaluation."""

    def __init__(self, section: dict[str, Any], seq_length: int):
        self.schedule = CurriculumSchedule(section)
        self.seq_length = int(seq_length)
        self.length = self.seq_length  # of the batches fed last; logged as curriculum_seqlen
        self._fed: int | None = None
        self._window: list[int] = []  # lengths of the steps since the last take_window_mean

    def step_batches(self, micro_batches: Iterator[dict[str, torch.Tensor]], iteration: int,
                     engine: Any) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches of the step after ``iteration`` completed steps, cut to the scheduled length."""
        self.length = min(self.schedule.update(iteration + 1), self.seq_length)
        self._window.append(self.length)
        self._shape(engine, self.length)
        length = self.length
        return (truncate_batch(batch, length) for batch in micro_batches)

    def take_window_mean(self) -> float:
        """Mean length of the steps since the last call (tokens per sequence for throughput records)."""
        mean = sum(self._window) / len(self._window) if self._window else float(self.length)
        self._window.clear()
        return mean

    def full_length(self, engine: Any) -> None:
        self._shape(engine, self.seq_length)

    def _shape(self, engine: Any, length: int) -> None:
        reset = getattr(engine, "reset_activation_shape", None)  # DeepSpeed's PipelineEngine only
        if reset is not None and length != self._fed:
            reset()
        self._fed = length
