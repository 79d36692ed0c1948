"""FLOP accounting for throughput and MFU.

Training FLOPs per token = 6 * N + 12 * L * d * s (Kaplan et al. 2020; PaLM appendix B):
- 6 * N: forward (2 FLOPs per multiply-add) plus backward (twice the forward) over every parameter that takes part
  in a matmul. N is all parameters except lookup tables that do no arithmetic: the input token embedding when the
  output head is not tied to it, and learned position embeddings. The output head counts.
- 12 * L * d * s: attention scores QK^T and the weighted sum AV, each 2 * s * d FLOPs per token per layer forward,
  times 3 for forward + backward; counted over the full s x s square (the usual convention, although causal kernels
  skip half), so figures compare with gpt-neox, Megatron and nanoGPT.
Activation recomputation is not counted: MFU measures useful model FLOPs, not hardware FLOPs.
"""
from __future__ import annotations

import time

import torch


def matmul_params(total_params: int, vocab_rows: int, hidden_size: int, tied_head: bool,
                  learned_pos_rows: int = 0) -> int:
    """Parameters that do arithmetic (see the module docstring)."""
    lookup_only = learned_pos_rows * hidden_size
    if not tied_head:
        lookup_only += vocab_rows * hidden_size
    return total_params - lookup_only


def train_flops_per_token(n_matmul_params: int, num_layers: int, hidden_size: int, seq_length: int) -> float:
    return 6.0 * n_matmul_params + 12.0 * num_layers * hidden_size * seq_length


def measure_peak_flops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5,
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
