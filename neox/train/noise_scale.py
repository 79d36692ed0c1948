"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, arXiv:1812.06162), estimated
as gpt-neox's GradientNoiseScale does it.

B_small is one step's batch (train_batch_size) and B_big the mean gradient of n_batches consecutive steps
(n_batches x train_batch_size). Every n_batches-th step, with G_small that step's gradient and G_big the mean:

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

each smoothed by an exponential moving average (beta 0.99, bias-corrected with the count of accepted steps, as
gpt-neox does; the correction is the same for both, so it cancels in the ratio). A step whose gradient has a
non-finite value anywhere is skipped entirely, as gpt-neox skips overflowed steps.

Distributed, each rank buffers only the gradient elements it owns (neox/train/param_shards.py), so the squared
norms are sums of per-rank partial sums: `local_terms` gives this rank's, the caller all-reduces them (sum) and
hands the totals to `commit`. Unlike gpt-neox this works under ZeRO 1-3 (it refuses ZeRO >= 1) and adds the
pipeline stages' squares instead of averaging them.
"""
from __future__ import annotations

import math

import torch

N_TERMS = 3  # (non-finite element count, |G_small|^2, |G_big|^2) partial sums


def _ema(avg: float | None, beta: float, value: float, i: int) -> tuple[float, float]:
    avg = beta * (avg or 0.0) + (1 - beta) * value
    return avg, avg / (1 - beta ** (i + 1))


class GradientNoiseScale:
    def __init__(self, batch_size_small: int, n_batches: int, beta: float = 0.99, cpu_offload: bool = False):
        if n_batches < 2:
            raise ValueError(f"n_batches must be >= 2, got {n_batches}")
        self.batch_size_small = batch_size_small
        self.batch_size_large = batch_size_small * n_batches
        self.n_batches, self.beta, self.cpu_offload = n_batches, beta, cpu_offload
        self.buffer: torch.Tensor | None = None
        self.ema_noise: float | None = None
        self.ema_scale: float | None = None
        self.noise_scale: float | None = None
        self.n_updates = 0
        self._pending: torch.Tensor | None = None

    def _estimate_step(self) -> bool:
        return self.n_updates % self.n_batches == self.n_batches - 1

    def local_terms(self, grad: torch.Tensor) -> torch.Tensor:
        """This rank's partial sums for this step's gradient slice (flat fp32, the same elements every step)."""
        grad = grad.detach().to(torch.float32)
        if self.cpu_offload:
            grad = grad.cpu()
        self._pending = grad
        nonfinite = float((~torch.isfinite(grad)).sum())
        small = big = 0.0
        if self._estimate_step() and nonfinite == 0:
            total = grad if self.buffer is None else self.buffer + grad
            small = float(torch.sum(grad.double() ** 2))
            big = float(torch.sum((total.double() / self.n_batches) ** 2))
        return torch.tensor([nonfinite, small, big], dtype=torch.float64)

    def commit(self, totals: torch.Tensor) -> None:
        """Advance with the world's sums of local_terms."""
        nonfinite, g_small, g_big = (float(v) for v in totals)
        grad, self._pending = self._pending, None
        if nonfinite > 0 or grad is None:
            return
        if not self._estimate_step():
            self.buffer = grad.clone() if self.buffer is None else self.buffer.add_(grad)
            self.n_updates += 1
            return
        self.buffer = None
        if not (math.isfinite(g_small) and math.isfinite(g_big)):
            return
        noise = (self.batch_size_large * g_big - self.batch_size_small * g_small) / (
            self.batch_size_large - self.batch_size_small)
        scale = (g_small - g_big) / (1 / self.batch_size_small - 1 / self.batch_size_large)
        self.ema_noise, noise = _ema(self.ema_noise, self.beta, noise, self.n_updates)
        self.ema_scale, scale = _ema(self.ema_scale, self.beta, scale, self.n_updates)
        self.noise_scale = scale / noise if noise != 0 else math.inf
        self.n_updates += 1
