"""train_impl 'rm': a reward model trained on preference pairs (gpt-neox's rm, TRL's RewardTrainer).

The model's head is a scalar value head (neox/model/value_head.py): one score per position. A sequence's reward is
the score at its LAST trained position (the last 1 of its loss mask): with tools/preprocess_data_with_chat_template.py
--for-rm data, whose only trained label is the final end-of-text token, that is the position reading the text and its
end-of-text token, the last token Hugging Face's *ForSequenceClassification scores (the last non-pad token).

Loss per pair: -log sigmoid(r_chosen - r_rejected) (Bradley-Terry) + z_loss x (r_chosen^2 + r_rejected^2) (gpt-neox's
z-loss; 0 by default, which is TRL's RewardTrainer without center_rewards_coefficient), the mean over the pairs of the
global batch. Metrics (global-batch means over pairs): rewards_chosen, rewards_rejected, rewards_accuracy (r_chosen >
r_rejected), rewards_margin (r_chosen - r_rejected): TRL's mean_reward split by side, accuracy and margin.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from neox.data.errors import DataError
from neox.train.objectives.base import Batch, LossContext, LossOutput, Objective, split_pairs

REWARD_METRICS = ("rewards_chosen", "rewards_rejected", "rewards_accuracy", "rewards_margin")


def last_trained_position(loss_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the last position whose label is trained ([rows], long). A row with none has no
    sequence to score: that is bad data (e.g. a text longer than seq_length whose trained end was cut off)."""
    trained = loss_mask > 0
    if not bool(trained.any(dim=-1).all()):
        rows = (~trained.any(dim=-1)).nonzero().flatten().tolist()
        raise DataError(f"reward-model rows {rows[:5]} of this micro-batch have no trained position: their text was "
                         "cut off at seq_length, or their label data masks everything; drop or shorten those pairs")
    positions = torch.arange(loss_mask.shape[-1], device=loss_mask.device)
    return torch.where(trained, positions, -1).max(dim=-1).values


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(sum, count) over the pairs of one micro-batch of TRL's reward statistics (chosen/rejected rewards)."""
    with torch.no_grad():
        chosen, rejected = chosen.detach().double(), rejected.detach().double()
        n = torch.tensor(float(chosen.numel()), dtype=torch.float64, device=chosen.device)
        return {"rewards_chosen": (chosen.sum(), n), "rewards_rejected": (rejected.sum(), n),
                "rewards_accuracy": ((chosen > rejected).double().sum(), n),
                "rewards_margin": ((chosen - rejected).sum(), n)}


class RewardModelObjective(Objective):
    name = "rm"
    pairwise = True
    metric_names = REWARD_METRICS

    def __init__(self, z_loss: float = 0.0):
        self.z_loss = z_loss

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["tokens"].shape[0] // 2, dtype=torch.float64)

    def targets(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return (batch["loss_mask"],)

    def loss(self, logits: torch.Tensor, targets: tuple[torch.Tensor, ...], ctx: LossContext) -> LossOutput:
        (loss_mask,) = targets
        scores = logits.float()  # the value head's [rows, seq]
        if scores.dim() == 3:
            scores = scores.squeeze(-1)
        where = last_trained_position(loss_mask)
        rewards = scores.gather(1, where[:, None]).squeeze(1)
        chosen, rejected = split_pairs(rewards)
        per_pair = -F.logsigmoid(chosen - rejected)
        if self.z_loss:
            per_pair = per_pair + self.z_loss * (chosen ** 2 + rejected ** 2)
        return LossOutput(per_pair.sum(), pair_metrics(chosen, rejected))


def from_config(cfg) -> RewardModelObjective:
    """The rm objective of a run (cfg: NeoXConfig)."""
    return RewardModelObjective(cfg.post_training.z_loss)
