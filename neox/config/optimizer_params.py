"""gpt-neox's optimizer types and the params each accepts (`optimizer: {type: ..., params: {...}}`).

The type is case-insensitive, as in gpt-neox. gpt-neox builds each optimizer as Class(param_groups,
weight_decay=<top-level weight_decay>, **params), so `params` are that class's keyword arguments; here they are
checked up front, with an error naming the key for anything the class would not take.
"""
from __future__ import annotations

import difflib
from typing import Any

from neox.config.errors import ConfigError
from neox.config.fields import TypeMismatch, check_type

_ADAM_PARAMS: dict[str, Any] = {"lr": float, "betas": list[float], "eps": float, "bias_correction": bool,
                                "adam_w_mode": bool, "amsgrad": bool}

# type (lower case) -> params it takes. lr is the peak learning rate in all of them.
OPTIMIZER_PARAMS_BY_TYPE: dict[str, dict[str, Any]] = {
    # gpt-neox: apex / DeepSpeed FusedAdam (decoupled weight decay unless adam_w_mode: false); here torch AdamW
    # (torch Adam for adam_w_mode: false) or, for bias_correction: false, our UncorrectedAdam.
    "adam": _ADAM_PARAMS,
    "adamw": _ADAM_PARAMS,  # neox's own name for the same optimizer
    "cpu_adam": {"lr": float, "betas": list[float], "eps": float, "bias_correction": bool, "adamw_mode": bool,
                 "fp32_optimizer_states": bool},  # DeepSpeedCPUAdam
    "cpu_torch_adam": {"lr": float, "betas": list[float], "eps": float, "amsgrad": bool},  # torch.optim.Adam
    "onebitadam": {},
    "sm3": {"lr": float, "momentum": float, "beta": float, "eps": float},
    "madgrad_wd": {"lr": float, "momentum": float, "eps": float},
    "sgd": {"lr": float, "momentum": float, "dampening": float, "nesterov": bool},  # mup's MuSGD
    "lion": {"lr": float, "betas": list[float]},
}
OPTIMIZER_TYPES = tuple(OPTIMIZER_PARAMS_BY_TYPE)

# Keys gpt-neox users put in params that belong elsewhere.
_MISPLACED = {
    "weight_decay": "weight decay is the top-level 'weight_decay' (gpt-neox passes it to the optimizer itself, "
                    "so a second one in params is an error there too)",
    "max_grad_norm": "gradient clipping is the top-level 'gradient_clipping'",
}


def check_optimizer(section: dict, *, use_bnb_optimizer: bool = False) -> None:
    """Validate `optimizer` in place (types parsed, e.g. '6e-4' -> float)."""
    for key in section:
        if key not in ("type", "params"):
            raise ConfigError(f"unknown key 'optimizer.{key}'; 'optimizer' has 'type' and 'params'")
    if "type" not in section or "params" not in section:
        raise ConfigError("'optimizer' needs both 'type' and 'params' (e.g. {type: Adam, params: {lr: 6.0e-4}})")
    kind = section["type"]
    if not isinstance(kind, str) or kind.lower() not in OPTIMIZER_PARAMS_BY_TYPE:
        raise ConfigError(f"'optimizer.type' is {kind!r}; choose one of {', '.join(OPTIMIZER_TYPES)} "
                          "(any letter case)")
    kind = kind.lower()
    if kind == "onebitadam":
        raise ConfigError(
            "'optimizer.type' onebitadam is DeepSpeed's 1-bit Adam, which DeepSpeed removed before 0.19, the version "
            "neox trains with (it also needed NCCL and cupy on GPUs); choose adam, or lion for a one-moment optimizer"
        )
    params = section["params"]
    if not isinstance(params, dict):
        raise ConfigError(f"'optimizer.params' must be a mapping, got {type(params).__name__}")
    known = OPTIMIZER_PARAMS_BY_TYPE[kind]
    for key in list(params):
        if key in _MISPLACED and key not in known:
            raise ConfigError(f"'optimizer.params.{key}' is not an option of {kind}: {_MISPLACED[key]}")
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean 'optimizer.params.{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key 'optimizer.params.{key}' for optimizer type {kind} "
                              f"(it takes {', '.join(known)}){hint}")
        try:
            params[key] = check_type(params[key], known[key])
        except TypeMismatch as err:
            raise ConfigError(f"'optimizer.params.{key}' {err}") from None
    _check_values(kind, params)
    if use_bnb_optimizer and kind not in ("adam", "adamw"):
        raise ConfigError(f"'use_bnb_optimizer' swaps in bitsandbytes' 8-bit Adam, so it needs optimizer type adam "
                          f"(got {kind})")


def _check_values(kind: str, params: dict) -> None:
    if "lr" not in params:
        raise ConfigError("'optimizer.params.lr' must be set (the peak learning rate)")
    if params["lr"] <= 0:
        raise ConfigError(f"'optimizer.params.lr' must be positive, got {params['lr']}")
    betas = params.get("betas")
    if betas is not None and (len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas)):
        raise ConfigError(f"'optimizer.params.betas' must be two numbers in [0, 1), got {betas}")
    if params.get("eps", 1.0) <= 0:
        raise ConfigError(f"'optimizer.params.eps' must be positive, got {params['eps']}")
    for key in ("momentum", "beta", "dampening"):
        if key in params and not 0.0 <= params[key] < 1.0:
            raise ConfigError(f"'optimizer.params.{key}' must be in [0, 1), got {params[key]}")
    if kind in ("adam", "adamw") and params.get("amsgrad") and params.get("bias_correction") is False:
        raise ConfigError("'optimizer.params.amsgrad' and 'bias_correction: false' cannot be combined")
    if kind == "sgd" and params.get("nesterov") and (params.get("momentum", 0.0) <= 0
                                                     or params.get("dampening", 0.0) != 0):
        raise ConfigError("'optimizer.params.nesterov' needs momentum > 0 and dampening 0")
