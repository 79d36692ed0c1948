"""Expert parallelism in the plan: where a MoE model's experts live and what the token exchange costs per step.

With moe_expert_parallel_size = ep (neox/parallel/expert_parallel.py) each rank holds E/ep experts of every MoE
layer and routes its own micro-batch's T = train_micro_batch_size_per_gpu x seq_length tokens. Per MoE layer and
micro-batch a rank sends each of its T x k (token, chosen expert) assignments as one hidden vector (h elements of
the training dtype) to the rank holding the expert, and gets the expert's output back the same way: two
all_to_all_single exchanges of T k h elements, after one small all-to-all of the E int64 per-expert row counts.
Backward repeats the two exchanges with the gradients (same splits, no count exchange); with checkpoint_activations
the recomputed forward repeats the forward's three. Under uniform routing (ep - 1)/ep of the rows leave the rank;
the rest stay with its own experts. Every tp rank of a data-parallel replica does the same with its ep group, so the
figure is per rank whatever tp is. moe_capacity_factor can only lower it (assignments over capacity are not sent).
"""
from __future__ import annotations

from dataclasses import dataclass

from neox.config.neox_config import NeoXConfig
from neox.plan.memory import DTYPE_BYTES
from neox.plan.params import StageParams

COUNT_BYTES = 8  # the int64 per-expert row counts


@dataclass(frozen=True)
class StageAllToAll:
    """One pipeline stage's expert-parallel traffic: what each of its ranks sends per optimizer step."""

    stage: int
    moe_layers: int
    row_exchanges: int  # per MoE layer per micro-batch: 2 forward + 2 backward (+ 2 recomputed)
    count_exchanges: int  # per MoE layer per micro-batch: 1 (+ 1 recomputed)
    bytes_sent: int  # per rank per optimizer step, the (ep - 1)/ep that leaves the rank


@dataclass(frozen=True)
class ExpertLayout:
    ep: int
    experts_per_rank: int  # E/ep of each MoE layer
    expert_dp: int  # dp/ep: the ranks holding the same experts, over which their gradients are reduced
    tokens: int  # per micro-batch per rank
    stages: tuple[StageAllToAll, ...]

    @property
    def all_to_all_bytes(self) -> int:
        """What the busiest rank sends per optimizer step."""
        return max(stage.bytes_sent for stage in self.stages)


def expert_layout(cfg: NeoXConfig, stages: tuple[StageParams, ...]) -> ExpertLayout | None:
    """None for a model without MoE layers."""
    m, t = cfg.model, cfg.train
    if not m.moe_layer_indices:
        return None
    ep = cfg.parallel.moe_expert_parallel_size
    tokens = t.train_micro_batch_size_per_gpu * m.seq_length
    recompute = int(m.checkpoint_activations)
    rows, counts = 4 + 2 * recompute, 1 + recompute
    per_layer = rows * tokens * m.moe_top_k * m.hidden_size * DTYPE_BYTES[cfg.optim.precision] \
        + counts * m.moe_num_experts * COUNT_BYTES
    return ExpertLayout(
        ep=ep,
        experts_per_rank=m.moe_num_experts // ep,
        expert_dp=cfg.derived.data_parallel_size // ep,
        tokens=tokens,
        stages=tuple(StageAllToAll(stage.index, stage.moe_blocks, rows, counts,
                                   stage.moe_blocks * t.gradient_accumulation_steps * per_layer * (ep - 1) // ep)
                     for stage in stages),
    )
