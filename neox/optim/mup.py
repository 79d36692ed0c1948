"""muP's per-parameter learning rates as param groups (what mup.MuAdam / mup.MuSGD do inside their optimizers)."""
from __future__ import annotations

from typing import Any, Mapping

from neox.model.mup import ParamWidth
from neox.optim.errors import OptimizerError


def mup_param_groups(groups: list[dict[str, Any]], widths: Mapping[int, ParamWidth], lr: float,
                     sgd: bool) -> list[dict[str, Any]]:
    """muP's learning rates per parameter, as mup.MuAdam / mup.MuSGD set them: each group is split by how its
    parameters' lr scales with width. `lr_scale` multiplies the scheduled lr (set_lr); weight decay is divided by
    it, so lr x weight_decay stays the same.

    Adam-like: matrix-like (two width dims: hidden weights) lr / width_mult; vector-like (embedding, head, norms,
    biases) unchanged. SGD: vector-like lr x width_mult, matrix-like lr / (fan-in mult / fan-out mult)."""
    out = []
    for group in groups:
        split: dict[float, dict[str, Any]] = {}
        for param in group["params"]:
            if id(param) not in widths:
                raise OptimizerError(f"muP: a parameter of shape {tuple(param.shape)} has no base shape")
            scale = _mup_lr_scale(widths[id(param)], sgd)
            if scale not in split:
                split[scale] = {**{k: v for k, v in group.items() if k != "params"}, "params": [],
                                "lr_scale": scale, "lr": lr * scale,
                                "weight_decay": group["weight_decay"] / scale}
            split[scale]["params"].append(param)
        out.extend(split.values())
    return out


def _mup_lr_scale(width: ParamWidth, sgd: bool) -> float:
    if sgd:
        if width.ninf == 1:
            return width.width_mult
        return 1.0 / width.fanin_fanout_ratio if width.ninf == 2 else 1.0
    return 1.0 / width.width_mult if width.ninf == 2 else 1.0
