"""Decode-time linear layers on pre-packed CPU GEMM weights: MKL's packed sgemm (fp32), oneDNN (bf16).

A decoding step multiplies a few rows (batch x 1 token) by every weight matrix; the generic GEMM is slow at
such small row counts (fp32 MKL sgemm; bf16 even more so: plain F.linear reaches half the memory bandwidth of
the packed path here), the packed one is not: the weights are re-laid out once for a given row count. The
packed copy is an extra buffer beside the weight; other row counts (the prompt's prefill) take the plain
F.linear. Same arithmetic with another summation order: results agree with F.linear to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox.model.model import Head


def packed_gemm_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch has a packed CPU GEMM for weights of `dtype` (float32: MKL, bfloat16: oneDNN)."""
    if dtype == torch.float32:
        return bool(torch._C.has_mkl) and hasattr(torch.ops.mkl, "_mkl_linear")
    if dtype == torch.bfloat16:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    return False


class PackedLinear(nn.Module):
    """y = x W^T + b with W pre-packed for inputs of exactly `rows` rows (flattened over leading dims)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.rows = 0
        self._packed: torch.Tensor | None = None
        self._packed_from: tuple[int, torch.dtype] | None = None  # the weight's (in-place version, dtype)

    def _weight_state(self) -> tuple[int, torch.dtype]:
        return self.weight._version, self.weight.dtype

    def pack(self, rows: int) -> None:
        """(Re)pack for `rows`; also after the weight changed in place (a load_state_dict, an optimizer step)
        or changed dtype (model.to)."""
        if rows != self.rows or self._weight_state() != self._packed_from:
            weight = self.weight.detach()
            if weight.dtype == torch.float32:
                self._packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
            else:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
            self.rows = rows
            self._packed_from = self._weight_state()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if (self._packed is None or flat.shape[0] != self.rows or x.dtype != self.weight.dtype
                or self._weight_state() != self._packed_from):
            return F.linear(x, self.weight, self.bias)
        if x.dtype == torch.float32:
            out = torch.ops.mkl._mkl_linear(flat, self._packed, self.weight, self.bias, self.rows)
        else:
            out = torch.ops.mkldnn._linear_pointwise(flat, self._packed, self.bias, "none", [], "")
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
    model is not a float32 or bfloat16 CPU model or this torch has no packed GEMM for its dtype."""
    first = next(model.parameters())
    if first.device.type != "cpu" or not packed_gemm_available(first.dtype):
        return False
    for layer in _replace(model):
        layer.pack(rows)
    return True
