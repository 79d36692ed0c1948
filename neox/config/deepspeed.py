"""The DeepSpeed JSON config, built from a resolved NeoXConfig.

There is no "optimizer" or "scheduler" section: the training loop builds the optimizer (neox/optim/)
and our LR schedule and hands both to deepspeed.initialize. The gpt-neox keys that are DeepSpeed settings go in
under DeepSpeed's own names: fp32_allreduce is DeepSpeed's communication_data_type fp32 (DeepSpeed 0.19 has no
fp32_allreduce), the fp16 / bf16 sections lose the spellings only gpt-neox's configs use (fp16.type, fp16.fp16,
bf16.bf16, min_scale, dynamic_loss_scale), and the pass-through sections (flops_profiler, comms_logger,
tensorboard, wandb, csv_monitor, checkpoint, data_types) are copied when set.
"""
from __future__ import annotations

import copy
from typing import Any

from neox.config.errors import ConfigError
from neox.config.neox_config import NeoXConfig
from neox.config.optim import CPU_STATE_OPTIMIZERS, zero_offloads_optimizer

# Dynamic loss scaling (loss_scale 0) with DeepSpeed's documented defaults, which a user's fp16 section overrides.
FP16_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}
# Sub-keys of our fp16 / bf16 sections that DeepSpeed does not know (it rejects unknown ones).
_FP16_NEOX_ONLY = ("fp16", "type", "min_scale", "dynamic_loss_scale")
_BF16_NEOX_ONLY = ("bf16",)
# Sections copied as they are when set: (group, key).
_PASS_THROUGH = (("log", "flops_profiler"), ("log", "comms_logger"), ("log", "csv_monitor"), ("log", "tensorboard"),
                 ("log", "wandb"), ("train", "checkpoint"), ("optim", "data_types"))
# Optimizer types whose class is on DeepSpeed's list of ZeRO-tested optimizers (torch Adam/AdamW, DeepSpeedCPUAdam).
_ZERO_TESTED = ("adam", "adamw", "cpu_adam", "cpu_torch_adam")


def check_precision_supported(cfg: NeoXConfig, cuda_available: bool) -> None:
    if cfg.optim.precision == "fp16" and not cuda_available:
        raise ConfigError(
            "'precision' fp16 needs CUDA (DeepSpeed's fp16 optimizer and loss scaler run on GPU), and this "
            "machine has none: use precision bfloat16 (bf16: {enabled: true}) or fp32 on CPU"
        )


def check_device_support(cfg: NeoXConfig, cuda_available: bool) -> None:
    """Settings that need (or, with CUDA, exclude) something of this machine, checked before any rank starts."""
    check_precision_supported(cfg, cuda_available)
    o = cfg.optim
    kind = o.optimizer["type"].lower()
    if o.use_bnb_optimizer and not cuda_available:
        raise ConfigError("'use_bnb_optimizer': bitsandbytes' 8-bit Adam runs on CUDA only, and this machine has no "
                          "GPU; set use_bnb_optimizer: false")
    if cuda_available and kind in CPU_STATE_OPTIMIZERS and not zero_offloads_optimizer(o.zero_optimization):
        raise ConfigError(f"'optimizer.type' {kind} keeps its state on the CPU, so with GPUs it needs ZeRO-Offload: "
                          "zero_optimization: {stage: 1|2|3, offload_optimizer: {device: cpu}}")


def deepspeed_config(cfg: NeoXConfig, *, cuda_available: bool | None = None) -> dict[str, Any]:
    """The dict to pass as deepspeed.initialize(config=...). cuda_available None asks torch."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    check_device_support(cfg, cuda_available)
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
        ds["fp16"] = fp16_section(o.fp16 or {})
    elif o.precision == "bfloat16":
        ds["bf16"] = {k: v for k, v in (o.bf16 or {}).items() if k not in _BF16_NEOX_ONLY} | {"enabled": True}
    ds.update(_communication(cfg))
    if cfg.parallel.shards_sequence and cfg.parallel.pipe_parallel_size >= 1:
        # DeepSpeed's pipeline splits a stage's output over the tp ranks to send it, and rebuilds it from every
        # rank's part: right for tp-replicated activations, wrong for sequence shards, which differ per rank (and
        # are already 1/tp). Each rank sends its own shard whole.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if cfg.log.dump_state:
        ds["dump_state"] = True
    for group, key in _PASS_THROUGH:
        value = getattr(getattr(cfg, group), key)
        if value is not None:
            ds[key] = copy.deepcopy(value)
    kind = o.optimizer["type"].lower()
    untested = kind not in _ZERO_TESTED or o.use_bnb_optimizer or o.optimizer["params"].get("bias_correction") is False
    if o.zero_stage > 0 and untested:
        # Lion, SM3, MADGRAD, SGD, UncorrectedAdam, Adam8bit: not on DeepSpeed's list, which only means untested
        # there; gpt-neox runs them under ZeRO too (Lion through DeepSpeed's FusedLion, the same update rule).
        ds["zero_allow_untested_optimizer"] = True
    if kind == "cpu_torch_adam" and zero_offloads_optimizer(o.zero_optimization):
        ds["zero_force_ds_cpu_optimizer"] = False  # torch Adam on the offloaded states is what cpu_torch_adam means
    for key, value in (cfg.launch.deepspeed_extra_args or {}).items():
        if key in ds:
            raise ConfigError(
                f"'deepspeed_extra_args' sets {key!r}, which is built from this config; set the neox key instead"
            )
        ds[key] = copy.deepcopy(value)
    return ds


def fp16_section(fp16: dict) -> dict[str, Any]:
    """DeepSpeed's fp16 section from ours: gpt-neox's loss-scale spellings mapped to DeepSpeed's names."""
    section = {**FP16_DEFAULTS, **{k: v for k, v in fp16.items() if k not in _FP16_NEOX_ONLY}, "enabled": True}
    if "min_scale" in fp16 and "min_loss_scale" not in fp16:
        section["min_loss_scale"] = fp16["min_scale"]
    if section.get("loss_scale") is None or fp16.get("dynamic_loss_scale"):
        section["loss_scale"] = 0  # gpt-neox: loss_scale unset = dynamic loss scaling
    section["loss_scale_window"] = int(section["loss_scale_window"])
    return section


def _communication(cfg: NeoXConfig) -> dict[str, Any]:
    o = cfg.optim
    out: dict[str, Any] = {}
    comm = o.communication_data_type
    if comm is None and (o.fp32_allreduce or (o.fp16 or {}).get("type") == "bfloat16" and o.precision == "bfloat16"):
        # DeeperSpeed all-reduces in fp32 whenever fp16.type is bfloat16, whatever fp32_allreduce says
        comm = "fp32"
    if comm is not None:
        out["communication_data_type"] = comm
    if o.prescale_gradients:
        out["prescale_gradients"] = True
    if o.gradient_predivide_factor != 1.0:
        out["gradient_predivide_factor"] = o.gradient_predivide_factor
    return out
