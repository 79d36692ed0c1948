"""The reward model's head (train_impl rm): one scalar score per position instead of the vocabulary's logits.

gpt-neox's rm_linear: hidden -> 1, no bias, on the final norm's output; the objective (neox/train/objectives/rm.py)
reads the score at each sequence's last trained position. Hugging Face's *ForSequenceClassification `score` layer is
the same matrix ([1, hidden]), so an export maps it one to one. Its parameter is named `head.score.weight`: not
`head.weight`, whose name means vocabulary rows to the checkpoint and tensor-parallel code; under tensor
parallelism the head is replicated (it is hidden_size numbers) and every rank computes the same scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCORE_WEIGHT = "head.score.weight"


class _Score(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        # No nn.Linear: its constructor draws an init from the global stream; the model's init plan fills this.
        self.weight = nn.Parameter(torch.empty(1, hidden_size))


class ValueHead(nn.Module):
    """[batch, seq, hidden] -> scores [batch, seq] (fp32 accumulation is the matmul's, as for logits)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = _Score(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.score.weight).squeeze(-1)


def is_reward_model(cfg) -> bool:
    """Whether a run's (or a checkpoint's) model has the value head: train_impl rm (cfg: NeoXConfig)."""
    return cfg.data.train_impl == "rm"


def lm_weights_for_reward_model(weights: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A language model's weights as the starting point of a reward model (gpt-neox loads them the same way, not
    strictly): its vocabulary head is dropped, the model's own freshly initialised value head kept. Weights that
    already hold a value head (a reward model's) are returned as they are."""
    if SCORE_WEIGHT in weights or not isinstance(getattr(model, "head", None), ValueHead):
        return weights
    adapted = {k: v for k, v in weights.items() if k != "head.weight"}
    adapted[SCORE_WEIGHT] = model.head.score.weight.detach().clone()
    return adapted
