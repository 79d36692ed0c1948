"""DeepSpeed config sections that gpt-neox passes through unchanged, and the sub-keys DeepSpeed 0.19 accepts in each.

DeepSpeed checks them only when the engine starts (and rejects unknown sub-keys there); checking them with the
config turns a rank's traceback into a config error that names the key. Each section is copied into the
DeepSpeed JSON by neox/config/deepspeed.py.
"""
from __future__ import annotations

import difflib
from typing import Any, Literal

from neox.config.errors import ConfigError
from neox.config.fields import TypeMismatch, check_type

_MONITOR = {"enabled": bool, "output_path": str, "job_name": str}

SECTION_KEYS: dict[str, dict[str, Any]] = {
    # https://www.deepspeed.ai/docs/config-json/#flops-profiler
    "flops_profiler": {"enabled": bool, "recompute_fwd_factor": float, "profile_step": int, "module_depth": int,
                       "top_modules": int, "detailed": bool, "output_file": str | None},
    # https://www.deepspeed.ai/docs/config-json/#communication-logging
    "comms_logger": {"enabled": bool, "verbose": bool, "prof_all": bool, "debug": bool, "prof_ops": list[str]},
    # https://www.deepspeed.ai/docs/config-json/#monitoring-module
    "tensorboard": _MONITOR,
    "csv_monitor": _MONITOR,
    "wandb": {"enabled": bool, "group": str | None, "team": str | None, "project": str},
    # https://www.deepspeed.ai/docs/config-json/#checkpoint-options
    "checkpoint": {"tag_validation": Literal["Warn", "Ignore", "Fail", "WARN", "IGNORE", "FAIL", "warn", "ignore",
                                             "fail"],
                   "load_universal": bool, "use_node_local_storage": bool, "parallel_write": dict,
                   "serialization": bool, "writer": dict},
}


def check_sections(values: dict[str, dict | None]) -> None:
    """values: section name -> its value (None = unset). Sub-keys are type-checked and parsed in place."""
    for name, section in values.items():
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"'{name}' must be a mapping of DeepSpeed's {name} options, got {section!r}")
        known = SECTION_KEYS[name]
        for key in list(section):
            if key not in known:
                close = difflib.get_close_matches(str(key), list(known), n=1)
                hint = f"; did you mean '{name}.{close[0]}'?" if close else f" (DeepSpeed takes {', '.join(known)})"
                raise ConfigError(f"unknown key '{name}.{key}'{hint}")
            try:
                section[key] = check_type(section[key], known[key])
            except TypeMismatch as err:
                raise ConfigError(f"'{name}.{key}' {err}") from None
    flops = values.get("flops_profiler") or {}
    if flops.get("enabled") and flops.get("profile_step", 1) < 1:
        raise ConfigError(f"'flops_profiler.profile_step' must be >= 1, got {flops['profile_step']}")
    parallel_write = (values.get("checkpoint") or {}).get("parallel_write") or {}
    for key in parallel_write:
        if key != "pipeline_stage" or not isinstance(parallel_write[key], bool):
            raise ConfigError("'checkpoint.parallel_write' takes one key, pipeline_stage: true|false")
