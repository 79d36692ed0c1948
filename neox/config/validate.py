"""Checks that span groups, and the annotation that adds each named key's origin to an error."""
from __future__ import annotations

import re

from neox.config.errors import ConfigError
from neox.config.lora import check_lora_combinations
from neox.config.model import check_model_combinations
from neox.config.moe import check_expert_parallel_training, check_moe_combinations
from neox.config.mup import check_mup_combinations
from neox.config.post_training import check_post_training_combinations
from neox.config.neox_config import DERIVED_KEYS, KEY_GROUP, NeoXConfig
from neox.config.optim import sections_precision
from neox.config.parallel import check_sequence_parallel

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
    fp16, bf16 = cfg.optim.fp16 or {}, cfg.optim.bf16 or {}
    wanted = sections_precision(fp16, bf16)
    if wanted is not None and precision != wanted:
        section = "bf16" if bf16.get("enabled") else "fp16"
        means = " (with fp16.type bfloat16: bf16 training, as DeeperSpeed reads it)" if section == "fp16" and \
            wanted == "bfloat16" else ""
        raise ConfigError(f"'precision' is {precision} but '{section}.enabled' is true{means}; make them agree")
    check_train_epochs(cfg)
    check_mup_combinations(cfg)
    check_post_training_combinations(cfg)
    check_model_combinations(model, pp, precision)
    check_sequence_parallel(cfg.parallel, model.seq_length, cfg.data.curriculum_learning)
    check_lora_combinations(cfg)
    check_moe_combinations(cfg)


def check_train_epochs(cfg: NeoXConfig) -> None:
    """gpt-neox's restrictions on train_epochs: an epoch is one pass over every train dataset, unweighted."""
    if cfg.train.train_epochs is None:
        return
    weights = cfg.data.train_data_weights
    if weights and any(w != 1.0 for w in weights):
        raise ConfigError(f"'train_epochs' cannot be used with unequal 'train_data_weights' ({weights}): an epoch "
                          "is one pass over every train dataset; use train_iters to train a weighted mixture")
    if getattr(cfg.data, "weight_by_num_documents", False):
        raise ConfigError("'train_epochs' cannot be used with 'weight_by_num_documents' (as in gpt-neox); use "
                          "train_iters")
    for key, needed in (("pack_impl", "packed"), ("dataset_impl", "gpt2")):
        value = getattr(cfg.data, key, needed)  # keys that other features add to the data group
        if value != needed:
            raise ConfigError(f"'train_epochs' needs '{key}' {needed} (as in gpt-neox), got {value!r}; use "
                              "train_iters")


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
    if cfg.train.train_iters is None and cfg.train.train_epochs is None:
        raise ConfigError("'train_iters' (or 'train_epochs') must be set to train")
    if cfg.train.train_micro_batch_size_per_gpu is None:
        raise ConfigError("training needs a batch size: set 'train_micro_batch_size_per_gpu' (sequences per rank per "
                          "forward pass) or 'train_batch_size' (sequences per optimizer step)")
    if cfg.data.data_path is None and cfg.data.train_data_paths is None and cfg.data.pos_train_data_paths is None:
        raise ConfigError("training needs data: set 'data_path' or 'train_data_paths' (e.g. configs/local_setup.yml), "
                          "or with dataset_impl pairwise 'pos_train_data_paths' and 'neg_train_data_paths'")
    if cfg.train.save is None and cfg.log.log_dir is None:
        raise ConfigError("set 'save' or 'log_dir': the resolved config and the run's outputs are written there")
    check_expert_parallel_training(cfg)
