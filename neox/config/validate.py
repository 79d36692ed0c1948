"""Checks that span groups, and the annotation that adds each named key's origin to an error."""
from __future__ import annotations

import re

from neox.config.errors import ConfigError
from neox.config.neox_config import DERIVED_KEYS, KEY_GROUP, NeoXConfig

_QUOTED = re.compile(r"'([A-Za-z_][\w.]*)'")


def validate_groups(cfg: NeoXConfig) -> None:
    for group in cfg.groups().values():
        validate = getattr(group, "validate", None)
        if validate is not None:
            validate()


def check_combinations(cfg: NeoXConfig) -> None:
    """Rules between groups; each error names the keys involved."""
    tp, pp = cfg.parallel.model_parallel_size, cfg.parallel.pipe_parallel_size
    model = cfg.model
    if model.num_attention_heads % tp:
        raise ConfigError(
            f"'model_parallel_size' ({tp}) must divide 'num_attention_heads' ({model.num_attention_heads}): "
            "each tensor-parallel rank holds whole heads"
        )
    if model.kv_heads % tp:
        raise ConfigError(
            f"'model_parallel_size' ({tp}) must divide the key/value heads ('num_kv_heads' = {model.kv_heads})"
        )
    if pp > model.num_layers:
        raise ConfigError(f"'pipe_parallel_size' ({pp}) exceeds 'num_layers' ({model.num_layers})")
    stage = cfg.optim.zero_stage
    if stage >= 2 and pp >= 1:
        raise ConfigError(
            f"'zero_optimization.stage' {stage} cannot be used with 'pipe_parallel_size' {pp}: DeepSpeed's pipeline "
            "engine (used whenever pipe_parallel_size >= 1) refuses ZeRO-2 and ZeRO-3, whose gradient partitioning "
            "clashes with its own gradient reduction. Use zero_optimization.stage 1 (optimizer-state sharding, "
            "works with pipelines), or set pipe_parallel_size 0 to keep ZeRO-2/3"
        )
    precision = cfg.optim.precision
    fp16_on = bool((cfg.optim.fp16 or {}).get("enabled", False))
    bf16_on = bool((cfg.optim.bf16 or {}).get("enabled", False))
    if (fp16_on and precision != "fp16") or (bf16_on and precision != "bfloat16"):
        section = "fp16" if fp16_on else "bf16"
        raise ConfigError(f"'precision' is {precision} but '{section}.enabled' is true; make them agree")


def annotate(err: ConfigError, cfg: NeoXConfig) -> ConfigError:
    """The same error with '(where set: key = origin; ...)' for every config key its message quotes."""
    named: list[str] = []
    for token in _QUOTED.findall(str(err)):
        head = token.split(".", 1)[0]
        if (head in KEY_GROUP or head in DERIVED_KEYS) and token not in named:
            named.append(token)
    if not named:
        return err
    where = "; ".join(f"{key} = {cfg.origin(key)}" for key in named)
    return ConfigError(f"{err} (where set: {where})")


def require_for_training(cfg: NeoXConfig) -> None:
    """What `deepy train` needs beyond a valid config: a length, data, and a run directory."""
    if cfg.train.train_iters is None:
        raise ConfigError("'train_iters' must be set to train")
    if cfg.data.data_path is None and cfg.data.train_data_paths is None:
        raise ConfigError("training needs data: set 'data_path' or 'train_data_paths' (e.g. configs/local_setup.yml)")
    if cfg.train.save is None and cfg.log.log_dir is None:
        raise ConfigError("set 'save' or 'log_dir': the resolved config and the run's outputs are written there")
