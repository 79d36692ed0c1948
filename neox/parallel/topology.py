"""The dp x tp x pp process grid, built once per run on DeepSpeed's own topology classes.

Rank layout is DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model; model varies fastest), so
the same topology object can be handed to a PipelineModule and the groups agree with the pipeline engine's.
The grid (DeepSpeed's PipelineParallelGrid) doubles as the `mpu` DeepSpeed asks for: data-parallel group
for gradient reduction, model-parallel (pp x tp) group for the global gradient norm, slice group = tp.
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


def build_topology(tp_size: int, pipe_parallel_size: int, world_size: int | None = None) -> Topology:
    """Collective (every rank creates the same process groups in the same order)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

    world = world_size if world_size is not None else torch.distributed.get_world_size()
    pp_size = max(pipe_parallel_size, 1)
    if tp_size < 1 or world % (tp_size * pp_size):
        raise TopologyError(f"world size {world} is not a multiple of model_parallel_size x pipe stages = "
                            f"{tp_size} x {pp_size}: start a multiple of {tp_size * pp_size} ranks")
    dp_size = world // (tp_size * pp_size)
    ds_topology = PipeModelDataParallelTopology(num_pp=pp_size, num_mp=tp_size, num_dp=dp_size)
    grid = PipelineParallelGrid(topology=ds_topology)
    return Topology(tp_size=tp_size, pp_size=pp_size, dp_size=dp_size, use_pipeline=pipe_parallel_size >= 1,
                    ds_topology=ds_topology, grid=grid)
