"""Training state that any layout can resume from: weights, Adam moments and step count per GPTNeoX parameter.

DeepSpeed's own files are tied to the layout that wrote them (tp files, pipeline layer files, ZeRO partitions over
dp). Next to them every checkpoint gets

    global_stepN/layout_free/pp{S}-tp{T}.pt    one file per (pipeline stage, tp rank), written by dp rank 0

holding that rank's parameters in single-device names (tp shards as they are; stages disjoint) with the full,
dp-gathered fp32 value, exp_avg and exp_avg_sq, plus the optimizer step and the loop's client state. Reading
merges the tp shards with the sharding plan (neox/parallel/sharding.py) and the stages into one single-device
state; loading slices it for the new layout and writes weights and moments into the new engine: a plain torch
optimizer, ZeRO 1/2/3 partitions, or the fp32 masters of DeepSpeed's 16-bit optimizers at ZeRO 0 (the unfused
one, and the bf16 one of pipelines). So tp=2,pp=2 -> tp=1,pp=1, or -> dp=2 ZeRO-3 (any change of tp, pp, dp or
ZeRO stage) resumes exactly. Saved with checkpoint_layout_free: false, the copy is rebuilt offline from DeepSpeed's
files (neox/checkpoint/layout_rebuild.py, tools/reshard_checkpoint.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neox.checkpoint.errors import CheckpointError
from neox.parallel.sharding import ShardingError, merge_state_dicts, shard_tensor, split_overrides
from neox.parallel.topology import Topology

STATE_DIR = "layout_free"
FORMAT = "neox-layout-free/1"
MOMENTS = ("exp_avg", "exp_avg_sq")
_TIED_HEAD, _EMBEDDING = "head.weight", "embedding.word_embeddings.weight"


class LayoutStateError(CheckpointError):
    pass


@dataclass
class FullState:
    """Single-device training state: name -> tensor for the weights and each Adam moment."""
    step: float
    client_state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # moment -> name -> tensor


def _file(ckpt_dir: Path, pp_rank: int, tp_rank: int) -> Path:
    return ckpt_dir / STATE_DIR / f"pp{pp_rank:02d}-tp{tp_rank:02d}.pt"


def _owned(engine) -> list[torch.nn.Parameter]:
    # A pipeline stage's copy of a tied weight is a replica of the first owner's: saved once, by the owner.
    return [p for p in engine.module.parameters() if not getattr(p, "ds_pipe_replicated", False)]


def _wrapper(engine):
    """DeepSpeed's optimizer wrapper (ZeRO 1-3, or the bf16 optimizer), or None for a plain torch optimizer."""
    return engine.optimizer if hasattr(engine.optimizer, "optimizer") else None


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    wrapper = _wrapper(engine)
    return wrapper.optimizer if wrapper is not None else engine.optimizer


def _wrapped(param: torch.nn.Parameter) -> bool:
    """The fp32 value and Adam state of this parameter live in a wrapper's flat partitions."""
    # Every parameter of a wrapper has the attribute; it is None where the slice lies on another dp rank, and the
    # gather is collective, so the attribute's presence (not its value) decides.
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _optimizer_step(engine) -> float:
    for state in _torch_optimizer(engine).state.values():
        if "step" in state:
            return float(state["step"])
    return 0.0


def _unfused_masters(engine) -> dict[int, torch.Tensor]:
    """id(model parameter) -> its fp32 master copy, for DeepSpeed's unfused fp16/bf16 optimizer (what bf16 or fp16
    with ZeRO 0 and a torch optimizer gets, outside a pipeline): it steps a per-parameter fp32 copy that the
    parameter itself (16-bit) only mirrors. Empty for every other engine."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    wrapper = _wrapper(engine)
    if not isinstance(wrapper, FP16_UnfusedOptimizer):
        return {}
    return {id(lp): master for lp_group, master_group in zip(wrapper.fp16_groups, wrapper.fp32_groups)
            for lp, master in zip(lp_group, master_group)}


def _full_values(engine, param: torch.nn.Parameter, masters: dict[int, torch.Tensor],
                 with_moments: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(fp32 weight, {moment: value}) of one parameter, gathered over dp (collective over the dp group)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if not _wrapped(param):
        master = masters.get(id(param), param)
        state = _torch_optimizer(engine).state.get(master, {}) if with_moments else {}
        return master.detach().float().cpu().clone(), {k: state[k].detach().float().cpu().clone()
                                                        for k in MOMENTS if k in state}
    weight = safe_get_full_fp32_param(param)
    moments = {}
    for key in MOMENTS if with_moments else ():
        value = safe_get_full_optimizer_state(param, key)
        if value is not None:
            moments[key] = value.detach().float().cpu().clone()
    return weight.detach().float().cpu().clone(), moments


def save_layout_free_state(ckpt_dir: Path, engine, param_names: dict[int, str], topo: Topology,
                           client_state: dict[str, Any], with_moments: bool = True) -> None:
    """Collective: every rank calls it (ZeRO gathers over dp); dp rank 0 of each (stage, tp rank) writes.
    with_moments False (no_save_optim) writes the weights alone."""
    wrapper = _wrapper(engine)
    if wrapper is not None and hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO 1/2 and the bf16 optimizer link each parameter to its slice of the Adam state after the first step
        # of *one* param group, possibly before the other groups have state (seen with pipelines): link again.
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {k: {} for k in MOMENTS}
    masters = _unfused_masters(engine)
    for param in _owned(engine):
        name = param_names[id(param)]
        weights[name], param_moments = _full_values(engine, param, masters, with_moments)
        for key, value in param_moments.items():
            moments[key][name] = value
    if topo.dp_rank != 0:
        return
    write_layout_free_file(ckpt_dir, StageShard(topo.pp_rank, topo.pp_size, topo.tp_rank, topo.tp_size),
                           _optimizer_step(engine), client_state, weights, moments,
                           split_dims=split_overrides((param_names[id(p)], p) for p in _owned(engine)))


@dataclass(frozen=True)
class StageShard:
    """Which (pipeline stage, tp rank) of which layout a layout-free file holds."""
    pp_rank: int
    pp_size: int
    tp_rank: int
    tp_size: int


def write_layout_free_file(ckpt_dir: Path, shard: StageShard, step: float, client_state: dict[str, Any],
                           weights: dict[str, torch.Tensor], moments: dict[str, dict[str, torch.Tensor]],
                           split_dims: dict[str, int] | None = None) -> Path:
    """One pp{S}-tp{T}.pt file: this shard's parameters in single-device names (tp-sharded as trained; split_dims:
    the parameters split otherwise than the sharding plan's table, as neox/parallel/sharding.py describes)."""
    path = _file(ckpt_dir, shard.pp_rank, shard.tp_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "tp_rank": shard.tp_rank, "tp_size": shard.tp_size, "pp_rank": shard.pp_rank,
               "pp_size": shard.pp_size, "step": float(step), "client_state": dict(client_state),
               "weights": weights, "moments": moments, "split_dims": dict(split_dims or {})}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def has_layout_free_state(ckpt_dir: Path) -> bool:
    return (ckpt_dir / STATE_DIR).is_dir() and any((ckpt_dir / STATE_DIR).glob("pp*-tp*.pt"))


def read_layout_free_state(ckpt_dir: Path) -> FullState:
    """Merge every (stage, tp rank) file of a checkpoint into the single-device state."""
    files = sorted((ckpt_dir / STATE_DIR).glob("pp*-tp*.pt"))
    if not files:
        raise LayoutStateError(f"{ckpt_dir} has no {STATE_DIR}/ files (saved with checkpoint_layout_free: false, or "
                               "by an older neox): build them with `python tools/reshard_checkpoint.py --checkpoint "
                               f"{ckpt_dir}`, or resume at the layout that wrote it")
    payloads = [torch.load(f, weights_only=True) for f in files]
    tp_size, pp_size = payloads[0]["tp_size"], payloads[0]["pp_size"]
    by_coord = {(p["pp_rank"], p["tp_rank"]): p for p in payloads}
    missing = [f"pp{s:02d}-tp{t:02d}.pt" for s in range(pp_size) for t in range(tp_size) if (s, t) not in by_coord]
    if missing or any(p.get("format") != FORMAT for p in payloads):
        raise LayoutStateError(f"{ckpt_dir / STATE_DIR} is incomplete or of another format (missing {missing}); "
                               "resume from another checkpoint")
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {k: {} for k in MOMENTS}
    try:
        for stage in range(pp_size):
            shards = [by_coord[(stage, t)] for t in range(tp_size)]
            split_dims = shards[0].get("split_dims")
            weights.update(merge_state_dicts([s["weights"] for s in shards], split_dims))
            for key in MOMENTS:
                if shards[0]["moments"].get(key):
                    moments[key].update(merge_state_dicts([s["moments"][key] for s in shards], split_dims))
    except ShardingError as err:
        raise LayoutStateError(f"{ckpt_dir / STATE_DIR}: {err}") from err
    first = by_coord[(0, 0)]
    return FullState(step=first["step"], client_state=first["client_state"], weights=weights, moments=moments)


def consolidated_weights(ckpt_dir: Path, tied_head: bool) -> dict[str, torch.Tensor]:
    """The single-device state dict (GPTNeoX.state_dict() keys) of a checkpoint at any layout."""
    weights = dict(read_layout_free_state(ckpt_dir).weights)
    if tied_head:
        weights[_TIED_HEAD] = weights[_EMBEDDING]
    return weights


# The fp32 flat partitions that each DeepSpeed wrapper hands its torch optimizer (one per param group or sub-group).
_FLAT_PARTITIONS = ("single_partition_of_fp32_groups",  # ZeRO 1/2
                    "fp32_groups_flat_partition",  # the bf16 optimizer (bf16 with ZeRO 0)
                    "fp32_partitioned_groups_flat")  # ZeRO 3


def _flat_partitions(wrapper) -> list[torch.Tensor]:
    for attr in _FLAT_PARTITIONS:
        if hasattr(wrapper, attr):
            return list(getattr(wrapper, attr))
    raise LayoutStateError(f"DeepSpeed optimizer wrapper {type(wrapper).__name__} keeps its fp32 state in none of "
                           f"{_FLAT_PARTITIONS}: a checkpoint of another layout cannot be loaded into it; resume at "
                           "the layout that wrote the checkpoint")


def _step_tensor(optimizer: torch.optim.Optimizer, step: float, device: torch.device) -> torch.Tensor:
    # torch's fused Adam keeps the step count on the parameters' device, the other implementations on the CPU.
    fused = any(g.get("fused") for g in optimizer.param_groups)
    return torch.tensor(step, dtype=torch.float32, device=device if fused else torch.device("cpu"))


def _fresh_wrapper_states(wrapper, step: float) -> None:
    """DeepSpeed's wrappers create Adam state lazily at the first step; make it now (zeros at the checkpoint's step
    count) so that the moments can be written into it."""
    for flat in _flat_partitions(wrapper):
        wrapper.optimizer.state[flat] = {"step": _step_tensor(wrapper.optimizer, step, flat.device),
                                         "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO 1/2 and the bf16 optimizer point each parameter at its slice of the state: point them at the new one.
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


def _set_zero3_partition(wrapper, param: torch.nn.Parameter, full: torch.Tensor, key: str | None) -> None:
    """Write this dp rank's piece of a full fp32 value (key None: the weight, else an Adam moment) into ZeRO-3's
    partition. DeepSpeed's own setter slices past the end of the value when the parameter does not split evenly
    over the ranks (the last piece is padded), so the padding is done here."""
    partition, group = wrapper._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    size = partition.numel()
    piece = full.reshape(-1)[wrapper._get_param_partition_rank(param) * size:][:size]
    with torch.no_grad():
        partition.zero_()
        partition[:piece.numel()].copy_(piece.to(partition.dtype))
    if wrapper._swappable_optimizer_subgroup(group):
        wrapper._optimizer_states_and_gradient_swap_out(group)


def _zero3_copy_master_to_model(wrapper) -> None:
    """ZeRO-3 keeps the module's (possibly bf16) partitions apart from the fp32 masters: refresh them, as a step
    does."""
    for group in range(len(wrapper.fp16_groups)):
        wrapper._reassign_or_swap_out_partitioned_parameters(group)


def load_layout_free_state(engine, param_names: dict[int, str], topo: Topology, full: FullState,
                           weights_only: bool = False) -> None:
    """Write this rank's slice of `full` into the engine's parameters (and, unless weights_only, the Adam
    moments and step): plain torch optimizer, ZeRO 1/2/3 partitions or a 16-bit optimizer's fp32 masters.
    Not collective."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params = list(engine.module.parameters())
    overrides = split_overrides((param_names.get(id(p), "?"), p) for p in params)
    unknown = [param_names.get(id(p), "?") for p in params if param_names.get(id(p)) not in full.weights]
    if unknown:
        raise LayoutStateError(f"the checkpoint's layout-free state lacks {unknown[:5]}: it is of another model")
    wrapper = _wrapper(engine)
    zero3 = any(hasattr(p, "ds_id") for p in params)
    masters = _unfused_masters(engine)
    restore_moments = not weights_only and bool(full.moments.get("exp_avg"))
    if wrapper is not None and restore_moments and not masters:
        _fresh_wrapper_states(wrapper, full.step)
    for param in params:
        name = param_names[id(param)]
        value = shard_tensor(name, full.weights[name], topo.tp_rank, topo.tp_size, overrides)
        shape = tuple(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 parameter's own tensor is emptied
        if tuple(value.shape) != shape:
            raise LayoutStateError(f"{name}: checkpoint shard {tuple(value.shape)} vs model {shape} "
                                   f"at tp rank {topo.tp_rank}/{topo.tp_size}")
        moments = {}
        if restore_moments and name in full.moments["exp_avg"]:
            moments = {k: shard_tensor(name, full.moments[k][name], topo.tp_rank, topo.tp_size, overrides)
                       for k in MOMENTS}
        if zero3:
            for key, tensor in ((None, value), *moments.items()):
                _set_zero3_partition(wrapper, param, tensor, key)
            continue
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        if _wrapped(param):
            safe_set_full_fp32_param(param, value.to(param.device))
            for key, moment in moments.items():
                safe_set_full_optimizer_state(param, moment.to(param.device), key)
            continue
        master = masters.get(id(param), param)  # the tensor the torch optimizer steps
        if master is not param:
            with torch.no_grad():
                master.copy_(value.to(master.dtype))
        if moments:
            optimizer = _torch_optimizer(engine)
            optimizer.state[master] = {"step": _step_tensor(optimizer, full.step, master.device),
                                       **{k: m.to(master.device) for k, m in moments.items()}}
    if zero3:
        _zero3_copy_master_to_model(wrapper)


def layout_of(cfg) -> dict[str, int]:
    """What DeepSpeed's own checkpoint files depend on; a change in any of these resumes from layout-free state."""
    return {"model_parallel_size": cfg.parallel.model_parallel_size,
            "pipe_parallel_size": cfg.parallel.pipe_parallel_size,
            "data_parallel_size": cfg.derived.data_parallel_size,
            "zero_stage": cfg.optim.zero_stage}


def param_names_of(train_engine) -> dict[int, str]:
    """id(parameter) -> single-device name; a parallel engine records them before wrapping the model."""
    names = getattr(train_engine, "param_names", None)
    if names is None:
        names = {id(p): n for n, p in train_engine.engine.module.named_parameters()}
    return names
