"""Merge YAML files and command-line overrides into one typed, validated, derived NeoXConfig.

`deepy train a.yml b.yml --key value`: files merge in order (a later file wins, nested dicts merge key by
key), `-` and `_` are the same, and `--key value` / `--a.b.c value` (values read as YAML) win over all.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from neox.config.derive import derive
from neox.config.errors import ConfigError
from neox.config.fields import TypeMismatch, check_type, field_default, group_fields
from neox.config.gpt_neox_keys import non_field_keys
from neox.config.gpt_neox_translate import (
    Claim,
    settle_derived_claims,
    settle_merged_claims,
    summarise_ignored_keys,
    summarise_kernel_keys,
    translate_layer,
)
from neox.config.optimizer_params import OPTIMIZER_PARAMS_BY_TYPE
from neox.config.neox_config import COMMAND_LINE, DEFAULT, DERIVED_KEYS, GROUPS, KEY_GROUP, NeoXConfig
from neox.config.validate import annotate, check_combinations, validate_groups
from neox.config.yaml_file import normalise_key, read_config_file

# gpt-neox keys that are not fields of ours: aliases, launch-time values, kernel switches, missing features.
UPSTREAM_ONLY_KEYS = frozenset(non_field_keys())


def load_config(
    files: Sequence[str | Path],
    overrides: Sequence[str] = (),
    *,
    config_dir: str | Path | None = None,
    vocab_size: int | None = None,
    local_gpus: int | None = None,
) -> NeoXConfig:
    """The resolved config of `deepy CMD [-d config_dir] files... overrides...`.

    vocab_size is the tokenizer's (unpadded) size; without it padded_vocab_size stays as given (or None).
    local_gpus is the number of GPUs on this machine (None: ask torch), used when num_gpus is unset.
    """
    paths = resolve_paths(files, config_dir)
    # Dict-valued defaults (optimizer, zero_optimization) are the bottom layer, so that a file or
    # `--optimizer.params.lr` changes one entry and keeps the rest.
    layers: list[tuple[str, dict[str, Any], dict[str, int]]] = [(DEFAULT, dict_defaults(), {})]
    for path in paths:
        values, lines = read_config_file(path)
        layers.append((str(path), values, lines))
    if overrides:
        layers.append((COMMAND_LINE, parse_overrides(overrides), {}))
    merged = merge_layers(layers)
    cfg = build_config(merged.values, merged.provenance, [str(p) for p in paths])
    try:
        validate_groups(cfg)
        derive(cfg, vocab_size=vocab_size, local_gpus=local_gpus)
        check_combinations(cfg)
        settle_derived_claims(cfg, merged.claims)
    except ConfigError as err:
        raise annotate(err, cfg) from None
    summarise_kernel_keys(merged.kernel_keys)
    summarise_ignored_keys(merged.ignored_keys)
    return cfg


def dict_defaults() -> dict[str, Any]:
    out = {}
    for key, group in KEY_GROUP.items():
        f, _ = group_fields(GROUPS[group])[key]
        default = field_default(f)
        if isinstance(default, dict):
            out[key] = default
    return out


def resolve_paths(files: Sequence[str | Path], config_dir: str | Path | None) -> list[Path]:
    if not files:
        raise ConfigError("no config file given: pass at least one YAML file (e.g. configs/tiny.yml)")
    paths = []
    for name in files:
        path = Path(name)
        if config_dir is not None and not path.is_absolute():
            path = Path(config_dir) / path
        if not path.is_file() and path.suffix not in (".yml", ".yaml", ".json") and path.with_name(path.name + ".yml").is_file():
            path = path.with_name(path.name + ".yml")  # gpt-neox's deepy takes `125M` for `125M.yml`
        if not path.is_file():
            where = f" in config folder {config_dir}" if config_dir is not None else ""
            raise ConfigError(f"config file {path} not found{where}")
        paths.append(path)
    return paths


def parse_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """['--optimizer.params.lr', '1e-3', '--seed=7'] -> {'optimizer': {'params': {'lr': '1e-3'}}, 'seed': 7}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"command line: expected '--key value', got {token!r}")
        if "=" in token:
            key, text = token[2:].split("=", 1)
            i += 1
        else:
            key = token[2:]
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and len(argv[i + 1]) > 2):
                raise ConfigError(f"command line: '--{key}' needs a value (e.g. --{key} true)")
            text = argv[i + 1]
            i += 2
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"command line: the value of '--{key}' ({text!r}) is not valid YAML") from None
        parts = [normalise_key(p) for p in key.split(".")]
        if not all(parts):
            raise ConfigError(f"command line: malformed key '--{key}'")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = _normalise_value(value)
    return out


def _normalise_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {normalise_key(k): _normalise_value(v) for k, v in value.items()}
    return value


@dataclass
class Merged:
    values: dict[str, Any]
    provenance: dict[str, str]
    claims: list[Claim] = field(default_factory=list)  # gpt-neox keys settled after the merge / the derivation
    kernel_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)


def merge_layers(layers: Sequence[tuple[str, dict[str, Any], dict[str, int]]]) -> Merged:
    """Merge (label, values, lines) layers in order; the values, a dotted-key -> origin map and the gpt-neox keys
    (neox/config/gpt_neox_keys.py) that are settled later."""
    merged: dict[str, Any] = {}
    provenance: dict[str, str] = {}
    set_at: dict[str, int] = {}
    result = Merged(merged, provenance)
    for index, (label, values, lines) in enumerate(layers):
        for key in values:
            _check_known(key, label, lines)
        translated = translate_layer(values, label, lines, index)
        result.claims += translated.claims
        result.kernel_keys += translated.kernel_keys
        result.ignored_keys += translated.ignored_keys
        _forget_params_of_another_optimizer(merged, translated.values, provenance)
        _merge(merged, translated.values, "", label, lines, provenance)
        for dotted, origin in translated.origins.items():
            for stale in [k for k in provenance if k == dotted or k.startswith(dotted + ".")]:
                del provenance[stale]
            provenance[dotted] = origin
        for key in translated.values:
            set_at[key] = index
    settle_merged_claims(merged, result.claims, set_at, provenance)
    return result


def _forget_params_of_another_optimizer(merged: dict[str, Any], layer: dict[str, Any],
                                        provenance: dict[str, str]) -> None:
    """A layer that switches optimizer.type starts its params afresh: Adam's betas/eps (the defaults, or an earlier
    file's) mean nothing to lion or sm3, and would be refused as unknown params of that optimizer."""
    new_type = (layer.get("optimizer") or {}).get("type") if isinstance(layer.get("optimizer"), dict) else None
    old = merged.get("optimizer")
    if not isinstance(new_type, str) or not isinstance(old, dict) or not isinstance(old.get("type"), str):
        return
    if not isinstance(old.get("params"), dict):
        return
    schemas = OPTIMIZER_PARAMS_BY_TYPE
    if new_type.lower() == old["type"].lower() or schemas.get(new_type.lower(), 1) is schemas.get(old["type"].lower()):
        return  # the same optimizer (adam / adamw): the params mean the same
    old["params"] = {}
    for stale in [k for k in provenance if k.startswith("optimizer.params.")]:
        del provenance[stale]


def _check_known(key: Any, label: str, lines: dict[str, int]) -> None:
    where = f"{label}:{lines[key]}" if key in lines else label
    if key in KEY_GROUP or key in UPSTREAM_ONLY_KEYS:
        return
    if key in DERIVED_KEYS:
        raise ConfigError(
            f"{where}: '{key}' is derived and cannot be set; set num_gpus, num_nodes, hostfile, "
            "model_parallel_size and pipe_parallel_size instead"
        )
    close = difflib.get_close_matches(str(key), [*KEY_GROUP, *UPSTREAM_ONLY_KEYS], n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; see `python -m neox.config.reference` for every key"
    raise ConfigError(f"{where}: unknown config key '{key}'{hint}")


def _origin(label: str, lines: dict[str, int], dotted: str) -> str:
    return f"{label}:{lines[dotted]}" if dotted in lines else label


def _merge(
    target: dict[str, Any], source: dict[str, Any], prefix: str, label: str, lines: dict[str, int],
    provenance: dict[str, str],
) -> None:
    for key, value in source.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            provenance.pop(dotted, None)  # an empty dict recorded itself; its keys now speak for it
            _merge(target[key], value, dotted + ".", label, lines, provenance)
            continue
        for stale in [k for k in provenance if k == dotted or k.startswith(dotted + ".")]:
            del provenance[stale]
        target[key] = copy.deepcopy(value)
        _record(value, dotted, label, lines, provenance)


def _record(value: Any, dotted: str, label: str, lines: dict[str, int], provenance: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            _record(sub, f"{dotted}.{key}", label, lines, provenance)
    else:
        provenance[dotted] = _origin(label, lines, dotted)


def build_config(merged: dict[str, Any], provenance: dict[str, str], sources: list[str]) -> NeoXConfig:
    """Type-check every merged value against its group's field and construct the groups."""
    kwargs: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    for key, value in merged.items():
        group = KEY_GROUP[key]
        _, hint = group_fields(GROUPS[group])[key]
        try:
            kwargs[group][key] = check_type(value, hint)
        except TypeMismatch as err:
            origin = provenance.get(key) or ", ".join(
                sorted({v for k, v in provenance.items() if k.startswith(key + ".")})
            )
            raise ConfigError(f"{origin}: '{key}' {err}") from None
    full_provenance = dict(provenance)
    for key in KEY_GROUP:
        if key not in merged:
            full_provenance[key] = DEFAULT
    groups = {name: cls(**kwargs[name]) for name, cls in GROUPS.items()}
    return NeoXConfig(**groups, provenance=full_provenance, sources=sources)
