"""The dense feed-forward block and the activation table it shares with the mixture-of-experts block (moe.py)."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from neox.config.model import ModelConfig

ACTIVATION_FNS = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "softsign": F.softsign,
    # gated: the function applied to the gate projection
    "geglu": F.gelu,
    "reglu": F.relu,
    "swiglu": F.silu,
    "glu": torch.sigmoid,
    "bilinear": lambda x: x,
}


class MLP(nn.Module):
    """linear1 -> activation -> linear2; gated activations add a `gate` projection: act(gate) * linear1.
    inner: the hidden width (default the config's MLP width; a MoE block's shared expert passes its own)."""

    def __init__(self, cfg: ModelConfig, inner: int | None = None):
        super().__init__()
        inner = cfg.mlp_inner_size if inner is None else inner
        self.linear1 = nn.Linear(cfg.hidden_size, inner, bias=cfg.use_bias_in_mlp)
        self.gate = nn.Linear(cfg.hidden_size, inner, bias=cfg.use_bias_in_mlp) if cfg.gated_mlp else None
        self.linear2 = nn.Linear(inner, cfg.hidden_size, bias=cfg.use_bias_in_mlp)
        self.activation = ACTIVATION_FNS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.linear2(self.activation(self.linear1(x)))
        return self.linear2(self.activation(self.gate(x)) * self.linear1(x))
