"""train_impl 'normal' without label datasets: next-token cross entropy, the mean over the global batch's unmasked
tokens (every token, or all but end-of-document inputs with eod_mask_loss, or all but padding)."""
from __future__ import annotations

import torch

from neox.train.objectives.base import Batch, LossContext, LossOutput, Objective, masked_token_sum


class LanguageModelObjective(Objective):
    name = "normal"

    def count(self, batch: Batch) -> torch.Tensor:
        return batch["loss_mask"].double().sum()

    def loss(self, logits: torch.Tensor, targets: tuple[torch.Tensor, ...], ctx: LossContext) -> LossOutput:
        labels, loss_mask = targets
        return LossOutput(masked_token_sum(ctx.token_cross_entropy(logits, labels), loss_mask))
