"""Expert parallelism: a MoE block's routed experts split over the ranks of an expert-parallel group, tokens sent to
their experts' ranks and back by all-to-all (neox/parallel/topology.py builds the groups).

Layout: of E experts, the r-th rank of a group of ep holds experts [r E/ep, (r+1) E/ep): dim 0 of every expert
tensor [E, inner, hidden] (neox/model/moe.py), after any tensor-parallel split of dim 1. Each rank routes its own
tokens over all E experts as before; the dispatch (ExpertParallelDispatch, in place of the block's SortedDispatch)
then
1. sorts the assignments by expert as the single-device dispatch does: since a rank's experts are consecutive, the
   sorted rows are already grouped by destination rank;
2. exchanges the per-expert row counts (one small all-to-all), then the rows (all_to_all_single with those splits);
3. regroups the received rows by local expert (source ranks in order within each expert), so that the experts run
   as grouped matmuls over contiguous slices, exactly as on one device;
and the combine reverses it: rows back to source order, all-to-all back, then the single-device combine (routing
weights, each token's k choices summed in choice order). Autograd runs the same exchanges backwards.

Gradients: each rank's expert gradients already hold every token of its expert-parallel group routed to its experts
(the backward all-to-all brings them). The parameters are marked as DeepSpeed marks its own MoE parameters
(`allreduce = False`, `group_name`), so its engine (ZeRO 0) and ZeRO 1/2 optimizers reduce them over the
expert-data-parallel group, divided by the whole data-parallel size: the same mean over the global batch as every
other parameter's. DeepSpeed does that only when its engine finds one of its own MoE layers in the model; a
parameter-free DeepSpeedMoEMarker module tells it. The capacity (moe_capacity_factor) is applied on each rank's
tokens before they are sent, as without expert parallelism.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from neox.model.moe import Dispatched, Experts, MoE, SortedDispatch
from neox.parallel.topology import Topology, expert_group_name

# The tensors of a MoE block that expert parallelism splits along dim 0 (its experts).
EXPERT_TENSORS = ("mlp.experts.linear1.weight", "mlp.experts.gate.weight", "mlp.experts.linear2.weight")


def is_expert_tensor(name: str) -> bool:
    return any(name == n or name.endswith("." + n) for n in EXPERT_TENSORS)


class _AllToAll(torch.autograd.Function):
    """Rows of x: send_splits[j] of them to rank j of group; returns the rows received, recv_splits[j] from rank j.
    Backward sends the gradients the opposite way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.send_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return out, None, None, None


@dataclass
class ExchangedDispatch:
    """Rows received for this rank's experts, grouped by local expert, and how to send the results back."""

    tokens: torch.Tensor  # [S, H]: counts[0] rows for the first local expert, then the next ...
    counts: list[int]  # rows per local expert (from every source rank)
    dropped: int  # this rank's assignments cut by the capacity
    local: Dispatched  # this rank's own sorted assignments (what the combine undoes)
    to_source_order: torch.Tensor  # [S] int64: row i of the source-ordered rows is row to_source_order[i] here
    send_splits: list[int]  # rows this rank sent to each rank of the group
    recv_splits: list[int]  # rows it received from each


def _expert_major_order(received: torch.Tensor) -> torch.Tensor:
    """received [sources, local experts]: row counts in arrival order (source-major). The index that reads the
    arrived rows expert-major (expert 0 from source 0, 1, ..., then expert 1 ...)."""
    sources, experts = received.shape
    lengths = received.reshape(-1)
    arrived_at = torch.cumsum(lengths, 0) - lengths  # where each (source, expert) block arrived
    new_lengths = received.t().reshape(-1)
    new_at = torch.cumsum(new_lengths, 0) - new_lengths
    old_at = arrived_at.view(sources, experts).t().reshape(-1)
    shift = torch.repeat_interleave(old_at - new_at, new_lengths)
    return torch.arange(int(lengths.sum()), device=received.device) + shift


class ExpertParallelDispatch:
    """SortedDispatch across an expert-parallel group (see the module docstring)."""

    def __init__(self, group, ep_size: int):
        self.group, self.ep_size = group, ep_size
        self.sorted = SortedDispatch()

    def dispatch(self, x: torch.Tensor, experts: torch.Tensor, num_experts: int,
                 capacity: int | None = None) -> ExchangedDispatch:
        local = self.sorted.dispatch(x, experts, num_experts, capacity)
        # On the tokens' device: NCCL exchanges device tensors only.
        per_rank = torch.tensor(local.counts, dtype=torch.int64, device=x.device).view(self.ep_size,
                                                                                        num_experts // self.ep_size)
        received = torch.empty_like(per_rank)
        dist.all_to_all_single(received, per_rank, group=self.group)
        send_splits, recv_splits = per_rank.sum(1).tolist(), received.sum(1).tolist()
        arrived = _AllToAll.apply(local.tokens, send_splits, recv_splits, self.group)
        order = _expert_major_order(received)
        to_source_order = torch.empty_like(order)
        to_source_order[order] = torch.arange(order.numel(), device=order.device)
        # index_select, not [] indexing: its backward is an index_add, far cheaper than [] 's accumulating index_put.
        return ExchangedDispatch(arrived.index_select(0, order), received.sum(0).tolist(), local.dropped, local,
                                 to_source_order, send_splits, recv_splits)

    def combine(self, y: torch.Tensor, dispatched: ExchangedDispatch, weights: torch.Tensor) -> torch.Tensor:
        back = _AllToAll.apply(y.index_select(0, dispatched.to_source_order), dispatched.recv_splits,
                               dispatched.send_splits, self.group)
        return self.sorted.combine(back, dispatched.local, weights)


@functools.cache
def _deepspeed_moe_marker_class():
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class DeepSpeedMoEMarker(DeepSpeedMoE):
        """No parameters, no forward: its presence makes DeepSpeed's engine treat the model as having MoE layers
        (it looks for instances of its own MoE class), so that it reduces and partitions the parameters marked
        allreduce=False over their expert-data-parallel group. The groups exist already (neox/parallel/topology.py)."""

        def __init__(self, num_experts: int, ep_size: int):
            nn.Module.__init__(self)
            self.num_experts, self.ep_size = num_experts, ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = expert_group_name(ep_size)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedMoEMarker only marks a model for DeepSpeed; it is never called")

    return DeepSpeedMoEMarker


def shard_experts(experts: Experts, ep_rank: int, ep_size: int) -> None:
    """In place: keep experts [ep_rank E/ep, (ep_rank + 1) E/ep) of every projection (a meta tensor stays meta, at
    the local shape: neox/parallel/materialize.py fills it with the same rows of the initial value)."""
    local = experts.num_experts // ep_size
    for projection in (experts.linear1, experts.gate, experts.linear2):
        if projection is None:
            continue
        old = projection.weight
        shard = old.data.narrow(0, ep_rank * local, local)
        new = nn.Parameter(shard if shard.is_meta else shard.clone(), requires_grad=old.requires_grad)
        new.__dict__.update(vars(old))  # tensor-parallel marks
        projection.weight = new


def mark_expert_params(experts: Experts, ep_size: int) -> None:
    for param in experts.parameters():
        param.allreduce = False  # DeepSpeed: reduced over the expert-data-parallel group, not the data-parallel one
        param.group_name = expert_group_name(ep_size)
        param.neox_expert_parallel = True


def apply_expert_parallel(model: nn.Module, topo: Topology) -> int:
    """In place: every MoE block of the model keeps this rank's experts and exchanges tokens over the
    expert-parallel group; returns how many blocks. Run after tensor parallelism (which splits dim 1)."""
    if topo.ep_size == 1:
        return 0
    blocks = list(dict.fromkeys(m for m in model.modules() if isinstance(m, MoE)))
    marker_class = _deepspeed_moe_marker_class()
    for block in blocks:
        if block.num_experts % topo.ep_size:
            raise ValueError(f"moe_expert_parallel_size {topo.ep_size} does not divide moe_num_experts "
                             f"{block.num_experts}")
        shard_experts(block.experts, topo.ep_rank, topo.ep_size)
        mark_expert_params(block.experts, topo.ep_size)
        block.experts.dispatcher = ExpertParallelDispatch(topo.ep_group, topo.ep_size)
        block.deepspeed_moe_marker = marker_class(block.num_experts, topo.ep_size)
    return len(blocks)
