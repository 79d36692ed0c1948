"""Validation of the mixture-of-experts keys (fields of ModelConfig, neox/config/model.py) and their combinations
with the rest of the config."""
from __future__ import annotations

from typing import TYPE_CHECKING

from neox.config.errors import ConfigError

if TYPE_CHECKING:
    from neox.config.model import ModelConfig
    from neox.config.neox_config import NeoXConfig

ROUTER_TYPES = ("sinkhorn", "topk")


def _positive_int(key: str, value, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"'{key}' must be an integer >= {low}, got {value!r}")


def validate_moe(m: ModelConfig) -> None:
    """Raise ConfigError naming the first offending MoE key."""
    _positive_int("moe_num_experts", m.moe_num_experts)
    _positive_int("moe_expert_interval", m.moe_expert_interval)
    _positive_int("moe_top_k", m.moe_top_k)
    _positive_int("moe_num_shared_experts", m.moe_num_shared_experts, allow_zero=True)
    if m.moe_router_type not in ROUTER_TYPES:
        raise ConfigError(f"'moe_router_type' is {m.moe_router_type!r}; choose one of {', '.join(ROUTER_TYPES)}")
    for key in ("moe_intermediate_size", "moe_shared_expert_intermediate_size"):
        if getattr(m, key) is not None:
            _positive_int(key, getattr(m, key))
    for key in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
        if getattr(m, key) < 0:
            raise ConfigError(f"'{key}' must be >= 0, got {getattr(m, key)}")
    if m.moe_jitter_eps is not None and not 0.0 <= m.moe_jitter_eps < 1.0:
        raise ConfigError(f"'moe_jitter_eps' must be in [0, 1) (the noise is uniform in [1 - eps, 1 + eps]), got "
                          f"{m.moe_jitter_eps}")
    if m.moe_capacity_factor is not None and m.moe_capacity_factor <= 0:
        raise ConfigError(f"'moe_capacity_factor' must be positive (or null for dropless routing), got "
                          f"{m.moe_capacity_factor}")
    if m.moe_num_experts == 1:
        if m.moe_layers:
            raise ConfigError(f"'moe_layers' {m.moe_layers} names MoE layers but 'moe_num_experts' is 1 (no "
                              "experts): set moe_num_experts > 1, or drop moe_layers")
        return
    if m.moe_top_k > m.moe_num_experts:
        raise ConfigError(f"'moe_top_k' ({m.moe_top_k}) exceeds 'moe_num_experts' ({m.moe_num_experts}): a token "
                          "cannot go to more experts than there are")
    if m.moe_layers is not None:
        bad = [i for i in m.moe_layers
               if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < m.num_layers]
        if bad or not m.moe_layers:
            raise ConfigError(f"'moe_layers' must list layer indices in 0..{m.num_layers - 1}, got {m.moe_layers}")
    if m.moe_num_shared_experts == 0:
        for key in ("moe_shared_expert_gate", "moe_shared_expert_intermediate_size"):
            if getattr(m, key):
                raise ConfigError(f"'{key}' is set but there is no shared expert: set 'moe_num_shared_experts' "
                                  "(1 for Qwen2-MoE's one shared MLP)")


def check_moe_combinations(cfg: NeoXConfig) -> None:
    """MoE with the layout and the other features (neox/config/validate.py:check_combinations)."""
    m = cfg.model
    ep = cfg.parallel.moe_expert_parallel_size
    if not m.moe_layer_indices:
        if ep > 1:
            raise ConfigError(f"'moe_expert_parallel_size' is {ep} but the model has no MoE layers "
                              f"('moe_num_experts' is {m.moe_num_experts}): set moe_num_experts > 1, or "
                              "moe_expert_parallel_size 1")
        return
    if ep > 1 and m.moe_num_experts % ep:
        raise ConfigError(f"'moe_expert_parallel_size' ({ep}) must divide 'moe_num_experts' "
                          f"({m.moe_num_experts}): each expert-parallel rank holds the same number of experts")

    if cfg.parallel.sequence_parallel and cfg.parallel.model_parallel_size > 1:
        raise ConfigError("'sequence_parallel' with MoE layers ('moe_num_experts' "
                          f"{m.moe_num_experts}): the router would see only this rank's positions while the "
                          "tensor-parallel experts need every token; turn sequence_parallel off (tensor "
                          "parallelism itself works with MoE)")
    if cfg.mup.use_mup:
        raise ConfigError("'use_mup' with MoE layers ('moe_num_experts' "
                          f"{m.moe_num_experts}): neox's muP width rules are written for 2-D weight matrices, "
                          "and the experts are stacked [experts, out, in] tensors; train the MoE model without "
                          "muP")


def check_expert_parallel_training(cfg: NeoXConfig) -> None:
    """What training with moe_expert_parallel_size needs of the layout (eval and generate run the experts whole, so
    a config trained at ep > 1 evaluates on any number of ranks)."""
    ep = cfg.parallel.moe_expert_parallel_size
    if ep == 1:
        return
    dp = cfg.derived.data_parallel_size
    if dp % ep:
        raise ConfigError(f"'moe_expert_parallel_size' ({ep}) must divide the data-parallel size ({dp} = world size "
                          "/ (model_parallel_size x pipe stages)): experts are split over data-parallel ranks; "
                          "start a multiple of ep data-parallel ranks")
    if cfg.optim.zero_stage == 3:
        raise ConfigError(f"'moe_expert_parallel_size' {ep} with ZeRO stage 3: expert parallelism runs with ZeRO "
                          "stages 0-2 (stage 3 would gather each layer's experts from ranks that hold other "
                          "experts); use zero_optimization.stage 0, 1 or 2")
