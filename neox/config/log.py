"""Logging keys: console cadence, log/tensorboard directories, wandb, MFU reference."""
from __future__ import annotations

from dataclasses import dataclass

from neox.config.errors import ConfigError
from neox.config.fields import option


@dataclass
class LogConfig:
    log_interval: int = option(10, "Print and record training metrics every this many iterations.")
    log_dir: str | None = option(
        None, "Directory of the metrics log (jsonl); the resolved config goes to save, or here."
    )
    tensorboard_dir: str | None = option(None, "Write TensorBoard scalars here; None disables TensorBoard.")
    use_wandb: bool = option(False, "Send metrics to Weights & Biases.")
    wandb_project: str = option("neox", "wandb project name.")
    wandb_group: str | None = option(None, "wandb group that gathers runs.")
    wandb_team: str | None = option(None, "wandb team (entity).")
    peak_flops: float | None = option(
        None, "Peak FLOP/s of one device for MFU; None looks the device up in a built-in table."
    )
    steps_per_print: int = option(10, "DeepSpeed's own progress print interval (steps_per_print).")
    wall_clock_breakdown: bool = option(False, "DeepSpeed forward/backward/step timing breakdown.")

    def validate(self) -> None:
        for key in ("log_interval", "steps_per_print"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"'peak_flops' must be positive, got {self.peak_flops}")
