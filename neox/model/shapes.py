"""The state dict GPTNeoX(cfg) has, known without building weights: checkpoint readers check what they read
against it."""
from __future__ import annotations

import torch

from neox.config.model import ModelConfig
from neox.model.model import GPTNeoX


def state_shapes(cfg: ModelConfig, value_head: bool = False) -> dict[str, torch.Size]:
    """State-dict key -> shape of GPTNeoX(cfg) (a reward model's with value_head), built on the meta device (no
    memory, no random draws)."""
    with torch.device("meta"):
        model = GPTNeoX(cfg, value_head=value_head)
    return {k: v.shape for k, v in model.state_dict().items()}
