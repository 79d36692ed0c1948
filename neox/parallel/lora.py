"""Tensor-parallel LoRA layers: each adapter split consistently with its base layer, so the math is one device's.

Column-parallel base (output rows split: query_key_value, linear1, gate): B [out, r] is split along its rows with
W, A [r, in] stays whole on every rank. Each rank computes h = x A^T (whole) and its rows h B_local^T; A's gradient
is the sum of every rank's part (copy_to_tp on A), the input's gradient the sum as for W.

Row-parallel base (input columns split: dense, linear2): A is split along its input columns with W, B stays whole.
Each rank computes its partial x_local A_local^T; the r-wide partial sums are added over tp (reduce_from_tp, far
smaller than adding the output), then multiplied by B on every rank.

Under sequence parallelism the adapters move between the sequence shards as their bases do (gather before the
column-parallel product, reduce-scatter after the row-parallel one), and the replicated factor that then sees only
this rank's positions (B of a row-parallel layer) gets its gradient summed over tp.

Dropout: on a column-parallel layer's replicated input the shared default stream (every rank draws the same mask, as
one device would); on inputs that differ per rank (a row-parallel layer's columns, sequence shards) a stream per tp
rank (neox/parallel/rng.py), as attention dropout does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox.config.errors import ConfigError
from neox.model.lora import LoraLinear
from neox.parallel.rng import tp_rank_stream
from neox.parallel.sequence import gathered_linear, reduce_scatter_to_sequence
from neox.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, copy_to_tp, mark_parallel,
                                  reduce_from_tp, shard_cols, shard_rows)


class _Adapter:
    """What both parallel LoRA layers share: their settings, and dropout in the stream their input calls for."""

    def _adopt(self, full: LoraLinear, tp_rank: int, tp_size: int) -> None:
        self.scaling, self.lora_dropout = full.scaling, full.lora_dropout
        self.tp_rank, self.tp_size = tp_rank, tp_size

    def _dropped(self, x: torch.Tensor, per_rank: bool) -> torch.Tensor:
        if not (self.lora_dropout and self.training):
            return x
        if not per_rank:
            return F.dropout(x, self.lora_dropout)
        with tp_rank_stream(self.tp_rank, self.tp_size, x.device):
            return F.dropout(x, self.lora_dropout)


class LoraColumnParallelLinear(_Adapter, ColumnParallelLinear):
    def __init__(self, full: LoraLinear, group, tp_rank: int, tp_size: int):
        super().__init__(full, group, tp_rank, tp_size)
        self._adopt(full, tp_rank, tp_size)
        self.lora_A = mark_parallel(nn.Parameter(full.lora_A.data.clone()), False, tp_rank)
        self.lora_B = mark_parallel(nn.Parameter(shard_rows(full.lora_B.data, tp_rank, tp_size)), True, tp_rank)

    @property
    def replicated_adapter(self) -> nn.Parameter:
        """The factor every rank holds whole; its gradient is summed over tp in forward (copy_to_tp)."""
        return self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = copy_to_tp(self.lora_A, self.group)
        if self.sequence_parallel:
            out = gathered_linear(x, self.weight, self.bias, self.group)
            h = gathered_linear(self._dropped(x, per_rank=True), a, None, self.group)
        else:
            x = copy_to_tp(x, self.group)  # one all-reduce of the input's gradient for the base and the adapter
            out = F.linear(x, self.weight, self.bias)
            h = F.linear(self._dropped(x, per_rank=False), a)
        return out + F.linear(h, self.lora_B) * self.scaling


class LoraRowParallelLinear(_Adapter, RowParallelLinear):
    def __init__(self, full: LoraLinear, group, tp_rank: int, tp_size: int):
        super().__init__(full, group, tp_rank, tp_size)
        self._adopt(full, tp_rank, tp_size)
        self.lora_A = mark_parallel(nn.Parameter(shard_cols(full.lora_A.data, tp_rank, tp_size)), True, tp_rank)
        self.lora_B = mark_parallel(nn.Parameter(full.lora_B.data.clone()), False, tp_rank)

    @property
    def replicated_adapter(self) -> nn.Parameter:
        """The factor every rank holds whole; under sequence parallelism its gradient is summed over tp."""
        return self.lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(self._dropped(x, per_rank=True), self.lora_A)
        if self.sequence_parallel:
            h, b = reduce_scatter_to_sequence(partial, self.group), copy_to_tp(self.lora_B, self.group)
        else:
            h, b = reduce_from_tp(partial, self.group), self.lora_B
        return super().forward(x) + F.linear(h, b) * self.scaling


LoraParallelLinear = (LoraColumnParallelLinear, LoraRowParallelLinear)


def column_parallel_linear(module: nn.Linear, group, tp_rank: int, tp_size: int) -> ColumnParallelLinear:
    cls = LoraColumnParallelLinear if isinstance(module, LoraLinear) else ColumnParallelLinear
    return cls(module, group, tp_rank, tp_size)


def row_parallel_linear(module: nn.Linear, group, tp_rank: int, tp_size: int) -> RowParallelLinear:
    cls = LoraRowParallelLinear if isinstance(module, LoraLinear) else RowParallelLinear
    return cls(module, group, tp_rank, tp_size)


def check_stage_trains(module: nn.Module, pp_rank: int, partition_method: str) -> None:
    """A pipeline stage must hold a parameter that trains; with LoRA the embedding, norms and head are frozen, so a
    stage of those alone (a cut by layer count) has none, and DeepSpeed would fail on its empty optimizer."""
    if not any(p.requires_grad for p in module.parameters()):
        raise ConfigError(f"pipeline stage {pp_rank} holds no parameter that trains ('pipe_partition_method' "
                          f"{partition_method} gave it no transformer layer with LoRA adapters; everything else is "
                          "frozen): use pipe_partition_method 'type:transformer', or fewer pipeline stages")
