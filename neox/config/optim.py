"""Optimizer, learning-rate schedule, ZeRO and precision keys."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal

from neox.config.errors import ConfigError
from neox.config.fields import TypeMismatch, check_type, option
from neox.config.optimizer_params import check_optimizer

# DeepSpeed's fp16 section keys (https://www.deepspeed.ai/docs/config-json/#fp16-training-options), plus the
# spellings gpt-neox configs carry: fp16.fp16 (no effect: `enabled` decides, in gpt-neox too), fp16.type (DeeperSpeed:
# bfloat16 trains in bf16), and min_scale / dynamic_loss_scale, gpt-neox's top-level loss-scale keys, which map to
# min_loss_scale and loss_scale 0. neox/config/deepspeed.py turns the section into the one DeepSpeed reads.
FP16_KEYS: dict[str, Any] = {
    "enabled": bool,
    "auto_cast": bool,
    "loss_scale": float | None,
    "initial_scale_power": int,
    "loss_scale_window": float,
    "hysteresis": int,
    "consecutive_hysteresis": bool,
    "min_loss_scale": float,
    "fp16_master_weights_and_grads": bool,
    "fp16": bool,
    "type": Literal["fp16", "bfloat16"],
    "min_scale": float,
    "dynamic_loss_scale": bool | None,
}
# DeepSpeed's bf16 section keys, plus bf16.bf16 (gpt-neox configs; no effect, `enabled` decides).
BF16_KEYS: dict[str, Any] = {
    "enabled": bool,
    "immediate_grad_update": bool,
    "check_grad_overflow": bool,
    "bf16_master_weights_and_grads": bool,
    "bf16_optimizer_states": bool,
    "bf16": bool,
}
# DeepSpeed's data_types section (https://www.deepspeed.ai/docs/config-json/#data-type-options).
DATA_TYPES_KEYS: dict[str, Any] = {
    "grad_accum_dtype": Literal["fp16", "bf16", "fp32"] | None,
}


@dataclass
class OptimConfig:
    optimizer: dict = option(
        {"type": "Adam", "params": {"lr": 6.0e-4, "betas": [0.9, 0.95], "eps": 1.0e-8}},
        "Optimizer {type, params}; params.lr is the peak learning rate. Types (any case), as gpt-neox: adam "
        "(decoupled weight decay; params betas, eps, bias_correction, adam_w_mode, amsgrad), cpu_adam "
        "(DeepSpeedCPUAdam, whose op builds in ~40 s on first use), cpu_torch_adam (torch Adam, L2 decay), lion "
        "(betas), sm3 (momentum, beta, eps; no "
        "weight decay), madgrad_wd (momentum, eps), sgd (mup's MuSGD, needs use_mup); onebitadam is refused "
        "(DeepSpeed removed it).",
    )
    lr_decay_style: Literal["constant", "linear", "cosine", "exponential"] = option(
        "linear", "Learning-rate decay after warmup: constant, linear or cosine (down to min_lr), or exponential "
        "(lr x exp(-0.693 x progress): half the lr at lr_decay_iters, floored at min_lr), as gpt-neox."
    )
    warmup: float = option(0.01, "Fraction of lr_decay_iters spent warming up linearly from 0 (0.01 = 1%).")
    min_lr: float = option(0.0, "Floor of the learning rate at the end of decay.")
    lr_decay_iters: int | None = option(
        None, "Iterations the decay spans; None means floor(train_iters x lr_decay_fraction), else train_iters."
    )
    lr_decay_fraction: float | None = option(
        None, "Fraction of train_iters (also when derived from train_epochs) the decay spans, when lr_decay_iters "
        "is unset."
    )
    override_lr_scheduler: bool = option(
        False, "On resume, take lr, min_lr, warmup, decay iterations and decay style from the config even where "
        "the checkpoint's schedule differs."
    )
    use_checkpoint_lr_scheduler: bool = option(
        False, "On resume, keep the checkpoint's schedule settings over the config's. With neither this nor "
        "override_lr_scheduler, a difference between the two stops the run."
    )
    weight_decay: float = option(
        0.1, "Weight decay (biases and norm weights are exempt): decoupled for adam, cpu_adam, lion and madgrad_wd, "
        "L2 for cpu_torch_adam, sgd and adam with use_mup, none for sm3 (as in gpt-neox)."
    )
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
        "loss_scale_window: 1000, hysteresis: 2, min_loss_scale: 1}. Needs CUDA. type: bfloat16 (DeeperSpeed's "
        "spelling) trains in bf16 instead; fp16.fp16 is accepted and has no effect, as in gpt-neox.",
    )
    bf16: dict | None = option(None, "DeepSpeed bf16 section, e.g. {enabled: true}.")
    use_bnb_optimizer: bool = option(
        False, "Use bitsandbytes' 8-bit Adam for optimizer type adam (CUDA and the bitsandbytes package needed)."
    )
    fp32_allreduce: bool = option(
        False, "All-reduce data-parallel gradients in fp32 (DeepSpeed communication_data_type: fp32), e.g. for bf16."
    )
    prescale_gradients: bool = option(
        False, "Divide gradients by the data-parallel size before the all-reduce instead of after (DeepSpeed)."
    )
    gradient_predivide_factor: float = option(
        1.0, "Divide gradients by this before the data-parallel all-reduce and by world/this after (DeepSpeed)."
    )
    communication_data_type: Literal["fp16", "bf16", "fp32"] | None = option(
        None, "Data type of the data-parallel gradient all-reduce (DeepSpeed); None: the training precision."
    )
    data_types: dict | None = option(
        None, "DeepSpeed data_types section: {grad_accum_dtype: fp32|fp16|bf16}, the dtype gradients accumulate in."
    )

    @property
    def lr(self) -> float:
        return float(self.optimizer["params"]["lr"])

    @property
    def zero_stage(self) -> int:
        return int(self.zero_optimization.get("stage", 0))

    def validate(self) -> None:
        check_optimizer(self.optimizer, use_bnb_optimizer=self.use_bnb_optimizer)
        params = self.optimizer["params"]
        if not 0.0 <= self.warmup <= 1.0:
            raise ConfigError(f"'warmup' is a fraction of the decay iterations in [0, 1], got {self.warmup}")
        if self.min_lr < 0 or self.min_lr > params["lr"]:
            raise ConfigError(f"'min_lr' ({self.min_lr}) must be in [0, optimizer.params.lr={params['lr']}]")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise ConfigError(f"'lr_decay_iters' must be >= 1, got {self.lr_decay_iters}")
        if self.lr_decay_fraction is not None and self.lr_decay_fraction <= 0:
            raise ConfigError(f"'lr_decay_fraction' must be > 0, got {self.lr_decay_fraction}")
        if self.override_lr_scheduler and self.use_checkpoint_lr_scheduler:
            raise ConfigError("'override_lr_scheduler' (the config's schedule wins) and 'use_checkpoint_lr_scheduler' "
                              "(the checkpoint's wins) are both true; set at most one")
        if self.weight_decay < 0:
            raise ConfigError(f"'weight_decay' must be >= 0, got {self.weight_decay}")
        if self.gradient_clipping < 0:
            raise ConfigError(f"'gradient_clipping' must be >= 0 (0 disables), got {self.gradient_clipping}")
        stage = self.zero_optimization.get("stage", 0)
        if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
            raise ConfigError(f"'zero_optimization.stage' must be 0, 1, 2 or 3, got {stage!r}")
        _check_section("fp16", self.fp16 or {}, FP16_KEYS)
        _check_section("bf16", self.bf16 or {}, BF16_KEYS)
        _check_section("data_types", self.data_types or {}, DATA_TYPES_KEYS)
        _check_fp16_section(self.fp16 or {}, self.bf16 or {})
        if self.gradient_predivide_factor <= 0:
            raise ConfigError(f"'gradient_predivide_factor' must be > 0, got {self.gradient_predivide_factor}")
        _check_deepspeed_combinations(self)
        if self.fp32_allreduce and self.communication_data_type not in (None, "fp32"):
            raise ConfigError(f"'fp32_allreduce' asks for fp32 gradient all-reduces but 'communication_data_type' is "
                              f"{self.communication_data_type}; set one of them")


CPU_STATE_OPTIMIZERS = ("cpu_adam", "cpu_torch_adam")
_DTYPE_OF_PRECISION = {"fp32": "fp32", "fp16": "fp16", "bfloat16": "bf16"}


def zero_offloads_optimizer(zero: dict) -> bool:
    offload = zero.get("offload_optimizer") or {}
    return bool(zero.get("cpu_offload")) or offload.get("device") in ("cpu", "nvme")


def _check_deepspeed_combinations(o: OptimConfig) -> None:
    """Combinations DeepSpeed 0.19 refuses when the engine starts, reported with the keys to change."""
    kind = o.optimizer["type"].lower()
    if zero_offloads_optimizer(o.zero_optimization) and kind not in CPU_STATE_OPTIMIZERS:
        raise ConfigError(f"'zero_optimization' offloads the optimizer to the CPU, where DeepSpeed runs only CPU "
                          f"optimizers: set optimizer type cpu_adam or cpu_torch_adam (got {kind})")
    accum = (o.data_types or {}).get("grad_accum_dtype")
    precision = o.precision or sections_precision(o.fp16 or {}, o.bf16 or {}) or "fp32"
    if accum is not None and accum != _DTYPE_OF_PRECISION[precision] and o.zero_stage == 0:
        raise ConfigError(f"'data_types.grad_accum_dtype' {accum} differs from the training precision ({precision}); "
                          "DeepSpeed accumulates gradients in another dtype than the model's only with ZeRO "
                          "(zero_optimization.stage >= 1)")


def sections_precision(fp16: dict, bf16: dict) -> str | None:
    """The precision the fp16 / bf16 sections turn on (None: neither). fp16 with type bfloat16 is DeeperSpeed's
    (gpt-neox's DeepSpeed fork) spelling of bf16 training, as in Pythia's configs."""
    fp16_on = bool(fp16.get("enabled", False))
    bf16_on = bool(bf16.get("enabled", False))
    if fp16_on and bf16_on:
        raise ConfigError("'fp16.enabled' and 'bf16.enabled' are both true; enable one")
    if fp16_on:
        return "bfloat16" if fp16.get("type") == "bfloat16" else "fp16"
    return "bfloat16" if bf16_on else None


def _check_fp16_section(fp16: dict, bf16: dict) -> None:
    """The fp16 section's own rules; precision vs the sections is checked after derive (validate.py)."""
    sections_precision(fp16, bf16)
    if fp16.get("dynamic_loss_scale") is False and not fp16.get("loss_scale"):
        raise ConfigError("'dynamic_loss_scale' is false, which needs a static 'loss_scale' > 0")
    if fp16.get("dynamic_loss_scale") and fp16.get("loss_scale"):
        raise ConfigError(f"'dynamic_loss_scale' is true but 'loss_scale' is {fp16['loss_scale']} (a static scale); "
                          "drop one")
    window = fp16.get("loss_scale_window")
    if window is not None and (window != int(window) or window < 1):
        raise ConfigError(f"'fp16.loss_scale_window' must be a whole number >= 1, got {window}")
    if fp16.get("loss_scale") is not None and fp16["loss_scale"] < 0:
        raise ConfigError(f"'fp16.loss_scale' must be >= 0 (0: dynamic), got {fp16['loss_scale']}")


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
