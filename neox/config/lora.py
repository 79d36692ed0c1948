"""The `lora` key (neox's own; gpt-neox has no LoRA): which linear layers get low-rank adapters, and their size.

    lora: {r: 8, alpha: 16, dropout: 0.05, target_modules: [query_key_value, dense]}

Each targeted linear computes y = x W^T + b + dropout(x) A^T B^T * alpha / r (neox/model/lora.py) with W and b
frozen. target_modules names our block's linears (query_key_value, dense, linear1, gate, linear2) or their
Hugging Face / PEFT names for the three exported families: GPT-NeoX (query_key_value, dense, dense_h_to_4h,
dense_4h_to_h), Llama (q_proj + k_proj + v_proj, o_proj, gate_proj, up_proj, down_proj), GPT-2 (c_attn, c_fc,
c_proj: both projections named so), or PEFT's `all-linear`. Our attention projects q, k and v with one fused
matrix, so it takes one adapter: q_proj, k_proj and v_proj are named together or not at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from neox.config.errors import ConfigError

# Our block's linears, in model order (attention, then MLP), as module paths inside a block.
MODULE_PATHS = {
    "query_key_value": "attention.query_key_value",
    "dense": "attention.dense",
    "linear1": "mlp.linear1",
    "gate": "mlp.gate",
    "linear2": "mlp.linear2",
}
TARGETS = tuple(MODULE_PATHS)
_ALIASES: dict[str, tuple[str, ...]] = {
    **{name: (name,) for name in TARGETS},
    **{path: (name,) for name, path in MODULE_PATHS.items()},
    # Hugging Face / PEFT module names
    "dense_h_to_4h": ("linear1",), "dense_4h_to_h": ("linear2",),
    "o_proj": ("dense",), "gate_proj": ("gate",), "up_proj": ("linear1",), "down_proj": ("linear2",),
    "c_attn": ("query_key_value",), "c_fc": ("linear1",), "c_proj": ("dense", "linear2"),
    "attn.c_proj": ("dense",), "mlp.c_proj": ("linear2",),
    "all-linear": TARGETS,
}
_QKV = ("q_proj", "k_proj", "v_proj")
_HF_NAMES = ("dense_h_to_4h", "dense_4h_to_h", "q_proj+k_proj+v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
             "c_attn", "c_fc", "c_proj")
DEFAULTS = {"r": 8, "alpha": 8.0, "dropout": 0.0, "target_modules": ["query_key_value"]}  # PEFT's r, alpha, dropout


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]  # ours, in MODULE_PATHS order

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _number(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"'lora.{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def resolve_targets(names: Any, gated_mlp: bool | None = None) -> tuple[str, ...]:
    """Our module names for a target_modules list (ours or HF/PEFT's); gated_mlp False drops/refuses 'gate'."""
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"'lora.target_modules' must be a non-empty list of module names, got {names!r}")
    qkv = [n for n in names if n in _QKV]
    if qkv and sorted(qkv) != sorted(_QKV):
        raise ConfigError(f"'lora.target_modules' names {qkv}: neox projects q, k and v with one fused matrix "
                          "(query_key_value), which takes one adapter; list all of q_proj, k_proj, v_proj (or "
                          "query_key_value), or none of them")
    chosen: set[str] = {"query_key_value"} if qkv else set()
    for name in names:
        if name in _QKV:
            continue
        if name not in _ALIASES:
            raise ConfigError(f"'lora.target_modules' entry {name!r} is not a linear layer of this model; choose "
                              f"from {', '.join(TARGETS)}, their Hugging Face names ({', '.join(_HF_NAMES)}) or "
                              "all-linear")
        chosen.update(_ALIASES[name])
    if gated_mlp is False and "gate" in chosen:
        if "all-linear" in names:
            chosen.discard("gate")
        else:
            raise ConfigError("'lora.target_modules' names the MLP gate (gate / gate_proj), but the activation is not "
                              "gated (swiglu, geglu, ...): the model has no gate projection")
    return tuple(t for t in TARGETS if t in chosen)


def lora_settings(raw: dict | None, gated_mlp: bool | None = None) -> LoraSettings | None:
    """The validated settings of a `lora` value (None: LoRA off). gated_mlp None skips the gate's existence check
    (done again with the model config by neox/config/validate.py)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"'lora' must be a mapping {{r, alpha, dropout, target_modules}}, got {raw!r}")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        hint = " (PEFT's lora_alpha / lora_dropout are 'alpha' / 'dropout' here)" if any(
            k.startswith("lora_") for k in unknown) else ""
        raise ConfigError(f"'lora' has unknown keys {unknown}{hint}; allowed: {', '.join(DEFAULTS)}")
    value = {**DEFAULTS, **raw}
    r = _number("r", value["r"], int)
    alpha = _number("alpha", value["alpha"], float)
    dropout = _number("dropout", value["dropout"], float)
    if r < 1:
        raise ConfigError(f"'lora.r' (the adapters' rank) must be >= 1, got {r}")
    if alpha <= 0:
        raise ConfigError(f"'lora.alpha' must be > 0 (the adapters' output is scaled by alpha / r), got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"'lora.dropout' must be in [0, 1), got {dropout}")
    return LoraSettings(r, alpha, dropout, resolve_targets(value["target_modules"], gated_mlp))


def check_lora_combinations(cfg) -> None:
    """Rules between `lora` and the other groups (cfg: the whole NeoXConfig)."""
    if cfg.train.lora is None:
        return
    lora_settings(cfg.train.lora, cfg.model.gated_mlp)
    if cfg.mup.use_mup:
        raise ConfigError("'lora' with 'use_mup': muP's per-parameter learning rates and init scales are defined for "
                          "the model's own weights, not for adapters; turn one of them off")
