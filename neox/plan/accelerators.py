"""Named accelerators: memory and dense (no sparsity) peak FLOP/s per precision, with where the figures come from.

fp32 is the plain (non-tensor-core) rate: PyTorch leaves TF32 matmuls off by default
(torch.backends.cuda.matmul.allow_tf32 = False), so an fp32 run gets the fp32 rate unless the user enables TF32.
"""
from __future__ import annotations

from dataclasses import dataclass

from neox.config.errors import ConfigError

GIB = 1024 ** 3
TERA = 1.0e12


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bytes: int
    peak_flops: dict[str, float]  # precision ("fp32", "fp16", "bfloat16") -> FLOP/s
    source: str


_A100_SOURCE = "NVIDIA A100 datasheet: 312 TFLOP/s fp16/bf16 dense tensor, 19.5 fp32"
_H100_SXM_SOURCE = "NVIDIA H100 datasheet, SXM5: 989 TFLOP/s fp16/bf16 dense tensor, 67 fp32"
_H100_PCIE_SOURCE = "NVIDIA H100 datasheet, PCIe: 756 TFLOP/s fp16/bf16 dense tensor, 51 fp32"

ACCELERATORS: dict[str, Accelerator] = {
    a.name.lower(): a
    for a in (
        Accelerator("A100-40GB", 40 * GIB, {"fp16": 312 * TERA, "bfloat16": 312 * TERA, "fp32": 19.5 * TERA},
                    _A100_SOURCE),
        Accelerator("A100-80GB", 80 * GIB, {"fp16": 312 * TERA, "bfloat16": 312 * TERA, "fp32": 19.5 * TERA},
                    _A100_SOURCE),
        Accelerator("H100-SXM", 80 * GIB, {"fp16": 989 * TERA, "bfloat16": 989 * TERA, "fp32": 67 * TERA},
                    _H100_SXM_SOURCE),
        Accelerator("H100-PCIe", 80 * GIB, {"fp16": 756 * TERA, "bfloat16": 756 * TERA, "fp32": 51 * TERA},
                    _H100_PCIE_SOURCE),
        Accelerator("V100-32GB", 32 * GIB, {"fp16": 125 * TERA, "fp32": 15.7 * TERA},
                    "NVIDIA V100 datasheet, SXM2: 125 TFLOP/s fp16 tensor, 15.7 fp32, no bf16"),
    )
}


def find_accelerator(name: str) -> Accelerator:
    try:
        return ACCELERATORS[name.lower()]
    except KeyError:
        known = ", ".join(a.name for a in ACCELERATORS.values())
        raise ConfigError(f"unknown --accelerator {name!r}; known: {known} (or omit it to plan for this "
                          "machine's CPU)") from None


def peak_for(accelerator: Accelerator, precision: str) -> float:
    try:
        return accelerator.peak_flops[precision]
    except KeyError:
        raise ConfigError(f"{accelerator.name} has no {precision} peak ({accelerator.source}); choose another "
                          "'precision' or accelerator") from None
