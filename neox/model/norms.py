"""Normalisation layers (gpt-neox's `norm` choices) and the query/key norm of use_qk_layernorm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox.config.model import ModelConfig


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm; like the norms below it reads its scale and shift through `affine()`, the one thing a
    parallel layout may change about a norm (neox/parallel/parallelize.py: sequence parallelism sums their gradients
    over the ranks that each normalise part of the sequence)."""

    def affine(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.weight, self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.affine()
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def affine(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight, self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.affine()
        out = F.rms_norm(x, weight.shape, weight, self.eps)
        return out if bias is None else out + bias


class ScaleNorm(nn.Module):
    """x / max(||x||, eps) * g, one learned scalar g (Nguyen & Salazar, 2019); gpt-neox's parameter name."""

    own_init = "norm"  # neox/model/init.py: the gain is 1

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.g.fill_(1.0)

    def affine(self) -> tuple[torch.Tensor, None]:
        return self.g, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=self.eps) * self.affine()[0]


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden_size, cfg.rms_norm_epsilon, cfg.use_bias_in_norms)
    if cfg.norm == "scalenorm":
        return ScaleNorm(cfg.scalenorm_epsilon)
    if cfg.norm == "non_parametric_layernorm":
        return LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, elementwise_affine=False)
    return LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, bias=cfg.use_bias_in_norms)


class QKNorm(nn.Module):
    """gpt-neox's qk norm: the model's norm type built for the shape [heads, head_dim] and applied to queries and
    keys laid out [b, s, heads, head_dim]. LayerNorm (torch's, normalized_shape [heads, head_dim]) normalises over
    all heads' dims of a token at once; RMSNorm and ScaleNorm (gpt-neox's own, reducing the last dim) over each
    head's dims. Weight and bias have one entry per (head, dim); ScaleNorm one scalar.

    `heads` is this module's number of heads and `total_heads` the number a token's statistics run over (they
    differ only on a tensor-parallel rank, see neox/parallel/tensor.py); `stat_sum` sums a statistic over those.
    """

    own_init = "norm"  # neox/model/init.py: scales 1, biases 0 (the weight is a matrix only by shape)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        shape = (cfg.num_attention_heads, cfg.head_dim)
        self.kind = cfg.norm
        self.total_heads = cfg.num_attention_heads
        self.eps = {"rmsnorm": cfg.rms_norm_epsilon, "scalenorm": cfg.scalenorm_epsilon}.get(
            cfg.norm, cfg.layernorm_epsilon)
        affine = cfg.norm in ("layernorm", "rmsnorm")
        self.weight = nn.Parameter(torch.ones(shape)) if affine else None
        self.bias = nn.Parameter(torch.zeros(shape)) if affine and cfg.use_bias_in_norms else None
        self.g = nn.Parameter(torch.ones(1)) if cfg.norm == "scalenorm" else None

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for p in (self.weight, self.g):
                if p is not None:
                    p.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    # The three hooks a tensor-parallel rank overrides (neox/parallel/tensor.py: ParallelQKNorm).
    def stat_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def head_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.weight, self.bias

    def gain(self) -> torch.Tensor:
        return self.g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, heads, s, head_dim] (the attention layout) -> normalised, same layout."""
        x = x.transpose(1, 2)  # [b, s, heads, d]: the layout gpt-neox normalises
        weight, bias = self.head_weights()
        if self.kind == "scalenorm":
            out = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=self.eps) * self.gain()
        elif self.kind == "rmsnorm":
            out = F.rms_norm(x, (x.shape[-1],), None, self.eps) * weight
            out = out if bias is None else out + bias
        elif self.total_heads == x.shape[2]:  # all heads here: torch's LayerNorm over [heads, head_dim]
            out = F.layer_norm(x, x.shape[-2:], weight, bias, self.eps)
        else:  # a tensor-parallel rank: the statistics of a token span every rank's heads
            count = self.total_heads * x.shape[-1]
            mean = self.stat_sum(x.sum(dim=(-2, -1), keepdim=True)) / count
            centred = x - mean
            var = self.stat_sum(centred.square().sum(dim=(-2, -1), keepdim=True)) / count
            out = centred * torch.rsqrt(var + self.eps)
            if weight is not None:
                out = out * weight if bias is None else torch.addcmul(bias, out, weight)
        return out.transpose(1, 2)
