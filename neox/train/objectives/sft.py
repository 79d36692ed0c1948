"""Supervised fine-tuning (train_impl 'normal' with label datasets, gpt-neox's way of writing it): cross entropy on
the unmasked tokens only (labels -100, e.g. the prompt and the user turns that tools/preprocess_data_with_chat_template
.py masks, are not trained), the mean over every unmasked token of the global batch, as TRL's SFTTrainer computes it
with its completion-only / assistant-only loss (its loss divides by the number of trained tokens of the whole
accumulated batch on every device). Also reports TRL's `mean_token_accuracy`: the share of trained tokens whose label
is the greedy prediction."""
from __future__ import annotations

import torch

from neox.train.objectives.base import LossContext, LossOutput, masked_token_sum
from neox.train.objectives.lm import LanguageModelObjective


class SFTObjective(LanguageModelObjective):
    metric_names = ("mean_token_accuracy",)

    def loss(self, logits: torch.Tensor, targets: tuple[torch.Tensor, ...], ctx: LossContext) -> LossOutput:
        labels, loss_mask = targets
        total = masked_token_sum(ctx.token_cross_entropy(logits, labels), loss_mask)
        with torch.no_grad():
            correct = masked_token_sum(ctx.token_correct(logits, labels), loss_mask)
            trained = loss_mask.double().sum()
        return LossOutput(total, {"mean_token_accuracy": (correct, trained)})
