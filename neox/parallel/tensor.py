"""Megatron-style tensor-parallel layers over one process group (the tp group of the grid).

Two conjugate collectives carry everything: `copy_to_tp` (identity forward, all-reduce of the gradient
backward) where a replicated activation enters sharded weights, and `reduce_from_tp` (all-reduce forward,
identity backward) where partial results leave them. Each layer is made from the single-device layer's full
weight and keeps only this rank's slice, so a parallel model starts bit-identical to the single-device one.
Small per-head tables (qk norm, T5 bias) stay whole on every rank and are sliced per use (`local_heads`).

With `sequence_parallel` set (by neox/parallel/parallelize.py) the activations outside the matrices hold only this
rank's positions of the sequence: column-parallel layers and the heads gather them first, row-parallel layers
reduce-scatter their output instead of all-reducing it (neox/parallel/sequence.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from neox.model.norms import QKNorm
from neox.model.positions import RelativePositionBias
from neox.parallel.sequence import gather_from_sequence, gathered_linear, reduce_scatter_to_sequence


def _world(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _world(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _world(group) == 1 else _ReduceFromTP.apply(x, group)


def column_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group,
                  sequence_parallel: bool) -> torch.Tensor:
    """A column-parallel matrix (this rank's output rows) on the whole activation: replicated on every tp rank, or
    gathered from the ranks' sequence shards."""
    if sequence_parallel:
        return gathered_linear(x, weight, bias, group)
    return F.linear(copy_to_tp(x, group), weight, bias)


def shard_rows(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    rows = t.shape[0] // size
    return t[rank * rows : (rank + 1) * rows].clone()


def shard_cols(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    cols = t.shape[1] // size
    return t[:, rank * cols : (rank + 1) * cols].clone()


def mark_parallel(param: nn.Parameter, sharded: bool, tp_rank: int, split_dim: int | None = None) -> nn.Parameter:
    # `model_parallel` is the attribute DeepSpeed's gradient-norm code reads: a parameter counts on this rank when
    # it is a shard, or when this is tp rank 0 (a tp-replicated parameter is counted once per model replica).
    param.neox_tp_sharded = sharded
    param.model_parallel = sharded or tp_rank == 0
    if split_dim is not None:
        # A split other than the sharding plan's for this name (the row-parallel head): materialize and
        # checkpoints slice by it.
        param.neox_tp_split_dim = split_dim
    return param


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local, W split along its output rows; the output stays sharded."""

    sequence_parallel = False

    def __init__(self, full: nn.Linear, group, tp_rank: int, tp_size: int):
        super().__init__()
        self.group = group
        self.weight = mark_parallel(nn.Parameter(shard_rows(full.weight.data, tp_rank, tp_size)), True, tp_rank)
        self.bias = (None if full.bias is None
                     else mark_parallel(nn.Parameter(shard_rows(full.bias.data, tp_rank, tp_size)), True, tp_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_linear(x, self.weight, self.bias, self.group, self.sequence_parallel)


class RowParallelLinear(nn.Module):
    """y = sum_ranks x_local W_local^T + b, W split along its input columns; the bias is replicated."""

    sequence_parallel = False

    def __init__(self, full: nn.Linear, group, tp_rank: int, tp_size: int):
        super().__init__()
        self.group = group
        self.weight = mark_parallel(nn.Parameter(shard_cols(full.weight.data, tp_rank, tp_size)), True, tp_rank)
        self.bias = None if full.bias is None else mark_parallel(nn.Parameter(full.bias.data.clone()), False, tp_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            out = reduce_from_tp(F.linear(x, self.weight), self.group)
            return out if self.bias is None else out + self.bias
        out = reduce_scatter_to_sequence(F.linear(x, self.weight), self.group)
        # The bias meets only this rank's positions: copy_to_tp sums its gradient over the ranks.
        return out if self.bias is None else out + copy_to_tp(self.bias, self.group)


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_end) of the table on this rank; other ids contribute zeros, summed over tp."""

    def __init__(self, full: nn.Embedding, group, tp_rank: int, tp_size: int):
        super().__init__()
        self.group = group
        rows = full.weight.shape[0] // tp_size
        self.vocab_start, self.vocab_end = tp_rank * rows, (tp_rank + 1) * rows
        self.weight = mark_parallel(nn.Parameter(shard_rows(full.weight.data, tp_rank, tp_size)), True, tp_rank)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)


class VocabParallelHead(nn.Module):
    """Logits for this rank's vocabulary slice only; the weight may be the vocab-parallel embedding's (tied)."""

    sequence_parallel = False

    def __init__(self, weight: nn.Parameter, group, vocab_start: int):
        super().__init__()
        self.group = group
        self.vocab_start = vocab_start
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_linear(x, self.weight, None, self.group, self.sequence_parallel)


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                                 group, half_precision: bool = False) -> torch.Tensor:
    """Per-token cross entropy (fp32, or the logits' dtype with half_precision: fp16_lm_cross_entropy) from
    vocab-sharded logits [..., V/tp]; only [...]-shaped tensors are all-reduced, never the logits themselves."""
    logits = local_logits if half_precision else local_logits.float()
    with torch.no_grad():
        global_max = logits.max(dim=-1).values
        if _world(group) > 1:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - global_max.unsqueeze(-1)
    sum_exp = reduce_from_tp(shifted.exp().sum(dim=-1), group)
    local_vocab = logits.shape[-1]
    outside = (labels < vocab_start) | (labels >= vocab_start + local_vocab)
    local_labels = (labels - vocab_start).masked_fill(outside, 0)
    target = shifted.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
    target = reduce_from_tp(target, group)
    return sum_exp.log() - target


def vocab_parallel_lm_loss(local_logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None,
                           vocab_start: int, group, half_precision: bool = False) -> torch.Tensor:
    """causal_lm_loss (neox.model) for vocab-sharded logits: mean over the unmasked positions."""
    losses = vocab_parallel_cross_entropy(local_logits, labels, vocab_start, group, half_precision).flatten().float()
    if loss_mask is None:
        return losses.mean()
    weights = loss_mask.flatten().to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)


class _AllReduceBothWays(torch.autograd.Function):
    """Sum over tp in forward and in backward: for a partial statistic (a sum over this rank's heads) whose total
    each rank then uses in its own way, so the total's gradient is the sum of every rank's."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    """This rank's slice of the last dim of a replicated activation; backward gathers the slices' gradients."""

    @staticmethod
    def forward(ctx, x, group, rank, size):
        ctx.group, ctx.size = group, size
        return x.chunk(size, dim=-1)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        parts = [torch.empty_like(grad) for _ in range(ctx.size)]
        dist.all_gather(parts, grad.contiguous(), group=ctx.group)
        return torch.cat(parts, dim=-1), None, None, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    return x if _world(group) == 1 else _AllReduceBothWays.apply(x, group)


def local_heads(weight: torch.Tensor, group, tp_rank: int, tp_size: int, dim: int) -> torch.Tensor:
    """This rank's slice (along `dim`, by heads) of a tp-replicated parameter that every rank holds whole: each rank's
    gradient then covers only its slice, and copy_to_tp sums them so every copy gets the whole gradient."""
    return copy_to_tp(weight, group).chunk(tp_size, dim=dim)[tp_rank]


class ParallelQKNorm(QKNorm):
    """QKNorm on this rank's heads: the weights stay whole on every rank (replicated, sliced per use), and a
    LayerNorm's statistics, which span all heads of a token, are summed over the tp group."""

    def __init__(self, full: QKNorm, group, tp_rank: int, tp_size: int):
        nn.Module.__init__(self)
        self.kind, self.eps, self.total_heads = full.kind, full.eps, full.total_heads
        self.weight, self.bias, self.g = full.weight, full.bias, full.g
        self.group, self.tp_rank, self.tp_size = group, tp_rank, tp_size

    def stat_sum(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(x, self.group)

    def head_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        def local(t):
            return None if t is None else local_heads(t, self.group, self.tp_rank, self.tp_size, 0)
        return local(self.weight), local(self.bias)

    def gain(self) -> torch.Tensor:
        return copy_to_tp(self.g, self.group)


class ParallelRelativePositionBias(RelativePositionBias):
    """The T5 bias of this rank's heads (gpt-neox splits the table by heads the same way); the table stays whole on
    every rank."""

    def __init__(self, full: RelativePositionBias, group, tp_rank: int, tp_size: int):
        nn.Module.__init__(self)
        self.num_buckets, self.max_distance, self.scale = full.num_buckets, full.max_distance, full.scale
        self.weight = full.weight
        self.group, self.tp_rank, self.tp_size = group, tp_rank, tp_size

    def head_table(self) -> torch.Tensor:
        return local_heads(self.weight, self.group, self.tp_rank, self.tp_size, 1)


class RowParallelHead(nn.Module):
    """Untied output head split over the hidden dim (output_layer_parallelism 'row'): each rank multiplies its slice
    of the hidden state by its columns of the weight, the partial logits are summed over tp, so every rank holds the
    full logits (a plain cross entropy follows)."""

    sequence_parallel = False

    def __init__(self, full_weight: torch.Tensor, group, tp_rank: int, tp_size: int):
        super().__init__()
        self.group, self.tp_rank, self.tp_size = group, tp_rank, tp_size
        self.weight = mark_parallel(nn.Parameter(shard_cols(full_weight.data, tp_rank, tp_size)), True, tp_rank,
                                    split_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            # This rank's hidden columns of every position: a plain slice, whose gradient (zero outside the
            # columns) the gather's reduce-scatter sums over the ranks. Copied, so the full gather is not kept.
            local = gather_from_sequence(x, self.group).chunk(self.tp_size, dim=-1)[self.tp_rank].contiguous()
        elif self.tp_size > 1:
            local = _ScatterToTP.apply(x, self.group, self.tp_rank, self.tp_size)
        else:
            local = x
        return reduce_from_tp(F.linear(local, self.weight), self.group)
