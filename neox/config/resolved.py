"""The resolved config file: written once by the launcher, the only config the per-rank entrypoints read."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from neox.config.errors import ConfigError
from neox.config.fields import TypeMismatch, check_type, group_fields
from neox.config.neox_config import GROUPS, DerivedConfig, NeoXConfig
from neox.config.validate import annotate, check_combinations, validate_groups

FORMAT = "neox-resolved-config/1"
RESOLVED_NAME = "resolved_config.yml"
_HEADER = (
    "# Resolved neox config, written by deepy: every key with its final value, then where each value came\n"
    "# from. Per-rank entrypoints read only this file: python -m neox.train --config <this file>\n"
)


def to_dict(cfg: NeoXConfig) -> dict[str, Any]:
    groups = {name: dataclasses.asdict(group) for name, group in cfg.groups().items()}
    return {
        "format": FORMAT,
        "sources": list(cfg.sources),
        "config": groups,
        "provenance": dict(sorted(cfg.provenance.items())),
    }


def save_resolved(cfg: NeoXConfig, path: str | Path) -> Path:
    """Write cfg to path atomically (temporary file in the same directory, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _HEADER + yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, width=120)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_resolved(path: str | Path) -> NeoXConfig:
    """Read a file written by save_resolved; values are type-checked and validated again, not re-derived."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read resolved config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}); write it again with `deepy`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a resolved config (no 'format: {FORMAT}'); pass the file deepy wrote")
    sections = data.get("config") or {}
    classes = {**GROUPS, "derived": DerivedConfig}
    groups: dict[str, Any] = {}
    for name, cls in classes.items():
        values = sections.get(name) or {}
        known = group_fields(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{path}: unknown key '{key}' in group '{name}'; was it written by another version?")
            try:
                kwargs[key] = check_type(value, known[key][1])
            except TypeMismatch as err:
                raise ConfigError(f"{path}: '{key}' {err}") from None
        groups[name] = cls(**kwargs)
    cfg = NeoXConfig(
        **groups,
        provenance={str(k): str(v) for k, v in (data.get("provenance") or {}).items()},
        sources=[str(s) for s in data.get("sources") or []],
    )
    try:
        validate_groups(cfg)
        check_combinations(cfg)
    except ConfigError as err:
        raise annotate(err, cfg) from None
    return cfg
