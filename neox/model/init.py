"""gpt-neox's weight initialisations, chosen by name from the config."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from neox.config.model import ModelConfig

# Linear layers writing into the residual stream take output_layer_init_method.
RESIDUAL_OUTPUTS = ("attention.dense", "mlp.linear2")


def init_std(method: str, cfg: ModelConfig) -> float | None:
    """Standard deviation of a normal-distribution method; None for orthogonal / xavier methods."""
    sigma, layers, width = cfg.init_method_std, cfg.num_layers, cfg.hidden_size
    stds = {
        "normal": sigma,
        "scaled_normal": sigma / math.sqrt(2.0 * layers),
        "single_residual_scaled_normal": sigma / math.sqrt(layers),
        "wang_init": 2.0 / layers / math.sqrt(width),
        "small_init": math.sqrt(2.0 / (5.0 * width)),
    }
    return stds.get(method)


def init_fn(method: str, cfg: ModelConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    std = init_std(method, cfg)
    if std is not None:
        return lambda w: nn.init.normal_(w, mean=0.0, std=std)
    if method == "orthogonal":
        return lambda w: nn.init.orthogonal_(w, gain=math.sqrt(2.0))
    if method == "scaled_orthogonal":
        return lambda w: nn.init.orthogonal_(w, gain=math.sqrt(2.0 / cfg.num_layers))
    if method == "xavier_uniform":
        return nn.init.xavier_uniform_
    if method == "xavier_normal":
        return nn.init.xavier_normal_
    raise ValueError(f"unknown init method {method!r}")  # unreachable after ModelConfig.validate()


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Matrices (linears, embeddings, head) by the configured methods; vectors: norm scales 1, biases 0."""
    hidden_init = init_fn(cfg.init_method, cfg)
    output_init = init_fn(cfg.output_layer_init_method, cfg)
    for name, module in model.named_modules():
        if getattr(module, "keeps_own_init", False):
            module.reset_parameters()  # its own gpt-neox init (the T5 table's xavier-normal, gains of 1)
            continue
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        if weight.dim() == 1:
            weight.fill_(1.0)
        elif name.endswith(RESIDUAL_OUTPUTS):
            output_init(weight)
        else:
            hidden_init(weight)
        bias = module._parameters.get("bias")
        if bias is not None:
            bias.zero_()
