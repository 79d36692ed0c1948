"""Training-loop keys: iterations, batch sizes, checkpoints, evaluation cadence, seed."""
from __future__ import annotations

from dataclasses import dataclass

from neox.config.errors import ConfigError
from neox.config.fields import option


@dataclass
class TrainConfig:
    train_iters: int | None = option(None, "Optimizer steps to train for (required by `deepy train`).")
    train_micro_batch_size_per_gpu: int | None = option(None, "Sequences per rank per forward/backward pass.")
    gradient_accumulation_steps: int | None = option(
        None, "Micro-batches accumulated per optimizer step; derived from the other two batch keys if unset."
    )
    train_batch_size: int | None = option(
        None, "Sequences per optimizer step = micro batch x accumulation x data-parallel size; any two give the third."
    )
    seed: int = option(1234, "Seed of python, numpy and torch RNGs (offset per rank where needed).")
    save: str | None = option(None, "Checkpoint directory; the resolved config is written here too.")
    load: str | None = option(None, "Checkpoint directory to resume (or, with finetune, to start) from.")
    save_interval: int | None = option(None, "Save a checkpoint every this many iterations (and at the end).")
    keep_last_n_checkpoints: int | None = option(None, "Delete older checkpoints beyond this many; None keeps all.")
    checkpoint_layout_free: bool = option(
        True, "Also write a layout-free copy (fp32 weights + Adam moments, ~3x the fp32 parameters) into every "
        "checkpoint so any tp/pp/dp/ZeRO layout can resume it; false saves the space, and "
        "tools/reshard_checkpoint.py builds the copy later from DeepSpeed's files."
    )
    finetune: bool = option(
        False, "Load only the model weights from 'load': fresh optimizer, scheduler and iteration 0."
    )
    preempt_exit_code: int = option(
        75,
        "Exit code of a run stopped by SIGTERM/SIGUSR1 after its checkpoint: 'requeue me'. 75 is EX_TEMPFAIL "
        "(sysexits.h, 'temporary failure, retry later'): apart from 0, 1 (crash), 2 (bad input) and 128+N "
        "(killed by signal N), so a requeue rule can match it alone.",
    )
    eval_interval: int = option(1000, "Evaluate on the validation set every this many iterations.")
    eval_iters: int = option(100, "Validation batches per evaluation.")

    def validate(self) -> None:
        for key in (
            "train_iters",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "train_batch_size",
            "save_interval",
            "keep_last_n_checkpoints",
            "eval_interval",
        ):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {value}")
        if self.eval_iters < 0:
            raise ConfigError(f"'eval_iters' must be >= 0, got {self.eval_iters}")
        if not 3 <= self.preempt_exit_code <= 125:
            raise ConfigError(f"'preempt_exit_code' must be 3-125 (0-2 mean done, crash and bad input; 126+ are "
                              f"the shell's and signal deaths'), got {self.preempt_exit_code}")
        if self.finetune and self.load is None:
            raise ConfigError("'finetune' needs 'load' (the checkpoint whose weights to start from)")
