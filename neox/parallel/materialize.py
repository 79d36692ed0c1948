"""Give a tensor-parallel model built on the meta device this rank's shard of the single-device initial values,
drawing only that shard.

GPTNeoX draws its initial values in tiles, each from its own seed (neox/model/init.py), and keeps the plan of those
draws (`model.init_plan`). A rank fills each of its meta parameters with the block of the plan its tp shard covers
(neox/parallel/sharding.py:shard_index), drawing only the tiles that block touches; muP's init factors scale it as
they scale the single-device draw. A pipeline stage passes only the parameters of its own layers: the others stay
on the meta device (no memory, no draws). Peak host memory is this rank's shards plus one tile, except for
orthogonal inits, which draw one whole parameter at a time (a QR needs the whole matrix).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from neox.config.model import ModelConfig
from neox.model import GPTNeoX
from neox.model.mup import MupSetup, mup_init_factors
from neox.model.positions import alibi_slopes
from neox.parallel.expert_parallel import is_expert_tensor
from neox.parallel.sharding import shard_index, split_overrides


class MaterializeError(RuntimeError):
    pass


def meta_model(cfg: ModelConfig, mup: MupSetup | None = None, init_seed: int | None = None,
               value_head: bool = False) -> GPTNeoX:
    """GPTNeoX's structure with every parameter on the meta device (no memory, no RNG draws) and its init plan;
    buffers that depend only on the config are real."""
    with torch.device("meta"):
        model = GPTNeoX(cfg, mup, init_seed, value_head=value_head)
    for block in model.blocks:
        attn = block.attention
        if attn.alibi_slopes is not None:
            attn.alibi_slopes = alibi_slopes(attn.num_heads)
    return model


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _fill(param: nn.Parameter, value: torch.Tensor) -> None:
    """Give a meta parameter a real value in place: same Python object (the engine, the pipeline spec and a tied
    head hold it), same attributes (tp marks)."""
    marks = dict(vars(param))
    torch.utils.swap_tensors(param, nn.Parameter(value, requires_grad=param.requires_grad))
    param.__dict__.update(marks)


@torch.no_grad()
def materialize(model: GPTNeoX, tp_rank: int = 0, tp_size: int = 1,
                params: Iterable[nn.Parameter] | None = None, ep_rank: int = 0, ep_size: int = 1) -> GPTNeoX:
    """In place: every meta parameter of a (tensor-parallelised) meta-built model, or of `params` only (a pipeline
    stage's), gets tp rank tp_rank's shard (of tp_size) of its single-device initial value; with expert
    parallelism the expert tensors are also cut to expert-parallel rank ep_rank's experts (dim 0)."""
    plan = model.init_plan
    factors = mup_init_factors(model)  # muP scales the standard draws, as GPTNeoX's build does
    named = list(model.named_parameters())  # a tied head is listed once, as the embedding
    overrides = split_overrides(named)  # a row-parallel head is split along its columns
    wanted = None if params is None else {id(p) for p in params}
    for name, param in named:
        if not param.is_meta or (wanted is not None and id(param) not in wanted):
            continue
        if name not in plan.draws:
            raise MaterializeError(f"{name}: the model's init plan has no such parameter; GPTNeoX gained state "
                                   "that neox/model/init.py:init_plan does not list")
        index = shard_index(name, plan.draws[name].shape, tp_rank, tp_size, overrides)
        if ep_size > 1 and is_expert_tensor(name):
            local = plan.draws[name].shape[0] // ep_size
            index = (slice(ep_rank * local, (ep_rank + 1) * local), *index[1:])
        value = plan.value(name, index, dtype=param.dtype)
        if value.shape != param.shape:
            raise MaterializeError(f"{name}: shard {tuple(value.shape)} of the initial value does not fit the "
                                   f"parallel model's {tuple(param.shape)} at tp rank {tp_rank}/{tp_size}")
        if factors.get(name, 1.0) != 1.0:
            value.mul_(factors[name])
        _fill(param, value)
    left = [n for n, p in named if p.is_meta and (wanted is None or id(p) in wanted)]
    left += [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise MaterializeError(f"no initial value for {left[:5]}: GPTNeoX gained state that neox/parallel/"
                               "materialize.py does not know how to build; teach it, or build the model on the CPU")
    return model
