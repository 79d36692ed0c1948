"""Decode-time linear layers on MKL's pre-packed fp32 GEMM (CPU).

A decoding step multiplies a few rows (batch x 1 token) by every weight matrix; MKL's generic sgemm is slow
at such small row counts, its packed GEMM (weights re-laid out once for a given row count) is not. The packed
copy is an extra buffer beside the weight; other row counts (the prompt's prefill) take the plain F.linear.
Same fp32 arithmetic, a different summation order: results agree with F.linear to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox.model.model import Head


def packed_gemm_available() -> bool:
    return bool(torch._C.has_mkl) and hasattr(torch.ops.mkl, "_mkl_linear")


class PackedLinear(nn.Module):
    """y = x W^T + b with W pre-packed for inputs of exactly `rows` rows (flattened over leading dims)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.rows = 0
        self._packed: torch.Tensor | None = None
        self._packed_version = -1  # the weight's in-place version the packed copy was made from

    def pack(self, rows: int) -> None:
        """(Re)pack for `rows`; also after the weight changed in place (a load_state_dict, an optimizer step)."""
        if rows != self.rows or self.weight._version != self._packed_version:
            self._packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), rows)
            self.rows = rows
            self._packed_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if (self._packed is None or flat.shape[0] != self.rows or x.dtype != torch.float32
                or self.weight._version != self._packed_version):
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.mkl._mkl_linear(flat, self._packed, self.weight, self.bias, self.rows)
        return out.view(*x.shape[:-1], out.shape[-1])


def _replace(model: nn.Module) -> list[PackedLinear]:
    """Swap every nn.Linear and the model's Head for a PackedLinear sharing its parameters (other modules,
    such as tensor-parallel layers, are left as they are)."""
    swapped: list[PackedLinear] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                swapped.append(child)
            elif type(child) in (nn.Linear, Head):
                packed = PackedLinear(child.weight, getattr(child, "bias", None))
                setattr(parent, name, packed)
                swapped.append(packed)
    return swapped


def pack_for_decoding(model: nn.Module, rows: int) -> bool:
    """Prepare `model`'s linear layers for decoding steps of `rows` rows; False (model untouched) when the
    model is not an fp32 CPU model or this torch has no MKL packed GEMM."""
    first = next(model.parameters())
    if not packed_gemm_available() or first.device.type != "cpu" or first.dtype != torch.float32:
        return False
    for layer in _replace(model):
        layer.pack(rows)
    return True
