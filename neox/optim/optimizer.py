"""The optimizer and its parameter groups.

Weight decay applies to matrices only: biases and norm gains/shifts (every 1-D parameter) are excluded, as in
gpt-neox and Megatron. The types are gpt-neox's (optimizer.type, any case), each built as gpt-neox builds it,
Class(param_groups, weight_decay=weight_decay, **params):

- adam (and neox's alias adamw): gpt-neox runs apex / DeepSpeed FusedAdam, whose default adam_w_mode decouples the
  weight decay: here torch AdamW, or torch Adam (L2 decay) for adam_w_mode: false, and UncorrectedAdam for
  bias_correction: false. torch's fused kernel is used on CUDA and on the CPU (one pass over the parameters and
  moments: 0.2-0.4 s vs 1.0 s per step for the foreach/for-loop versions at 70M parameters on 2 cores, same results
  to float rounding). With use_mup it is torch Adam (L2 decay), the optimizer mup's MuAdam wraps; with
  use_bnb_optimizer, bitsandbytes' Adam8bit.
- cpu_adam: DeepSpeedCPUAdam (DeepSpeed builds its C++ op on first use: about 40 s once, then cached);
  cpu_torch_adam: torch Adam (L2 decay). Both keep their state on the CPU, so on a GPU they need ZeRO-Offload.
- lion, sm3, madgrad_wd: neox.optim.rules; sgd: torch SGD (L2 decay) with muP's per-parameter scaling,
  gpt-neox's MuSGD, so only with use_mup.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from neox.config.optim import OptimConfig
from neox.config.optimizer_params import OPTIMIZER_PARAMS_BY_TYPE
from neox.model.mup import ParamWidth
from neox.optim.errors import OptimizerError
from neox.optim.mup import mup_param_groups
from neox.optim.rules import SM3, Lion, MadgradWD, UncorrectedAdam

OPTIMIZER_TYPES = tuple(OPTIMIZER_PARAMS_BY_TYPE)


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for _, param in named_params:
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return split_expert_groups([g for g in groups if g["params"]])


def split_expert_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Expert-parallel parameters (marked as DeepSpeed's MoE parameters: allreduce False, group_name) in groups of
    their own, {"moe": True, "name": group_name} and the rest of their group's settings: DeepSpeed's ZeRO 1/2
    optimizers partition such a group over its expert-data-parallel ranks. Without such parameters: groups as
    they are."""
    out = []
    for group in groups:
        experts: dict[str, list] = {}
        shared = []
        for param in group["params"]:
            if getattr(param, "allreduce", True) is False:
                experts.setdefault(param.group_name, []).append(param)
            else:
                shared.append(param)
        if shared:
            out.append({**group, "params": shared})
        out += [{**group, "params": params, "moe": True, "name": name} for name, params in experts.items()]
    return out


def configured_optimizer(module: torch.nn.Module, optim: OptimConfig, device_type: str,
                         mup_widths: Mapping[int, ParamWidth] | None) -> torch.optim.Optimizer:
    """The optimizer the config's optimizer / weight_decay / use_bnb_optimizer keys describe, over module's
    parameters: what every engine builds (mup_widths: neox.model.mup.widths_by_param of the model, None off muP)."""
    return build_optimizer(module, optim.optimizer["type"], optim.optimizer["params"], optim.weight_decay,
                           device_type, mup_widths=mup_widths, use_bnb_optimizer=optim.use_bnb_optimizer)


def build_optimizer(model: torch.nn.Module, optimizer_type: str, params: dict[str, Any], weight_decay: float,
                    device_type: str, *, mup_widths: Mapping[int, ParamWidth] | None = None,
                    use_bnb_optimizer: bool = False
                    ) -> torch.optim.Optimizer:
    """mup_widths (id(parameter) -> its muP width, neox.model.mup.widths_by_param) is given when use_mup is on."""
    kind = optimizer_type.lower()
    use_mup = mup_widths is not None
    if kind not in OPTIMIZER_PARAMS_BY_TYPE or kind == "onebitadam":
        raise OptimizerError(f"optimizer.type {optimizer_type!r} is not one of: "
                             f"{', '.join(t for t in OPTIMIZER_TYPES if t != 'onebitadam')}")
    options = dict(params)
    if "lr" not in options:
        raise OptimizerError("optimizer.params.lr must be set (e.g. optimizer: {type: Adam, params: {lr: 6.0e-4}})")
    _reject_unknown(options, set(OPTIMIZER_PARAMS_BY_TYPE[kind]), optimizer_type)
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    groups = param_groups(model.named_parameters(), weight_decay)
    if use_mup:
        groups = mup_param_groups(groups, mup_widths, float(options["lr"]), sgd=kind == "sgd")
    if use_bnb_optimizer and kind not in ("adam", "adamw"):
        raise OptimizerError(f"use_bnb_optimizer needs optimizer type adam, not {optimizer_type}")
    if kind in ("adam", "adamw"):
        return _adam(groups, options, weight_decay, device_type, use_mup, use_bnb_optimizer)
    if kind == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, weight_decay=weight_decay, **options)
    if kind == "cpu_torch_adam":
        return torch.optim.Adam(groups, weight_decay=weight_decay, **options)
    if kind == "lion":
        return Lion(groups, weight_decay=weight_decay, **options)
    if kind == "sm3":
        return SM3(groups, **options)  # SM3 has no weight decay, and gpt-neox gives it none
    if kind == "madgrad_wd":
        return MadgradWD(groups, weight_decay=weight_decay, **options)
    # sgd
    if not use_mup:
        raise OptimizerError("optimizer.type sgd is gpt-neox's MuSGD (mup's SGD with muP scaling), so it needs "
                             "use_mup: true; for muP-free training choose adam or lion")
    return torch.optim.SGD(groups, weight_decay=weight_decay, **options)


def _adam(groups: list[dict[str, Any]], options: dict[str, Any], weight_decay: float, device_type: str,
          use_mup: bool, use_bnb_optimizer: bool) -> torch.optim.Optimizer:
    bias_correction = options.pop("bias_correction", True)
    adam_w_mode = options.pop("adam_w_mode", True)
    if use_mup:
        # mup's MuAdam wraps torch Adam, whose weight decay is L2: gpt-neox's adam under use_mup
        if not (bias_correction and adam_w_mode):
            raise OptimizerError("with use_mup, optimizer type adam is mup's MuAdam over torch Adam, which has no "
                                 "bias_correction / adam_w_mode options; remove them")
        return torch.optim.Adam(groups, weight_decay=weight_decay, **options)
    if use_bnb_optimizer:
        if device_type != "cuda":
            raise OptimizerError("use_bnb_optimizer: bitsandbytes' 8-bit Adam runs on CUDA only")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise OptimizerError("use_bnb_optimizer needs the bitsandbytes package (pip install bitsandbytes)"
                                 ) from None
        return bnb.optim.Adam8bit(groups, weight_decay=weight_decay, **options)
    if not bias_correction:
        if options.get("amsgrad"):
            raise OptimizerError("optimizer.params amsgrad cannot be combined with bias_correction: false")
        options.pop("amsgrad", None)
        return UncorrectedAdam(groups, weight_decay=weight_decay, adam_w_mode=adam_w_mode, **options)
    fused = device_type in ("cuda", "cpu")
    cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    return cls(groups, weight_decay=weight_decay, fused=fused, foreach=None if fused else True, **options)


def _reject_unknown(options: dict[str, Any], allowed: set[str], optimizer_type: str) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise OptimizerError(f"optimizer.params {unknown} are not options of {optimizer_type}; "
                             f"allowed: {sorted(allowed)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # lr_scale: muP's per-parameter factor (mup_param_groups)
