"""Typed configuration: YAML files -> one validated, derived NeoXConfig (see load.py)."""
from neox.config.deepspeed import deepspeed_config
from neox.config.errors import ConfigError
from neox.config.load import load_config
from neox.config.neox_config import NeoXConfig
from neox.config.resolved import RESOLVED_NAME, load_resolved, save_resolved

__all__ = [
    "ConfigError",
    "NeoXConfig",
    "RESOLVED_NAME",
    "deepspeed_config",
    "load_config",
    "load_resolved",
    "save_resolved",
]
