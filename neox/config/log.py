"""Logging keys: console cadence, log/tensorboard directories, wandb (on when wandb_project is set), MFU reference."""
from __future__ import annotations

from dataclasses import dataclass

from neox.config.errors import ConfigError
from neox.config.fields import option

DEFAULT_WANDB_PROJECT = "neox"  # gpt-neox's default, for configs that only say use_wandb: true


@dataclass
class LogConfig:
    log_interval: int = option(10, "Print and record training metrics every this many iterations.")
    log_dir: str | None = option(
        None, "Directory of the metrics log (jsonl); the resolved config goes to save, or here."
    )
    tensorboard_dir: str | None = option(None, "Write TensorBoard scalars here; None disables TensorBoard.")
    use_wandb: bool | None = option(
        None, "Send metrics to Weights & Biases: unset = on exactly when wandb_project is set; true / false force it."
    )
    wandb_project: str | None = option(
        None, "wandb project name; setting it turns wandb on (use_wandb: true alone uses project 'neox')."
    )
    wandb_group: str | None = option(None, "wandb group that gathers runs.")
    wandb_team: str | None = option(None, "wandb team (entity).")
    peak_flops: float | None = option(
        None, "Peak FLOP/s of one device for MFU; None looks the device up in a built-in table."
    )
    steps_per_print: int = option(10, "DeepSpeed's own progress print interval (steps_per_print).")
    wall_clock_breakdown: bool = option(False, "DeepSpeed forward/backward/step timing breakdown.")

    def active_wandb_project(self) -> str | None:
        """The wandb project metrics go to, or None when wandb is off."""
        if self.use_wandb is False:
            return None
        if self.use_wandb is None and not self.wandb_project:
            return None
        return self.wandb_project or DEFAULT_WANDB_PROJECT

    def validate(self) -> None:
        for key in ("log_interval", "steps_per_print"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"'peak_flops' must be positive, got {self.peak_flops}")
