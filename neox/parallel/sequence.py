"""Sequence-parallel collectives (Megatron-LM, arXiv 2205.05198): the residual stream split along the sequence.

Under sequence parallelism each tp rank holds positions [r s/tp, (r+1) s/tp) of the activations between the
tensor-parallel matrices ([batch, seq, ...], sequence dim 1). Four conjugate pairs move between that and the full
sequence; each forward is the other's backward:

- scatter_to_sequence: keep this rank's positions (backward all-gathers the gradients) - a replicated activation
  (the embedding output) enters the sharded stream;
- gather_from_sequence: all-gather (backward reduce-scatters: every rank's use of the full sequence contributed
  part of each position's gradient) - the input of a layer split otherwise (the row-parallel head);
- reduce_scatter_to_sequence: sum the ranks' partial results and keep this rank's positions (backward all-gathers)
  - after a row-parallel matrix, in place of tensor parallelism's all-reduce;
- gathered_linear: all-gather then a column-parallel matrix, saving only this rank's positions for backward, which
  gathers them again (Megatron's trade: one more all-gather instead of holding the full input per layer).

The all-gather + reduce-scatter pair moves the same bytes as the all-reduce it replaces.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

SEQ_DIM = 1


def _world(group) -> int:
    return dist.get_world_size(group)


def _check_divides(x: torch.Tensor, size: int) -> None:
    if x.shape[SEQ_DIM] % size:
        raise ValueError(f"sequence_parallel: a sequence of {x.shape[SEQ_DIM]} positions does not split over "
                         f"{size} tensor-parallel ranks; feed sequences whose length model_parallel_size divides")


def _split(x: torch.Tensor, group) -> torch.Tensor:
    size = _world(group)
    _check_divides(x, size)
    return x.chunk(size, dim=SEQ_DIM)[dist.get_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_world(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=SEQ_DIM)


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    size = _world(group)
    _check_divides(x, size)
    parts = [part.contiguous() for part in x.chunk(size, dim=SEQ_DIM)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _Conjugate(torch.autograd.Function):
    """forward_fn on the activation, backward_fn on its gradient (each pair below is the other's adjoint)."""

    @staticmethod
    def forward(ctx, x, group, forward_fn, backward_fn):
        ctx.group, ctx.backward_fn = group, backward_fn
        return forward_fn(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_fn(grad, ctx.group), None, None, None


class _GatheredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(_all_gather(x, group), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _reduce_scatter(grad.matmul(weight), ctx.group)
        if ctx.needs_input_grad[1] or ctx.has_bias:
            rows = grad.reshape(-1, grad.shape[-1])
            if ctx.needs_input_grad[1]:
                full = _all_gather(x, ctx.group)
                grad_weight = rows.t().mm(full.reshape(-1, full.shape[-1]))
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias, None


def scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _Conjugate.apply(x, group, _split, _all_gather)


def gather_from_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _Conjugate.apply(x, group, _all_gather, _reduce_scatter)


def gather_for_replicated(x: torch.Tensor, group) -> torch.Tensor:
    """Every position on every rank, for a replicated layer that then computes the same on each rank (a reward
    model's value head): backward keeps this rank's positions of the gradient, with no sum (all ranks hold it whole)."""
    return _Conjugate.apply(x, group, _all_gather, _split)


def reduce_scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _Conjugate.apply(x, group, _reduce_scatter, _all_gather)


def gathered_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group) -> torch.Tensor:
    """F.linear(gather_from_sequence(x), weight, bias), holding only x (this rank's positions) for backward."""
    return _GatheredLinear.apply(x, weight, bias, group)
