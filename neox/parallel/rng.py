"""Per-rank dropout streams for a dp x tp x pp layout (Megatron's model-parallel RNG idea, without a tracker).

Two kinds of dropout need two kinds of stream:
- dropout on activations every tp rank holds in full (embedding and hidden dropout) must draw the same mask on
  all tp ranks of a replica, or the replicas of one activation drift apart: the default torch stream, seeded
  identically on those ranks by `dropout_seed`;
- attention dropout acts on this tp rank's own heads, so its mask must differ between tp ranks (with one shared
  stream, head h of rank 1 would get exactly the mask of head h of rank 0): `tp_rank_stream`. So does hidden
  dropout under sequence parallelism, which acts on this rank's own positions.

Megatron keeps the second stream in a tracker whose state must be checkpointed and restored by activation
recomputation. Here each attention call instead takes one draw from the default stream (the same on every tp
rank, so their default streams stay in step) and seeds a forked stream with (draw, tp rank). Everything then
follows from the default stream's state: activation checkpointing restores it before recomputing (same mask),
and a resumed run restores it from the checkpoint's rng/rankR.pt (same masks as the uninterrupted run).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from neox.parallel.topology import Topology

_DRAW_BOUND = 2 ** 48  # times tp_size (a few thousand at most) stays below torch's 2**64 seed range


def dropout_seed(base_seed: int, topo: Topology) -> int:
    """Identical on the tp ranks of one replica, whose activations are replicated and must stay so (every tp rank
    draws the same number of values, so their streams stay in step); different across dp replicas, so each sees
    its own masks, and across pipeline stages, whose layers would otherwise share masks. Stage 0 keeps the
    single-stage seed, base + 1000 x dp rank."""
    return base_seed + 1000 * topo.dp_rank + 1_000_003 * topo.pp_rank


@contextmanager
def tp_rank_stream(tp_rank: int, tp_size: int, device: torch.device) -> Iterator[None]:
    """Run a block in a stream of its own for this tp rank; the default stream advances by exactly one draw."""
    draw = int(torch.randint(0, _DRAW_BOUND, ()))  # CPU default generator: what checkpoint recompute restores
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(draw * tp_size + tp_rank)  # seeds the CPU and every CUDA generator; distinct per rank
        yield


class PerTPRankDropout:
    """A module's forward, run in `tp_rank_stream` while the module trains with dropout > 0 (else unchanged,
    so evaluation and dropout-free training draw nothing)."""

    def __init__(self, module: nn.Module, tp_rank: int, tp_size: int):
        self.module, self.forward = module, module.forward
        self.tp_rank, self.tp_size = tp_rank, tp_size

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not (self.module.training and self.module.dropout):
            return self.forward(x, *args, **kwargs)
        with tp_rank_stream(self.tp_rank, self.tp_size, x.device):
            return self.forward(x, *args, **kwargs)


def use_tp_rank_dropout(module: nn.Module, tp_rank: int, tp_size: int) -> None:
    """In place: `module` (whose `dropout` attribute is its dropout probability) draws its masks per tp rank.
    The module keeps its class and parameter names; only its forward is wrapped."""
    if isinstance(module.forward, PerTPRankDropout):
        return
    wrapped: Callable[..., torch.Tensor] = PerTPRankDropout(module, tp_rank, tp_size)
    module.forward = wrapped  # type: ignore[method-assign]
