"""Activation checkpointing as gpt-neox sets it up: DeepSpeed's checkpoint function, configured by the model keys.

With checkpoint_activations, GPTNeoX recomputes runs of checkpoint_num_layers blocks in backward through its
`activation_checkpoint` function (torch.utils.checkpoint by default). gpt-neox configures deepspeed.checkpointing
once per process (partition_activations across the tensor-parallel ranks, contiguous buffers, CPU copies, device
syncs, profiling timers) and recomputes through it; with deepspeed_activation_checkpointing (gpt-neox's default) so
does this. None of these options changes a number: the recomputed forward replays the saved RNG states.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

from neox.config.model import ModelConfig
from neox.parallel.topology import Topology

_log = logging.getLogger("neox.parallel")


@dataclass(frozen=True)
class TensorParallelMPU:
    """The `mpu` deepspeed.checkpointing.configure reads: partitioned activations are split over the tp group."""

    topo: Topology

    def get_model_parallel_rank(self) -> int:
        return self.topo.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.topo.tp_size

    def get_model_parallel_group(self):
        return self.topo.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.topo.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topo.dp_size

    def get_data_parallel_group(self):
        return self.topo.dp_group


def checkpoint_function(model_cfg: ModelConfig, topo: Topology | None,
                        sequence_parallel: bool = False) -> Callable[..., Any] | None:
    """The function that recomputes a run of layers, configured for this process; None for torch's default
    (checkpointing off, or deepspeed_activation_checkpointing false). sequence_parallel: the saved block inputs are
    already this rank's 1/tp of the sequence, which is what partition_activations would make of them; DeepSpeed's
    partitioning would take 1/tp of that and rebuild it from the other ranks' (different) shards, so it is off."""
    if not (model_cfg.checkpoint_activations and model_cfg.deepspeed_activation_checkpointing):
        return None
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    partition = model_cfg.partition_activations
    if partition and sequence_parallel:
        _log.warning("partition_activations: with sequence_parallel each rank's checkpointed layer inputs are already "
                     "its 1/model_parallel_size of the sequence, so they are kept as they are (the same memory)")
        partition = False
    in_cpu = model_cfg.checkpoint_in_cpu
    if in_cpu and get_accelerator().device_name() == "cpu" and not partition:
        # The activations already live in CPU memory; DeepSpeed's unpartitioned CPU copy is then a no-op copy that
        # it goes on to free, losing the saved input (DeepSpeed 0.19 on the CPU accelerator).
        _log.warning("checkpoint_in_cpu: the device is the CPU, so the checkpoints stay where they are")
        in_cpu = False
    chunks = math.ceil(model_cfg.num_layers / model_cfg.checkpoint_num_layers)
    deepspeed.checkpointing.configure(
        TensorParallelMPU(topo) if topo is not None else None,
        partition_activations=partition,
        contiguous_checkpointing=model_cfg.contiguous_checkpointing and partition,  # buffers of the partitions
        num_checkpoints=chunks,
        checkpoint_in_cpu=in_cpu,
        synchronize=model_cfg.synchronize_each_layer,
        profile=model_cfg.profile_backward,
    )
    return deepspeed.checkpointing.checkpoint


def install_activation_checkpointing(model, model_cfg: ModelConfig, topo: Topology | None,
                                     sequence_parallel: bool = False) -> Callable | None:
    """Configure and give `model` (a GPTNeoX) the checkpoint function; returns it (None: torch's, unchanged)."""
    function = checkpoint_function(model_cfg, topo, sequence_parallel)
    if function is not None:
        model.activation_checkpoint = function
    return function


def reset_after_forward_only(model_cfg: ModelConfig) -> None:
    """After forwards without a backward (evaluation): drop the contiguous checkpoint buffers, as gpt-neox's
    evaluate() does, so they do not pile up."""
    if model_cfg.checkpoint_activations and model_cfg.deepspeed_activation_checkpointing:
        import deepspeed

        deepspeed.checkpointing.reset()
