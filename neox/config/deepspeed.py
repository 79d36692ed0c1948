"""The DeepSpeed JSON config, built from a resolved NeoXConfig.

There is no "optimizer" or "scheduler" section: the training loop builds torch AdamW (fused on GPU) and
our LR schedule and hands both to deepspeed.initialize. torch AdamW is on DeepSpeed's list of ZeRO-tested
optimizers, so neither "zero_allow_untested_optimizer" nor "torch_adam" (an option of DeepSpeed-built Adam)
is needed.
"""
from __future__ import annotations

import copy
from typing import Any

from neox.config.errors import ConfigError
from neox.config.neox_config import NeoXConfig

# Dynamic loss scaling (loss_scale 0) with DeepSpeed's documented defaults, which a user's fp16 section overrides.
FP16_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}


def check_precision_supported(cfg: NeoXConfig, cuda_available: bool) -> None:
    if cfg.optim.precision == "fp16" and not cuda_available:
        raise ConfigError(
            "'precision' fp16 needs CUDA (DeepSpeed's fp16 optimizer and loss scaler run on GPU), and this "
            "machine has none: use precision bfloat16 (bf16: {enabled: true}) or fp32 on CPU"
        )


def deepspeed_config(cfg: NeoXConfig, *, cuda_available: bool | None = None) -> dict[str, Any]:
    """The dict to pass as deepspeed.initialize(config=...). cuda_available None asks torch."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    check_precision_supported(cfg, cuda_available)
    t, o = cfg.train, cfg.optim
    ds: dict[str, Any] = {
        "train_batch_size": t.train_batch_size,
        "train_micro_batch_size_per_gpu": t.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": o.gradient_clipping,
        "zero_optimization": copy.deepcopy(o.zero_optimization),
        "steps_per_print": cfg.log.steps_per_print,
        "wall_clock_breakdown": cfg.log.wall_clock_breakdown,
    }
    if o.precision == "fp16":
        ds["fp16"] = {**FP16_DEFAULTS, **(o.fp16 or {}), "enabled": True}
    elif o.precision == "bfloat16":
        ds["bf16"] = {**(o.bf16 or {}), "enabled": True}
    for key, value in (cfg.launch.deepspeed_extra_args or {}).items():
        if key in ds:
            raise ConfigError(
                f"'deepspeed_extra_args' sets {key!r}, which is built from this config; set the neox key instead"
            )
        ds[key] = copy.deepcopy(value)
    return ds
