"""FLOP accounting for throughput and MFU: the model FLOPs per token and the peak they are divided by.

Training FLOPs per token = 6 * N + 12 * L * d * s, PaLM's convention (Chowdhery et al. 2022, appendix B; Kaplan et al.
2020 section 2.1): matmul FLOPs only, 2 per multiply-add, backward twice the forward.
- 6 * N: every parameter that takes part in a matmul, the output head included (tied or not). Lookup tables are left
  out: the input token embedding when the head is not tied to it, and learned position embeddings. N does include
  the biases and norm gains (as nanoGPT's PaLM-style estimate does): each adds 6 FLOPs a token to the count where
  its real cost is a few elementwise ops. That is ~13 h beside ~12 h^2 matrix parameters a layer, so the count is
  high by about 1/h: 1.2% for the test's 2-layer h = 64 model, 0.2% at h = 512, 0.02% at h = 6144.
- 12 * L * d * s: attention scores QK^T and the weighted sum AV, each 2 * s * d FLOPs per token per layer forward,
  times 3 for forward + backward; counted over the full s x s square (PaLM's convention, and what
  torch.utils.flop_counter counts for SDPA whether causal or not), although causal kernels skip half, so figures
  compare with gpt-neox, Megatron and nanoGPT.
tests/unit/test_throughput_metrics.py checks this count against torch.utils.flop_counter.FlopCounterMode on a real
forward + backward: they agree exactly once the biases and norm gains are taken out.
Activation recomputation is not counted: MFU measures useful model FLOPs, not hardware FLOPs.

The peak (MFU's denominator, per device): `peak_flops` when the config sets it; on a GPU its datasheet dense peak for
the run's precision (neox/train/accelerators.py, found by torch.cuda.get_device_name); otherwise (the CPU, or a GPU
the table does not know) a matmul probe measured at start. mfu_peak says which, for metrics.jsonl.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from neox.train.accelerators import accelerator_of_device


def matmul_params(total_params: int, vocab_rows: int, hidden_size: int, tied_head: bool,
                  learned_pos_rows: int = 0) -> int:
    """Parameters that do arithmetic (see the module docstring)."""
    lookup_only = learned_pos_rows * hidden_size
    if not tied_head:
        lookup_only += vocab_rows * hidden_size
    return total_params - lookup_only


def train_flops_per_token(n_matmul_params: int, num_layers: int, hidden_size: int, seq_length: int) -> float:
    return 6.0 * n_matmul_params + 12.0 * num_layers * hidden_size * seq_length


PROBE_SIZE = 1024
PROBE_SECONDS = 0.5
_PROBE_DTYPES = {"bfloat16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def probe_dtype(precision: str | None) -> torch.dtype:
    """The matmul dtype a run of this precision ('fp32', 'fp16', 'bfloat16'; None: fp32) trains in."""
    return _PROBE_DTYPES.get(precision or "fp32", torch.float32)


def measure_peak_flops(dtype: torch.dtype = torch.float32, size: int = PROBE_SIZE, seconds: float = PROBE_SECONDS,
                       device: str | torch.device = "cpu") -> float:
    """Sustained matmul FLOP/s of this device for `dtype`: the denominator of MFU when no peak is configured."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2.0 * size ** 3 * reps / elapsed


@dataclass(frozen=True)
class PeakFlops:
    """MFU's denominator, FLOP/s of one device, and where the figure comes from (written to metrics.jsonl)."""
    flops: float
    source: str


def mfu_peak(configured: float | None, precision: str | None, device_name: str | None,
             probe: Callable[[torch.dtype], float]) -> PeakFlops:
    """The peak of one device: `peak_flops` if set, else the datasheet figure of the GPU called `device_name`
    (torch.cuda.get_device_name; None: the CPU) for `precision`, else `probe(dtype)`, a measured matmul rate.

    fp32 takes the table's plain fp32 rate: PyTorch leaves TF32 matmuls off unless a user turns them on."""
    if configured is not None:
        return PeakFlops(configured, f"config peak_flops ({configured:.4g} FLOP/s)")
    precision = precision or "fp32"
    dtype = probe_dtype(precision)
    probed = f"measured: {str(dtype).removeprefix('torch.')} matmul probe {PROBE_SIZE}x{PROBE_SIZE}, {PROBE_SECONDS} s"
    if device_name is None:
        return PeakFlops(probe(dtype), probed)
    accelerator = accelerator_of_device(device_name)
    if accelerator is None:
        return PeakFlops(probe(dtype), f"{probed} on {device_name!r}, which neox/train/accelerators.py does not "
                                       "list: set peak_flops to its datasheet dense peak for a comparable MFU")
    peak = accelerator.peak_flops.get(precision)
    if peak is None:
        return PeakFlops(probe(dtype), f"{probed} on {device_name!r}: its datasheet ({accelerator.source}) gives "
                                       f"no {precision} peak")
    return PeakFlops(peak, f"datasheet: {device_name} ({accelerator.name}) {precision} {peak / 1e12:g} TFLOP/s "
                           f"dense ({accelerator.source})")
