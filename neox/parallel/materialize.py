"""Give a tensor-parallel model built on the meta device this rank's shard of the single-device initial values,
without ever holding the full model.

GPTNeoX(cfg) draws its initial values from the global torch RNG in two passes: each module's constructor (the
reset_parameters of nn.Linear / nn.Embedding), then init_weights over the named modules. `initial_values`
replays both passes in the same order on a scratch copy of one module at a time, so it yields every parameter's
full value exactly as the full build computes it (and leaves the RNG where the full build leaves it) while
holding one module's parameters at once; `materialize` keeps only this rank's shard of each. Peak memory is this
rank's shards plus the largest single module, instead of the whole model plus its shards.
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import nn

from neox.config.model import ModelConfig
from neox.model import GPTNeoX
from neox.model.init import init_weights
from neox.model.mup import MupSetup, mup_init_factors
from neox.model.positions import alibi_slopes
from neox.parallel.sharding import shard_tensor, split_overrides
from neox.parallel.topology import Topology


class MaterializeError(RuntimeError):
    pass


def meta_model(cfg: ModelConfig, mup: MupSetup | None = None) -> GPTNeoX:
    """GPTNeoX's structure with every parameter on the meta device (no memory, no RNG draws); buffers that
    depend only on the config are real."""
    with torch.device("meta"):
        model = GPTNeoX(cfg, mup)
    for block in model.blocks:
        attn = block.attention
        if attn.alibi_slopes is not None:
            attn.alibi_slopes = alibi_slopes(attn.num_heads)
    return model


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


class _Named:
    """One module under its name in the full model: init_weights chooses the init by module name."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        yield self.name, self.module


def _scratch(module: nn.Module) -> nn.Module:
    """A copy of module whose own parameters are real (uninitialised) CPU tensors; its children stay meta."""
    scratch = copy.deepcopy(module)
    return scratch.to_empty(device="cpu", recurse=False)


def _own_params(module: nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values())


@torch.no_grad()
def initial_values(cfg: ModelConfig, mup: MupSetup | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full initial value) of every parameter of GPTNeoX(cfg, mup), drawn as GPTNeoX(cfg, mup) draws them; a
    tied head is drawn (and yielded as head.weight) as the full build draws it before tying."""
    skeleton = meta_model(cfg, mup)
    mup_factors = mup_init_factors(skeleton)  # muP scales the standard draws, as GPTNeoX's build does
    # Modules register in the order their constructors run, so named_modules() is the constructor order.
    modules = [(name, m) for name, m in skeleton.named_modules() if _own_params(m)]
    for _, module in modules:
        if hasattr(module, "reset_parameters"):
            _scratch(module).reset_parameters()
    for name, module in modules:
        scratch = _scratch(module)
        init_weights(_Named(name, scratch), cfg)  # type: ignore[arg-type]
        for leaf, param in scratch._parameters.items():
            if param is not None:
                full_name = f"{name}.{leaf}" if name else leaf
                value = param.detach()
                if mup_factors.get(full_name, 1.0) != 1.0:
                    value.mul_(mup_factors[full_name])
                yield full_name, value


def _fill(param: nn.Parameter, value: torch.Tensor) -> None:
    """Give a meta parameter a real value in place: same Python object (the engine, the pipeline spec and a tied
    head hold it), same attributes (tp marks)."""
    marks = dict(vars(param))
    torch.utils.swap_tensors(param, nn.Parameter(value, requires_grad=param.requires_grad))
    param.__dict__.update(marks)


def materialize(model: GPTNeoX, topo: Topology) -> GPTNeoX:
    """In place: every meta parameter of a (tensor-parallelised) meta-built model gets this tp rank's shard of its
    single-device initial value. Consumes the global RNG exactly as GPTNeoX(model.cfg) would."""
    params = dict(model.named_parameters())  # a tied head is listed once, as the embedding
    overrides = split_overrides(params.items())  # a row-parallel head is split along its columns
    for name, full in initial_values(model.cfg, model.mup):
        param = params.pop(name, None)
        if param is None:
            continue
        value = shard_tensor(name, full, topo.tp_rank, topo.tp_size, overrides)
        if value.shape != param.shape:
            raise MaterializeError(f"{name}: shard {tuple(value.shape)} of the initial value does not fit the "
                                   f"parallel model's {tuple(param.shape)} at tp rank {topo.tp_rank}/{topo.tp_size}")
        _fill(param, value)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise MaterializeError(f"no initial value for {left[:5]}: GPTNeoX gained state that neox/parallel/"
                               "materialize.py does not know how to build; teach it, or build the model on the CPU")
    return model
