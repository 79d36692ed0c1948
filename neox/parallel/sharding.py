"""Which GPTNeoX tensors are split over tensor-parallel ranks, and along which dim; shard and merge state dicts.

The one tensor-parallel plan of the project: `parallelize` swaps modules by these names, and checkpoints are
sharded / merged with the same table, so the two can never disagree. Optimizer moments (exp_avg, exp_avg_sq)
have their parameter's shape and are sharded by the parameter's name with the same functions.

Splits are contiguous. For query_key_value that is a split on kv-group boundaries, because the fused layout
is [group 0: q.., k, v | group 1: ...] (neox/model/model.py) and tp divides num_kv_heads.

One layout choice overrides the table: an untied head trained with output_layer_parallelism 'row' is split along
its hidden columns (dim 1). Its parameter carries `neox_tp_split_dim` (neox/parallel/tensor.py:mark_parallel); the
functions below take such overrides as {name: dim}, and layout-free checkpoint files record them.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

# Module names (suffixes after "blocks.N.") -> parallel style. A MoE block's shared expert is a dense MLP.
COLUMN_PARALLEL = ("attention.query_key_value", "mlp.linear1", "mlp.gate", "mlp.shared_expert.linear1",
                   "mlp.shared_expert.gate")
ROW_PARALLEL = ("attention.dense", "mlp.linear2", "mlp.shared_expert.linear2")
VOCAB_PARALLEL = ("embedding.word_embeddings", "head")
# A MoE block's experts, weights [experts, inner, hidden] (neox/model/moe.py): every expert's hidden units are split
# over tp, dim 1 of all three (the dense MLP's column split of linear1 / gate, row split of linear2).
EXPERT_WEIGHTS = ("mlp.experts.linear1", "mlp.experts.gate", "mlp.experts.linear2")


class ShardingError(ValueError):
    pass


def _module_of(param_name: str) -> tuple[str, str]:
    module, _, leaf = param_name.rpartition(".")
    return module, leaf


def _matches(module: str, names: tuple[str, ...]) -> bool:
    return any(module == n or module.endswith("." + n) for n in names)


Overrides = Mapping[str, "int | None"]


def split_overrides(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> dict[str, int]:
    """{name: dim} of the parameters split otherwise than the table says (marked neox_tp_split_dim)."""
    return {name: p.neox_tp_split_dim for name, p in named_params if hasattr(p, "neox_tp_split_dim")}


def config_overrides(model_cfg) -> dict[str, int]:
    """The overrides a training run with this ModelConfig makes (for readers that have only the config)."""
    return {"head.weight": 1} if model_cfg.row_parallel_head else {}


def tp_split_dim(param_name: str, overrides: Overrides | None = None) -> int | None:
    """0 (rows split), 1 (columns split) or None (replicated on every tp rank)."""
    if overrides and param_name in overrides:
        return overrides[param_name]
    module, leaf = _module_of(param_name)
    if _matches(module, EXPERT_WEIGHTS):
        return 1
    # A LoRA adapter (neox/parallel/lora.py) splits as its base: B with a column-parallel W's rows, A with a
    # row-parallel W's columns; the other factor is whole on every rank.
    if _matches(module, COLUMN_PARALLEL) or _matches(module, VOCAB_PARALLEL):
        return None if leaf == "lora_A" else 0
    if _matches(module, ROW_PARALLEL):
        return 1 if leaf in ("weight", "lora_A") else None
    return None


def shard_index(name: str, shape: tuple[int, ...], tp_rank: int, tp_size: int,
                overrides: Overrides | None = None) -> tuple[slice, ...]:
    """Where this tp rank's shard sits in the full tensor of this name and shape: one slice per dim."""
    index = [slice(None)] * len(shape)
    dim = tp_split_dim(name, overrides)
    if dim is None or tp_size == 1:
        return tuple(index)
    if shape[dim] % tp_size:
        raise ShardingError(f"{name}: dim {dim} of size {shape[dim]} does not split into {tp_size} "
                            "tensor-parallel shards")
    size = shape[dim] // tp_size
    index[dim] = slice(tp_rank * size, (tp_rank + 1) * size)
    return tuple(index)


def shard_tensor(name: str, full: torch.Tensor, tp_rank: int, tp_size: int,
                 overrides: Overrides | None = None) -> torch.Tensor:
    return full[shard_index(name, tuple(full.shape), tp_rank, tp_size, overrides)].clone()


def shard_state_dict(full: dict[str, torch.Tensor], tp_rank: int, tp_size: int,
                     overrides: Overrides | None = None) -> dict[str, torch.Tensor]:
    """This tp rank's slice of a single-device (GPTNeoX-named) state dict."""
    if not 0 <= tp_rank < tp_size:
        raise ShardingError(f"tp_rank {tp_rank} is outside 0..{tp_size - 1}")
    return {name: shard_tensor(name, t, tp_rank, tp_size, overrides) for name, t in full.items()}


def merge_state_dicts(shards: list[dict[str, torch.Tensor]],
                      overrides: Overrides | None = None) -> dict[str, torch.Tensor]:
    """Inverse of shard_state_dict: shards ordered by tp rank -> the single-device state dict.
    Replicated tensors must agree across ranks (they get identical, all-reduced gradients); a mismatch means the
    shards do not come from one model replica."""
    if not shards:
        raise ShardingError("no shards to merge")
    names = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if list(shard) != names:
            raise ShardingError(f"tp shard {rank} holds other tensors than shard 0: "
                                f"{sorted(set(shard) ^ set(names))[:5]}")
    merged = {}
    for name in names:
        parts = [s[name] for s in shards]
        dim = tp_split_dim(name, overrides)
        if dim is None or len(parts) == 1:
            for rank, part in enumerate(parts[1:], start=1):
                if part.shape != parts[0].shape or not torch.allclose(part, parts[0], rtol=1e-5, atol=1e-7):
                    raise ShardingError(f"{name} is replicated over tensor-parallel ranks but shard {rank} "
                                        "differs from shard 0")
            merged[name] = parts[0].clone()
        else:
            merged[name] = torch.cat(parts, dim=dim)
    return merged
