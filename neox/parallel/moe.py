"""A MoE block under tensor parallelism, and the aux-loss gradient scale the DeepSpeed engines set.

Tensor parallelism splits every expert as the dense MLP is split (neox/parallel/sharding.py: linear1 and gate by
their output rows, linear2 by its input columns), rather than giving whole experts to the model-parallel ranks as
gpt-neox does: distributing experts is expert parallelism's job (neox/parallel/expert_parallel.py, over data-parallel
ranks), and this way tp keeps its meaning (every rank holds 1/tp of every matrix) and composes with it. Every tp
rank routes every token itself: the block's input and the router are replicated, so all ranks choose the same
experts. Each rank computes its
slice of every chosen expert's hidden units, weights its partial outputs, and the partial sums are added over tp.
Two copy_to_tp's make the gradients whole: the experts' input (each rank's input gradient covers only its slice)
and the routing weights (each rank's weight gradient sees only its slice of the expert outputs). The router's own
input is not copied: its gradient is already the whole value on every rank. The shared expert is a dense MLP,
split by the name tables like any other.
"""
from __future__ import annotations

import torch
from torch import nn

from neox.model.moe import Experts, MoE
from neox.parallel.sharding import tp_split_dim
from neox.parallel.tensor import copy_to_tp, mark_parallel, reduce_from_tp


class TensorParallelExperts(Experts):
    """Experts holding this tp rank's slice of every expert's hidden units (the full module's weights sliced)."""

    def __init__(self, full: Experts, group, tp_rank: int, tp_size: int):
        nn.Module.__init__(self)
        self.num_experts, self.activation, self.dispatcher = full.num_experts, full.activation, full.dispatcher
        self.linear1, self.gate, self.linear2 = full.linear1, full.gate, full.linear2
        for name in ("linear1", "gate", "linear2"):
            projection = getattr(self, name)
            if projection is None:
                continue
            dim = tp_split_dim(f"mlp.experts.{name}.weight")
            size = projection.weight.shape[dim] // tp_size
            shard = projection.weight.data.narrow(dim, tp_rank * size, size).clone()
            projection.weight = mark_parallel(nn.Parameter(shard), True, tp_rank)
        self.group = group

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                capacity: int | None = None) -> tuple[torch.Tensor, int]:
        out, dropped = super().forward(copy_to_tp(x, self.group), copy_to_tp(weights, self.group), experts,
                                       capacity)
        return reduce_from_tp(out, self.group), dropped


def shard_moe(moe: MoE, group, tp_rank: int, tp_size: int) -> None:
    """In place: the block's experts become this tp rank's slices (the shared expert's linears are swapped by
    name with the dense MLP's, in neox/parallel/parallelize.py)."""
    moe.experts = TensorParallelExperts(moe.experts, group, tp_rank, tp_size)


def backward_scale(engine) -> float:
    """What DeepSpeed's engine.backward multiplies a micro-batch loss by before backward: 1 / gradient accumulation
    steps, times the loss scale of its ZeRO / fp16 optimizer or of torch's autocast grad scaler (as engine.scale
    computes it). A pipeline's earlier stages receive gradients already scaled by it."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    probe = torch.ones((), requires_grad=True) * 1.0  # a one-element tensor with a grad_fn: what a loss is
    scaled = probe
    if isinstance(engine.optimizer, ZeROOptimizer):
        scaled = engine.optimizer.scale_if_loss(probe)
    elif getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        scaled = engine.torch_autocast_z0_gradscaler.scale(probe.to(engine.device))
    return float(scaled.detach()) / engine.gradient_accumulation_steps()


class AuxLossScale:
    """Gives a model's MoE blocks, before each training step, the gradient scale the step's loss will get (their
    aux losses then weigh what their coefficients say, whatever the accumulation or loss scaling). A no-op without
    MoE layers. Works on the module DeepSpeed wraps, pipeline stages included (they run these very blocks)."""

    def __init__(self, model: nn.Module):
        self.blocks = [module for module in model.modules() if isinstance(module, MoE)]

    def before_step(self, engine) -> None:
        if self.blocks:
            scale = backward_scale(engine)
            for block in self.blocks:
                block.aux_loss_scale = scale
