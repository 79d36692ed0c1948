"""Apply neox/config/gpt_neox_keys.py to a config layer: gpt-neox-only keys become ours, or are checked and dropped.

A layer is one YAML file or the command line. Aliases are written into the layer itself, so that the usual
merge order holds (a later file's `gas` overrides an earlier file's gradient_accumulation_steps). What can only be
judged on the merged or derived config (a legacy key that needs the learning rate, `world_size` against the
derived one) is returned as a Claim and settled by load.py after the merge / the derivation.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

from neox.config.errors import ConfigError
from neox.config.fields import TypeMismatch, check_type
from neox.config.gpt_neox_keys import (
    ALIASES,
    ATTENTION_TYPE_FEATURES,
    KERNEL_KEYS,
    LEGACY_KEYS,
    MISSING_KEYS,
    MISSING_VALUES,
    RUNTIME_KEYS,
)

_log = logging.getLogger("neox.config")
_summarised: set[tuple[str, ...]] = set()  # deepy resolves a config more than once: one summary per process


@dataclass
class Claim:
    """A gpt-neox key settled after the merge: its value, where it was set and the layer's position."""

    key: str
    value: Any
    where: str
    layer: int


@dataclass
class Translation:
    values: dict[str, Any]
    # dotted key of ours -> origin label, for values an alias wrote ("file:line (as 'gas')")
    origins: dict[str, str]
    claims: list[Claim]
    kernel_keys: list[str]
    ignored_keys: list[str]  # gpt-neox keys with a value that has no effect (here, as in gpt-neox)


def where_of(label: str, lines: dict[str, int], key: str) -> str:
    return f"{label}:{lines[key]}" if key in lines else label


def missing_feature_error(where: str, key: str, value: Any, feature: str, default: Any) -> ConfigError:
    shown = f"{key}: {value!r}" if not isinstance(value, (dict, list)) else f"{key}"
    return ConfigError(
        f"{where}: '{shown}' asks for {feature}, which neox does not have. Remove '{key}' (or set it to gpt-neox's "
        f"default, {default!r}) to run the rest of this config here"
    )


def translate_layer(values: dict[str, Any], label: str, lines: dict[str, int], layer: int) -> Translation:
    out: dict[str, Any] = {}
    origins: dict[str, str] = {}
    claims: list[Claim] = []
    kernel: list[str] = []
    ignored: list[str] = []
    alias_items = []
    for key, value in values.items():
        where = where_of(label, lines, key)
        if key in KERNEL_KEYS:
            _typed(key, value, KERNEL_KEYS[key].hint, where)
            kernel.append(key)
        elif key in MISSING_KEYS:
            spec = MISSING_KEYS[key]
            value = _typed(key, value, spec.hint, where)
            if not _is_default(value, spec.default):
                raise missing_feature_error(where, key, value, spec.feature, spec.default)
        elif key in RUNTIME_KEYS:
            spec = RUNTIME_KEYS[key]
            value = _typed(key, value, spec.hint, where)
            if spec.action == "true_only" and value is not True:
                raise ConfigError(f"{where}: '{key}' is {value!r}, but every neox run trains through DeepSpeed (as in "
                                  "gpt-neox, which refuses false too): remove the key")
            if spec.action != "true_only" and value is not None:
                claims.append(Claim(key, value, where, layer))
            if spec.action == "drop" and not _is_default(value, spec.default):
                ignored.append(key)
        elif key in LEGACY_KEYS:
            claims.append(Claim(key, value, where, layer))
        elif key in ALIASES:
            alias_items.append((key, _typed(key, value, ALIASES[key].hint, where), where))
        else:
            out[key] = value
    for key, value, where in alias_items:
        spec = ALIASES[key]
        if value is None:  # gpt-neox's "unset": leaves ours unset too (loss_scale None = dynamic scaling)
            continue
        if spec.scale is not None:
            value = value * spec.scale
        if spec.target == "fp16.loss_scale_window":
            value = _whole(key, value, where)
        path = spec.target.split(".")
        existing = _get_path(out, path)
        if existing is not None and existing != value:
            raise ConfigError(f"{where}: '{key}' ({value!r}) and '{spec.target}' ({existing!r}) are the same setting "
                              f"with different values in one file; keep one")
        _set_path(out, path, value)
        origins[spec.target] = f"{where} (as '{key}')"
    return Translation(out, origins, claims, kernel, ignored)


def summarise_kernel_keys(keys: list[str]) -> None:
    """One line for every GPU-kernel switch the config set, once per process."""
    chosen = tuple(sorted(set(keys)))
    if not chosen or chosen in _summarised:
        return
    _summarised.add(chosen)
    _log.warning("gpt-neox kernel switches accepted, no effect here (neox gets fused kernels from the device; the "
                 "numbers are the same): %s", ", ".join(chosen))


def summarise_ignored_keys(keys: list[str]) -> None:
    """One line for gpt-neox keys set to a value that has no effect (launch-time values, deprecated switches)."""
    chosen = tuple(sorted(set(keys)))
    if not chosen or ("ignored",) + chosen in _summarised:
        return
    _summarised.add(("ignored",) + chosen)
    _log.warning("gpt-neox keys accepted with no effect here, as in gpt-neox (values its launcher sets, or switches "
                 "it ignores itself; see the README's gpt-neox table): %s", ", ".join(chosen))


def settle_merged_claims(merged: dict[str, Any], claims: list[Claim], set_at: dict[str, int],
                         provenance: dict[str, str]) -> None:
    """Legacy keys that need the merged config: written into it unless a later layer set the key itself."""
    for claim in claims:
        if claim.key == "decay_lr_to":
            _number(claim)
            lr = (merged.get("optimizer") or {}).get("params", {}).get("lr")
            if lr is None:
                raise ConfigError(f"{claim.where}: 'decay_lr_to' is a fraction of the peak learning rate, and "
                                  "'optimizer.params.lr' is not set")
            _write_unless_later(merged, "min_lr", float(claim.value) * float(check_type(lr, float)), claim, set_at,
                                provenance)
        elif claim.key == "warmup_iters":
            _number(claim)
            span = merged.get("lr_decay_iters") or merged.get("train_iters")
            if not span:
                raise ConfigError(f"{claim.where}: 'warmup_iters' becomes the fraction 'warmup' of the decay "
                                  "iterations: set 'lr_decay_iters' or 'train_iters'")
            _write_unless_later(merged, "warmup", float(claim.value) / float(span), claim, set_at, provenance)
        elif claim.key == "bias_gelu_fusion":
            claim.value = _typed(claim.key, claim.value, bool, claim.where)
            if claim.value and any(c.key == "onnx_safe" and c.value for c in claims):
                raise ConfigError(f"{claim.where}: 'bias_gelu_fusion' and 'onnx_safe' cannot both be true (as in "
                                  "gpt-neox): the fused kernel's tanh gelu is what onnx_safe avoids")
            if claim.value and merged.get("activation", "gelu") == "gelu":
                _write_unless_later(merged, "activation", "gelu_tanh", claim, set_at, provenance)
    for spec in MISSING_VALUES:
        value = merged.get(spec.key)
        if value in spec.values:
            raise missing_feature_error(provenance.get(spec.key, "config"), spec.key, value, spec.feature,
                                        "another value")
    attention = merged.get("attention_config")
    if isinstance(attention, list):
        for kind in _attention_types(attention):
            if kind in ATTENTION_TYPE_FEATURES:
                raise missing_feature_error(provenance.get("attention_config", "config"), "attention_config", kind,
                                            ATTENTION_TYPE_FEATURES[kind], "[[['global'], num_layers]]")


def settle_derived_claims(cfg, claims: list[Claim]) -> None:
    """gpt-neox's launch-time values that a config file carries: they must agree with what we derive."""
    for claim in claims:
        if claim.key == "world_size" and claim.value != cfg.derived.world_size:
            raise ConfigError(f"{claim.where}: 'world_size' is {claim.value} but this launch has "
                              f"{cfg.derived.world_size} ranks (num_gpus x nodes); remove 'world_size', it is derived")
        elif claim.key == "is_pipe_parallel" and claim.value != (cfg.parallel.pipe_parallel_size >= 1):
            raise ConfigError(f"{claim.where}: 'is_pipe_parallel' is {claim.value} but 'pipe_parallel_size' is "
                              f"{cfg.parallel.pipe_parallel_size}; remove 'is_pipe_parallel', it is derived")
        elif claim.key == "dynamic_loss_scale":
            static = (cfg.optim.fp16 or {}).get("loss_scale", 0)
            if claim.value and static:
                raise ConfigError(f"{claim.where}: 'dynamic_loss_scale' is true but a static loss scale "
                                  f"({static}) is set; remove one")
            if not claim.value and not static:
                raise ConfigError(f"{claim.where}: 'dynamic_loss_scale' is false but no static 'loss_scale' is set "
                                  "(fp16.loss_scale); set one, or remove 'dynamic_loss_scale'")
        elif claim.key == "attention_type":
            _attention_type(cfg, claim)


def _attention_type(cfg, claim: Claim) -> None:
    heads, kv = cfg.model.num_attention_heads, cfg.model.kv_heads
    expected = {"multihead": kv == heads, "groupedquery": kv < heads, "multiquery": kv == 1}
    if claim.value not in expected:
        raise ConfigError(f"{claim.where}: 'attention_type' is {claim.value!r}; the llemma configs use 'multihead', "
                          "'groupedquery' or 'multiquery' (the head layout itself comes from 'num_kv_heads')")
    if not expected[claim.value]:
        raise ConfigError(f"{claim.where}: 'attention_type' {claim.value!r} does not match 'num_kv_heads' = {kv} "
                          f"with {heads} query heads")


def _attention_types(attention: list) -> list[str]:
    kinds = []
    for entry in attention:
        if isinstance(entry, (list, tuple)) and entry and isinstance(entry[0], (list, tuple)):
            kinds += [str(k) for k in entry[0]]
        elif isinstance(entry, str):
            kinds.append(entry)
    return kinds


def _write_unless_later(merged: dict[str, Any], key: str, value: float, claim: Claim, set_at: dict[str, int],
                        provenance: dict[str, str]) -> None:
    if set_at.get(key, -1) > claim.layer:
        return
    merged[key] = value
    provenance[key] = f"{claim.where} (as '{claim.key}')"


def _number(claim: Claim) -> None:
    try:
        claim.value = check_type(claim.value, float)
    except TypeMismatch as err:
        raise ConfigError(f"{claim.where}: '{claim.key}' {err}") from None


def _typed(key: str, value: Any, hint: Any, where: str) -> Any:
    try:
        return check_type(value, hint)
    except TypeMismatch as err:
        raise ConfigError(f"{where}: '{key}' {err}") from None


def _is_default(value: Any, default: Any) -> bool:
    if isinstance(value, dict) and value.get("enabled") is False:
        return True  # a DeepSpeed-style section switched off asks for nothing
    if default is None:
        return value is None or value == {} or value == []
    return value == default


def _whole(key: str, value: float, where: str) -> int:
    if float(value) != int(value):
        raise ConfigError(f"{where}: '{key}' must be a whole number, got {value}")
    return int(value)


def _get_path(values: dict[str, Any], path: list[str]) -> Any:
    node: Any = values
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set_path(values: dict[str, Any], path: list[str], value: Any) -> None:
    node = values
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = copy.deepcopy(value)
