"""The dp x tp x pp process grid, built once per run on DeepSpeed's own topology classes.

Rank layout is DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model; model varies fastest), so
the same topology object can be handed to a PipelineModule and the groups agree with the pipeline engine's.
The grid (DeepSpeed's PipelineParallelGrid) doubles as the `mpu` DeepSpeed asks for: data-parallel group
for gradient reduction, model-parallel (pp x tp) group for the global gradient norm, slice group = tp.

Expert parallelism (moe_expert_parallel_size = ep) works inside each data-parallel group: its ranks, in data-parallel
order, form groups of ep consecutive ranks that split the experts (the expert-parallel group: tokens are exchanged
within it), and the ranks at the same position of those groups hold the same experts (the expert-data-parallel group:
the experts' gradients are averaged over it). DeepSpeed's layout (utils/groups.py, expert parallel before data
parallel), registered in its group tables under its name `ep_size_{ep}`, so that its engine and ZeRO optimizers
reduce and partition the expert parameters (marked by neox/parallel/expert_parallel.py) over the right ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from neox.config.errors import ConfigError
from neox.config.model import ModelConfig


class TopologyError(ConfigError):
    pass


@dataclass(frozen=True)
class Topology:
    tp_size: int
    pp_size: int  # pipeline stages (1 when the pipeline engine is off)
    dp_size: int
    use_pipeline: bool  # pipe_parallel_size >= 1: DeepSpeed's PipelineEngine, even with one stage
    ds_topology: Any  # deepspeed PipeModelDataParallelTopology
    grid: Any  # deepspeed PipelineParallelGrid; the `mpu`
    ep_size: int = 1  # moe_expert_parallel_size
    ep_group: Any = None  # this rank's expert-parallel group (None with ep 1)
    expert_dp_group: Any = None  # the ranks holding this rank's experts (None with ep 1: the dp group)

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep_size

    @property
    def expert_dp_size(self) -> int:
        return self.dp_size // self.ep_size

    @property
    def expert_dp_rank(self) -> int:
        return self.dp_rank // self.ep_size

    @property
    def rank(self) -> int:
        return self.grid.global_rank

    @property
    def dp_rank(self) -> int:
        return self.grid.get_data_parallel_rank()

    @property
    def tp_rank(self) -> int:
        return self.grid.get_slice_parallel_rank()

    @property
    def pp_rank(self) -> int:
        return self.grid.get_stage_id()

    @property
    def tp_group(self):
        return self.grid.get_slice_parallel_group()

    @property
    def dp_group(self):
        return self.grid.get_data_parallel_group()

    @property
    def model_group(self):
        """Every rank holding a piece of the same model replica (pp x tp)."""
        return self.grid.get_model_parallel_group()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def check_model_divides(model: ModelConfig, tp_size: int, pp_size: int) -> None:
    """Raise a TopologyError naming the config key when the model cannot be split tp x pp ways."""
    checks = [
        ("num_attention_heads", model.num_attention_heads, tp_size),
        ("num_kv_heads (key/value heads)", model.kv_heads, tp_size),
    ]
    if len(model.moe_layer_indices) < model.num_layers:  # some layer has a dense MLP
        checks.append(("the MLP inner size (intermediate_size)", model.mlp_inner_size, tp_size))
    if model.padded_vocab_size is not None:
        checks.append(("padded_vocab_size", model.padded_vocab_size, tp_size))
    if model.moe_layer_indices:  # every expert (and the shared expert) is split as the dense MLP is
        checks.append(("the experts' inner width (moe_intermediate_size)", model.expert_inner_size, tp_size))
        if model.moe_num_shared_experts:
            checks.append(("the shared expert's inner width (moe_shared_expert_intermediate_size)",
                           model.shared_expert_inner_size, tp_size))
    for name, value, parts in checks:
        if value % parts:
            raise TopologyError(f"model_parallel_size {tp_size} must divide {name} = {value}: choose a "
                                f"model_parallel_size that divides it (or change the model)")
    if pp_size > model.num_layers:
        raise TopologyError(f"pipe_parallel_size {pp_size} exceeds num_layers {model.num_layers}: every pipeline "
                            "stage needs at least one transformer layer")


def expert_group_name(ep_size: int) -> str:
    """The name DeepSpeed gives the expert groups of this size, which its engine looks parameters' group_name up in."""
    return f"ep_size_{ep_size}"


def build_topology(tp_size: int, pipe_parallel_size: int, world_size: int | None = None,
                   ep_size: int = 1) -> Topology:
    """Collective (every rank creates the same process groups in the same order)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

    world = world_size if world_size is not None else torch.distributed.get_world_size()
    pp_size = max(pipe_parallel_size, 1)
    if tp_size < 1 or world % (tp_size * pp_size):
        raise TopologyError(f"world size {world} is not a multiple of model_parallel_size x pipe stages = "
                            f"{tp_size} x {pp_size}: start a multiple of {tp_size * pp_size} ranks")
    dp_size = world // (tp_size * pp_size)
    if ep_size < 1 or dp_size % ep_size:
        raise TopologyError(f"moe_expert_parallel_size {ep_size} must divide the data-parallel size {dp_size} "
                            f"(world size {world} / (model_parallel_size {tp_size} x pipe stages {pp_size}))")
    ds_topology = PipeModelDataParallelTopology(num_pp=pp_size, num_mp=tp_size, num_dp=dp_size)
    grid = PipelineParallelGrid(topology=ds_topology)
    ep_group = expert_dp_group = None
    if ep_size > 1:
        ep_group, expert_dp_group = _expert_groups(ds_topology.get_axis_comm_lists("data"), ep_size)
    return Topology(tp_size=tp_size, pp_size=pp_size, dp_size=dp_size, use_pipeline=pipe_parallel_size >= 1,
                    ds_topology=ds_topology, grid=grid, ep_size=ep_size, ep_group=ep_group,
                    expert_dp_group=expert_dp_group)


def topology_for(parallel) -> Topology:
    """The topology a run's ParallelConfig asks for (collective)."""
    return build_topology(parallel.model_parallel_size, parallel.pipe_parallel_size,
                          ep_size=parallel.moe_expert_parallel_size)


def _expert_groups(dp_lists: list[list[int]], ep_size: int):
    """Create every expert-parallel and expert-data-parallel group (collective: all ranks, same order), register
    this rank's in DeepSpeed's group tables, and return them."""
    from deepspeed.utils import groups

    rank = torch.distributed.get_rank()
    name = expert_group_name(ep_size)
    mine: dict[str, tuple[Any, list[int]]] = {}
    for dp_ranks in dp_lists:
        for start in range(0, len(dp_ranks), ep_size):
            ranks = dp_ranks[start:start + ep_size]
            group = torch.distributed.new_group(ranks)
            if rank in ranks:
                mine["ep"] = (group, ranks)
        for offset in range(ep_size):
            ranks = dp_ranks[offset::ep_size]
            group = torch.distributed.new_group(ranks)
            if rank in ranks:
                mine["edp"] = (group, ranks)
    groups._EXPERT_PARALLEL_GROUP[name], groups._EXPERT_PARALLEL_GROUP_RANKS[name] = mine["ep"]
    groups._EXPERT_DATA_PARALLEL_GROUP[name], groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = mine["edp"]
    return mine["ep"][0], mine["edp"][0]
