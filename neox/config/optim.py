"""Optimizer, learning-rate schedule, ZeRO and precision keys."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal

from neox.config.errors import ConfigError
from neox.config.fields import TypeMismatch, check_type, option

# Both names build torch AdamW (decoupled weight decay), as gpt-neox's "Adam" runs Adam in AdamW mode.
OPTIMIZER_TYPES = ("Adam", "AdamW")
OPTIMIZER_PARAMS: dict[str, Any] = {"lr": float, "betas": list[float], "eps": float}
# DeepSpeed's fp16 section keys (https://www.deepspeed.ai/docs/config-json/#fp16-training-options).
FP16_KEYS: dict[str, Any] = {
    "enabled": bool,
    "auto_cast": bool,
    "loss_scale": float,
    "initial_scale_power": int,
    "loss_scale_window": int,
    "hysteresis": int,
    "consecutive_hysteresis": bool,
    "min_loss_scale": float,
    "fp16_master_weights_and_grads": bool,
}
BF16_KEYS: dict[str, Any] = {"enabled": bool, "immediate_grad_update": bool, "check_overflow": bool}


@dataclass
class OptimConfig:
    optimizer: dict = option(
        {"type": "Adam", "params": {"lr": 6.0e-4, "betas": [0.9, 0.95], "eps": 1.0e-8}},
        "Optimizer {type, params{lr, betas, eps}}; type Adam or AdamW (both are torch AdamW with decoupled "
        "weight decay, fused on GPU). lr is the peak learning rate.",
    )
    lr_decay_style: Literal["constant", "linear", "cosine"] = option(
        "linear", "Learning-rate decay after warmup: constant, linear or cosine (down to min_lr)."
    )
    warmup: float = option(0.01, "Fraction of lr_decay_iters spent warming up linearly from 0 (0.01 = 1%).")
    min_lr: float = option(0.0, "Floor of the learning rate at the end of decay.")
    lr_decay_iters: int | None = option(None, "Iterations the decay spans; None means train_iters.")
    weight_decay: float = option(0.01, "Decoupled weight decay (biases and norm weights are exempt).")
    gradient_clipping: float = option(1.0, "Clip the global gradient L2 norm to this; 0 disables clipping.")
    zero_optimization: dict = option(
        {"stage": 0},
        "DeepSpeed ZeRO section passed through as-is (stage 0-3, bucket sizes, overlap_comm, ...). "
        "Stages 2 and 3 cannot be combined with pipe_parallel_size > 1.",
    )
    precision: Literal["fp32", "fp16", "bfloat16"] | None = option(
        None, "Training precision; None means taken from fp16.enabled / bf16.enabled, else fp32."
    )
    fp16: dict | None = option(
        None,
        "DeepSpeed fp16 section, e.g. {enabled: true, loss_scale: 0 (dynamic), initial_scale_power: 12, "
        "loss_scale_window: 1000, hysteresis: 2, min_loss_scale: 1}. Needs CUDA.",
    )
    bf16: dict | None = option(None, "DeepSpeed bf16 section, e.g. {enabled: true}.")

    @property
    def lr(self) -> float:
        return float(self.optimizer["params"]["lr"])

    @property
    def zero_stage(self) -> int:
        return int(self.zero_optimization.get("stage", 0))

    def validate(self) -> None:
        _check_section("optimizer", self.optimizer, {"type": str, "params": dict})
        if "type" not in self.optimizer or "params" not in self.optimizer:
            raise ConfigError("'optimizer' needs both 'type' and 'params' (e.g. params: {lr: 6.0e-4})")
        kind = self.optimizer["type"]
        if kind.lower() not in {t.lower() for t in OPTIMIZER_TYPES}:
            raise ConfigError(f"'optimizer.type' is {kind!r}; choose one of {', '.join(OPTIMIZER_TYPES)}")
        params = self.optimizer["params"]
        _check_section("optimizer.params", params, OPTIMIZER_PARAMS)
        if "lr" not in params:
            raise ConfigError("'optimizer.params.lr' must be set (the peak learning rate)")
        if params["lr"] <= 0:
            raise ConfigError(f"'optimizer.params.lr' must be positive, got {params['lr']}")
        betas = params.get("betas", [0.9, 0.999])
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"'optimizer.params.betas' must be two numbers in [0, 1), got {betas}")
        if params.get("eps", 1e-8) <= 0:
            raise ConfigError(f"'optimizer.params.eps' must be positive, got {params['eps']}")
        if not 0.0 <= self.warmup <= 1.0:
            raise ConfigError(f"'warmup' is a fraction of the decay iterations in [0, 1], got {self.warmup}")
        if self.min_lr < 0 or self.min_lr > params["lr"]:
            raise ConfigError(f"'min_lr' ({self.min_lr}) must be in [0, optimizer.params.lr={params['lr']}]")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise ConfigError(f"'lr_decay_iters' must be >= 1, got {self.lr_decay_iters}")
        if self.weight_decay < 0:
            raise ConfigError(f"'weight_decay' must be >= 0, got {self.weight_decay}")
        if self.gradient_clipping < 0:
            raise ConfigError(f"'gradient_clipping' must be >= 0 (0 disables), got {self.gradient_clipping}")
        stage = self.zero_optimization.get("stage", 0)
        if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
            raise ConfigError(f"'zero_optimization.stage' must be 0, 1, 2 or 3, got {stage!r}")
        _check_section("fp16", self.fp16 or {}, FP16_KEYS)
        _check_section("bf16", self.bf16 or {}, BF16_KEYS)


def _check_section(name: str, section: dict, known: dict[str, Any]) -> None:
    """Unknown sub-keys get a suggestion; known ones are type-checked (floats parsed) in place."""
    for key in list(section):
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean '{name}.{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown key '{name}.{key}'{hint}")
        try:
            section[key] = check_type(section[key], known[key])
        except TypeMismatch as err:
            raise ConfigError(f"'{name}.{key}' {err}") from None
