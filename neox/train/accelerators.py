"""Named accelerators: memory and dense (no sparsity) peak FLOP/s per precision, with where the figures come from.
`deepy plan --accelerator NAME` plans for one; a training run finds its GPU here by torch.cuda.get_device_name for
the MFU denominator (neox/train/flops.py:mfu_peak).

fp32 is the plain (non-tensor-core) rate: PyTorch leaves TF32 matmuls off by default
(torch.backends.cuda.matmul.allow_tf32 = False), so an fp32 run gets the fp32 rate unless the user enables TF32.
"""
from __future__ import annotations

import re
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


# torch.cuda.get_device_name spellings (nvidia-smi's product names, e.g. "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB
# PCIe", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "Tesla V100-SXM2-32GB"), first match wins. Only devices whose
# figures the table holds: an A100's peak is the same in its SXM4 and PCIe forms, an H100's and a V100's are not.
_DEVICE_NAMES: tuple[tuple[str, str], ...] = (
    (r"\bA100\b.*80\s?GB", "A100-80GB"),
    (r"\bA100\b", "A100-40GB"),
    (r"\bH100\b.*PCIe", "H100-PCIe"),
    (r"\bH100\b.*(SXM|HBM3)", "H100-SXM"),
    (r"\bV100-SXM2-32GB\b", "V100-32GB"),
)


def accelerator_of_device(device_name: str) -> Accelerator | None:
    """The table's entry for a CUDA device name (torch.cuda.get_device_name), None for a device it does not list."""
    for pattern, name in _DEVICE_NAMES:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return ACCELERATORS[name.lower()]
    return None


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
