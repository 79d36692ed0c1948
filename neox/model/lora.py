"""LoRA (Hu et al., arXiv 2106.09685) on the single-device model: low-rank adapters on chosen linears, all else frozen.

A targeted nn.Linear becomes a LoraLinear holding the very same weight and bias (same Parameter objects, same state
dict names) plus lora_A [r, in] and lora_B [out, r]:

    y = x W^T + b + dropout(x) A^T B^T * alpha / r

B starts at zero, so the adapted model starts as the base; A starts as PEFT's default (kaiming-uniform, a = sqrt(5)),
each layer's drawn from its own generator seeded by (seed, parameter name): the same values on every rank and at
every layout. add_lora then freezes every other parameter: only the adapters train, the optimizer holds only them
(neox/optim takes parameters that require grad) and checkpoints store only them (neox/checkpoint). Tensor
parallelism shards each adapter with its base layer (neox/parallel/lora.py).
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from neox.config.lora import MODULE_PATHS, LoraSettings

ADAPTER_LEAVES = ("lora_A", "lora_B")
_SEED_MASK = 2**63 - 1


def is_adapter(name: str) -> bool:
    return name.rpartition(".")[2] in ADAPTER_LEAVES


def _in_block(module_name: str) -> str:
    """'blocks.3.attention.dense' -> 'attention.dense'; '' for a name outside the blocks."""
    parts = module_name.split(".", 2)
    return parts[2] if len(parts) == 3 and parts[0] == "blocks" else ""


class LoraLinear(nn.Linear):
    """nn.Linear (the base's own weight and bias) plus a low-rank adapter."""

    def __init__(self, base: nn.Linear, settings: LoraSettings, generator: torch.Generator):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        # PEFT's reset_lora_parameters: kaiming_uniform_(A, a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); drawn in fp32
        # on the CPU from this layer's generator, so every device and dtype starts from the same values.
        a = nn.init.kaiming_uniform_(torch.empty(settings.r, self.in_features), a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(base.weight.device, base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, settings.r, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.scaling = settings.scaling
        self.lora_dropout = settings.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.adapter(x)

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_dropout and self.training:
            x = F.dropout(x, self.lora_dropout)
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.lora_A.shape[0]}, scaling={self.scaling}"


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & _SEED_MASK)


def add_lora(model: nn.Module, settings: LoraSettings, seed: int) -> nn.Module:
    """In place on a single-device GPTNeoX (its base weights already loaded): adapters on settings.target_modules of
    every block (a block shared by several layers gets one), every other parameter frozen. Returns the model."""
    paths = tuple(MODULE_PATHS[t] for t in settings.target_modules)
    targets = [(name, module) for name, module in model.named_modules()  # each shared module once, first name
               if _in_block(name) in paths]
    if not targets:
        raise ValueError(f"the model has none of the LoRA target modules {list(settings.target_modules)}")
    for name, module in targets:
        if not isinstance(module, nn.Linear) or isinstance(module, LoraLinear):
            raise ValueError(f"{name} is a {type(module).__name__}, not a plain nn.Linear to put an adapter on")
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, LoraLinear(module, settings, _generator(seed, name)))
    freeze_base(model)
    return model


def freeze_base(model: nn.Module) -> None:
    """Only adapter parameters require grad."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))


def has_adapters(model: nn.Module) -> bool:
    return any(is_adapter(name) for name, _ in model.named_parameters())


def adapter_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t for name, t in state_dict.items() if is_adapter(name)}


def check_adapters(adapters: dict[str, torch.Tensor], base: dict, settings: LoraSettings, origin: str) -> None:
    """Every targeted linear of `base` (a state dict, or its shapes) has an adapter pair of the settings' rank and
    its shape, and nothing else; raises ValueError naming what differs."""
    paths = tuple(MODULE_PATHS[t] for t in settings.target_modules)
    modules = [w[:-len(".weight")] for w in base if w.endswith(".weight")]
    expected = {f"{module}.{leaf}" for module in modules if _in_block(module) in paths for leaf in ADAPTER_LEAVES}
    if set(adapters) != expected:
        missing, extra = sorted(expected - set(adapters)), sorted(set(adapters) - expected)
        raise ValueError(f"{origin}: the adapters do not match lora.target_modules {list(settings.target_modules)}"
                         f" (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, tensor in adapters.items():
        weight = base[name.rpartition(".")[0] + ".weight"]
        out_features, in_features = getattr(weight, "shape", weight)  # a tensor, or its shape
        shape = (settings.r, in_features) if name.endswith("lora_A") else (out_features, settings.r)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{origin}: {name} has shape {tuple(tensor.shape)}, expected {shape} (lora.r "
                             f"{settings.r})")


def merged_state(base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor],
                 settings: LoraSettings) -> dict[str, torch.Tensor]:
    """The base state dict with each adapter folded in: W + (alpha / r) B A, in fp32 (the model without adapters
    then computes what the adapted model computes, dropout aside)."""
    check_adapters(adapters, base, settings, "merge")
    merged = dict(base)
    for name in adapters:
        if not name.endswith(".lora_A"):
            continue
        module = name[:-len(".lora_A")]
        a, b = adapters[name].float(), adapters[module + ".lora_B"].float()
        weight = base[module + ".weight"]
        merged[module + ".weight"] = (weight.float() + settings.scaling * (b @ a)).to(weight.dtype)
    return merged
