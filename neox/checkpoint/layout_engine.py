"""Which elements of which parameters a rank owns in a DeepSpeed engine, as flat ranges of its tensor-parallel shards.

Each parameter's fp32 value and Adam moments live, per engine:
- ZeRO 1/2 and DeepSpeed's bf16 optimizer: in flat fp32 partitions over dp; `param._hp_mapping` gives this rank's
  fragment (a flat range of the parameter and views of the master and of each moment), None where it has none;
- ZeRO 3: each parameter cut into dp pieces of ceil(numel / dp) (the last one padded); this rank holds one;
- ZeRO 0: every dp rank holds all of it (the parameter itself, or the fp32 master of DeepSpeed's unfused 16-bit
  optimizer); for writing, dp rank d takes the d-th of dp equal flat slices.
With expert parallelism a rank's expert tensors are its experts' rows (dim 0) of its tp shard: the band is cut to
those rows, and the ranks that share them (the expert-data-parallel group, over which ZeRO partitions them) split
the writing as the dp ranks split a replicated parameter's.
owned_ranges (saving) gives each element to exactly one rank of the job: tp-replicated parameters (norms, biases of
row-parallel layers) are written by tp rank 0 only, a pipeline's tied copy of the embedding not at all, frozen
parameters (a LoRA run's base, which DeepSpeed's files leave out too) neither.
destinations (loading) gives every range the rank must fill, replicas included, as views of the engine's own
tensors, so a load writes into the engine's memory with no full-size copy; refresh_after_load then brings the
16-bit / module copies up to date (ZeRO 1/2 and bf16: an all-gather over dp, as after an optimizer step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.regions import Rect, tp_band
from neox.parallel.sharding import split_overrides, tp_split_dim
from neox.parallel.topology import Topology

MOMENTS = ("exp_avg", "exp_avg_sq")
WEIGHT = "weight"


class LayoutEngineError(CheckpointError):
    pass


@dataclass
class FlatRange:
    """Elements [start, stop) of one parameter's tp shard (flattened row-major), with a flat view per kind
    ("weight", "exp_avg", "exp_avg_sq") of exactly those elements."""
    name: str
    full_shape: tuple[int, ...]
    band: Rect
    start: int
    stop: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def wrapper_of(engine):
    """DeepSpeed's optimizer wrapper (ZeRO 1-3, or the bf16 optimizer), or None for a plain torch optimizer."""
    return engine.optimizer if hasattr(engine.optimizer, "optimizer") else None


def torch_optimizer(engine) -> torch.optim.Optimizer:
    wrapper = wrapper_of(engine)
    return wrapper.optimizer if wrapper is not None else engine.optimizer


def is_zero3(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def _fragmented(param: torch.nn.Parameter) -> bool:
    # Every parameter of a ZeRO 1/2 or bf16 wrapper has the attribute; it is None where this rank holds no fragment.
    return hasattr(param, "_hp_mapping")


def unfused_masters(engine) -> dict[int, torch.Tensor]:
    """id(model parameter) -> its fp32 master copy, for DeepSpeed's unfused fp16/bf16 optimizer (what bf16 or fp16
    with ZeRO 0 and a torch optimizer gets, outside a pipeline). Empty for every other engine."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    wrapper = wrapper_of(engine)
    if not isinstance(wrapper, FP16_UnfusedOptimizer):
        return {}
    return {id(lp): master for lp_group, master_group in zip(wrapper.fp16_groups, wrapper.fp32_groups)
            for lp, master in zip(lp_group, master_group)}


def optimizer_step(engine) -> float:
    for state in torch_optimizer(engine).state.values():
        if "step" in state:
            return float(state["step"])
    return 0.0


def link_moment_views(engine) -> None:
    """ZeRO 1/2 and the bf16 optimizer point each parameter at its slice of the Adam state after the first step of
    *one* param group, possibly before the other groups have state (seen with pipelines): point them all again."""
    wrapper = wrapper_of(engine)
    if wrapper is not None and hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


def _trained(engine) -> list[torch.nn.Parameter]:
    # Frozen parameters (a LoRA run's base) are left out, as DeepSpeed's files leave them out: they come from the base
    # checkpoint the run names.
    return [p for p in engine.module.parameters() if p.requires_grad]


class _Geometry:
    """Full single-device shape and tp band of each parameter of this rank."""

    def __init__(self, engine, names: dict[int, str], topo: Topology):
        self.topo = topo
        self.names = names
        self.overrides = split_overrides((names.get(id(p), "?"), p) for p in engine.module.parameters())

    def shard_shape(self, param) -> tuple[int, ...]:
        return tuple(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 parameter's own tensor is emptied

    def split_dim(self, name: str) -> int | None:
        return tp_split_dim(name, self.overrides) if self.topo.tp_size > 1 else None

    def expert_split(self, param) -> bool:
        return self.topo.ep_size > 1 and getattr(param, "neox_expert_parallel", False)

    def full_shape(self, name: str, shard: tuple[int, ...], expert_split: bool = False) -> tuple[int, ...]:
        full = list(shard)
        dim = self.split_dim(name)
        if dim is not None:
            full[dim] *= self.topo.tp_size
        if expert_split:
            full[0] *= self.topo.ep_size
        return tuple(full)

    def describe(self, param) -> tuple[str, tuple[int, ...], Rect]:
        name = self.names.get(id(param))
        if name is None:
            raise LayoutEngineError("a parameter of the engine has no single-device name: the model was wrapped "
                                    "after the names were recorded")
        experts = self.expert_split(param)
        full = self.full_shape(name, self.shard_shape(param), experts)
        band = tp_band(full, self.split_dim(name), self.topo.tp_rank, self.topo.tp_size)
        if experts:  # this rank's experts: rows of the [experts, inner x hidden] grid
            local = full[0] // self.topo.ep_size
            band = Rect(self.topo.ep_rank * local, (self.topo.ep_rank + 1) * local, band.c0, band.c1)
        return name, full, band


def _zero3_partition(wrapper, param, key: str | None) -> torch.Tensor:
    partition, _ = wrapper._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    return partition


def _zero3_has_moments(wrapper, param) -> bool:
    group, _, _ = wrapper.grad_position[wrapper.get_param_id(param)]
    state = wrapper.optimizer.state.get(wrapper.fp32_partitioned_groups_flat[group], {})
    return all(k in state for k in MOMENTS)


def owned_ranges(engine, names: dict[int, str], topo: Topology, with_moments: bool) -> tuple[list[FlatRange], bool]:
    """The ranges this rank writes and whether it holds Adam moments for all of them (none exist before the first
    step). Views of the engine's tensors: nothing is copied."""
    geometry = _Geometry(engine, names, topo)
    wrapper = wrapper_of(engine)
    masters = unfused_masters(engine)
    optimizer = torch_optimizer(engine)
    if with_moments:
        link_moment_views(engine)
    ranges: list[FlatRange] = []
    moments_everywhere = True
    for param in _trained(engine):
        if getattr(param, "ds_pipe_replicated", False):
            continue  # a later pipeline stage's copy of the tied embedding: its owner writes it
        name, full, band = geometry.describe(param)
        if geometry.split_dim(name) is None and topo.tp_rank != 0:
            continue  # identical on every tp rank: tp rank 0 writes it
        numel = band.numel
        views: dict[str, torch.Tensor] = {}
        if _fragmented(param):
            mapping = param._hp_mapping
            if mapping is None:
                continue
            start = mapping.lp_fragment_address.start
            stop = start + mapping.lp_fragment_address.numel
            views[WEIGHT] = mapping.get_hp_fragment()
            fragments = mapping.optim_fragment or {}
            if with_moments and all(k in fragments for k in MOMENTS):
                views.update({k: fragments[k] for k in MOMENTS})
        elif is_zero3(param):
            size = _zero3_partition(wrapper, param, None).numel()
            start = wrapper._get_param_partition_rank(param) * size
            stop = min(numel, start + size)
            if stop <= start:
                continue
            views[WEIGHT] = _zero3_partition(wrapper, param, None)[:stop - start]
            if with_moments and _zero3_has_moments(wrapper, param):
                views.update({k: _zero3_partition(wrapper, param, k)[:stop - start] for k in MOMENTS})
        else:
            master = masters.get(id(param), param)
            sharers, position = ((topo.expert_dp_size, topo.expert_dp_rank) if geometry.expert_split(param)
                                 else (topo.dp_size, topo.dp_rank))
            chunk = math.ceil(numel / sharers)
            start, stop = min(numel, position * chunk), min(numel, (position + 1) * chunk)
            if stop <= start:
                continue
            views[WEIGHT] = master.detach().reshape(-1)[start:stop]
            state = optimizer.state.get(master, {})
            if with_moments and all(k in state for k in MOMENTS):
                views.update({k: state[k].detach().reshape(-1)[start:stop] for k in MOMENTS})
        if with_moments and len(views) == 1:
            moments_everywhere = False
        ranges.append(FlatRange(name, full, band, start, stop, views))
    return ranges, moments_everywhere


# --------------------------------------------------------------------------------------------- loading

def _step_tensor(optimizer: torch.optim.Optimizer, step: float, device: torch.device) -> torch.Tensor:
    # torch's fused Adam keeps the step count on the parameters' device, the other implementations on the CPU.
    fused = any(g.get("fused") for g in optimizer.param_groups)
    return torch.tensor(step, dtype=torch.float32, device=device if fused else torch.device("cpu"))


# The fp32 flat partitions that each DeepSpeed wrapper hands its torch optimizer (one per param group or sub-group).
_FLAT_PARTITIONS = ("single_partition_of_fp32_groups",  # ZeRO 1/2
                    "fp32_groups_flat_partition",  # the bf16 optimizer (bf16 with ZeRO 0)
                    "fp32_partitioned_groups_flat")  # ZeRO 3


def _flat_partitions(wrapper) -> list[torch.Tensor]:
    for attr in _FLAT_PARTITIONS:
        if hasattr(wrapper, attr):
            return list(getattr(wrapper, attr))
    raise LayoutEngineError(f"DeepSpeed optimizer wrapper {type(wrapper).__name__} keeps its fp32 state in none of "
                            f"{_FLAT_PARTITIONS}: a checkpoint of another layout cannot be loaded into it; resume at "
                            "the layout that wrote the checkpoint")


def _fresh_wrapper_states(wrapper, step: float) -> None:
    """DeepSpeed's wrappers create Adam state lazily at the first step; make it now (zeros at the checkpoint's step
    count) so that the moments can be written into it."""
    for flat in _flat_partitions(wrapper):
        state = wrapper.optimizer.state.get(flat, {})
        # ZeRO 1/2 make their Adam state at start-up (a step on zero gradients): reuse it rather than hold two.
        moments = {k: state[k].zero_() if k in state and state[k].shape == flat.shape else torch.zeros_like(flat)
                   for k in MOMENTS}
        wrapper.optimizer.state[flat] = {"step": _step_tensor(wrapper.optimizer, step, flat.device), **moments}
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO 1/2 and the bf16 optimizer point each parameter at its slice of the state: point them at the new one.
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


@dataclass
class LoadPlan:
    """What a load fills (views of the engine's tensors) and what it must do afterwards."""
    ranges: list[FlatRange]
    finish: list = field(default_factory=list)  # callables run after every range is filled


def destinations(engine, names: dict[int, str], topo: Topology, step: float, with_moments: bool) -> LoadPlan:
    """Every range this rank must fill for a resume: with_moments False (no_load_optim, finetune, a checkpoint saved
    without optimizer state) fills the fp32 weights only and leaves the optimizer fresh."""
    geometry = _Geometry(engine, names, topo)
    wrapper = wrapper_of(engine)
    masters = unfused_masters(engine)
    optimizer = torch_optimizer(engine)
    params = _trained(engine)
    zero3 = any(is_zero3(p) for p in params)
    if wrapper is not None and with_moments and not masters:
        _fresh_wrapper_states(wrapper, step)
    plan = LoadPlan(ranges=[])
    for param in params:
        name, full, band = geometry.describe(param)
        numel = band.numel
        if _fragmented(param):
            mapping = param._hp_mapping
            if mapping is None:
                continue  # the all-gather below brings this rank's copy of it
            start = mapping.lp_fragment_address.start
            views = {WEIGHT: mapping.get_hp_fragment()}
            if with_moments:
                views.update({k: mapping.get_optim_state_fragment(k) for k in MOMENTS})
            plan.ranges.append(FlatRange(name, full, band, start, start + mapping.lp_fragment_address.numel, views))
        elif zero3:
            partitions = {WEIGHT: _zero3_partition(wrapper, param, None)}
            if with_moments:
                partitions.update({k: _zero3_partition(wrapper, param, k) for k in MOMENTS})
            size = partitions[WEIGHT].numel()
            start = wrapper._get_param_partition_rank(param) * size
            stop = min(numel, start + size)
            for partition in partitions.values():
                partition.data[max(stop - start, 0):].zero_()  # the padding of the last piece
            if stop > start:
                plan.ranges.append(FlatRange(name, full, band, start, stop,
                                             {k: p[:stop - start] for k, p in partitions.items()}))
        else:
            master = masters.get(id(param), param)
            views = {WEIGHT: master.detach().reshape(-1)}
            if with_moments:
                state = {"step": _step_tensor(optimizer, step, master.device),
                         **{k: torch.zeros_like(master, memory_format=torch.contiguous_format) for k in MOMENTS}}
                optimizer.state[master] = state
                views.update({k: state[k].reshape(-1) for k in MOMENTS})
            plan.ranges.append(FlatRange(name, full, band, 0, numel, views))
            if master is not param:
                plan.finish.append(_copier(param, master))
    if zero3:
        plan.finish.append(lambda: _zero3_copy_master_to_model(wrapper))
    elif wrapper is not None and hasattr(wrapper, "update_lp_params"):
        plan.finish.append(wrapper.update_lp_params)  # collective over dp: each rank sends the fragments it loaded
    return plan


def _copier(param: torch.nn.Parameter, master: torch.Tensor):
    def copy() -> None:
        with torch.no_grad():
            param.copy_(master.to(param.dtype))
    return copy


def _zero3_copy_master_to_model(wrapper) -> None:
    """ZeRO-3 keeps the module's (possibly 16-bit) partitions apart from the fp32 masters: refresh them, as a step
    does."""
    for group in range(len(wrapper.fp16_groups)):
        wrapper._reassign_or_swap_out_partitioned_parameters(group)
