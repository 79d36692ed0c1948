"""The interface every training objective implements: one class per gpt-neox `train_impl`, called the same way by
both engines (neox/train/engine.py TrainEngine, neox/parallel/engine.py ParallelTrainEngine) on every layout.

One optimizer step, on each data-parallel rank:

1. The engine pulls the step's `grad_accum` micro-batches from the loader (dicts of tensors, see `Batch`).
2. `prepare(micro_batches, engine)` runs once on them: the place to add per-sample inputs that need the model or
   outside data before the step (reference log-probs of a frozen reference model, say). Default: unchanged.
3. `count(batch)` of every micro-batch is summed and all-reduced over the data-parallel group: the number of loss
   UNITS in the global batch (unmasked target tokens for lm/sft, pairs for dpo/rm, samples for kto).
4. For each micro-batch: `logits = model(*model_inputs(batch))`, `out = loss(logits, targets(batch), ctx)`.
   `out.loss` is the SUM of this micro-batch's per-unit losses; the engine backpropagates
   `out.loss / (global_count / (grad_accum * dp))`. DeepSpeed then divides by grad_accum and averages over dp, so the
   gradient is that of (sum over the whole global batch) / global_count: the mean over every unit of the global
   batch, whatever the micro-batch size, accumulation and dp split (neox/parallel/global_batch.py does this for both
   engines: train sits above parallel, so the engines take the objective as an argument and never import it).
5. `out.metrics` (name -> (sum, count)) are summed over the micro-batches and the dp ranks and divided: the global
   batch's mean of each, written to metrics.jsonl under that name by the loop. `metric_names` lists them up front
   (a pipeline's first stage, which writes the metrics, never runs the loss).

Under pipeline parallelism the first stage receives `model_inputs(batch)` (exactly (tokens, position_ids)), the last
stage `targets(batch)` (a tuple of tensors, whatever the objective needs: DeepSpeed ships it as is) and calls
`loss(logits, targets, ctx)` with the logits of the WHOLE micro-batch. A pairwise objective (`pairwise = True`, the
batches of `dataset_impl: pairwise`) therefore gets chosen and rejected in one forward: the loader concatenates them
along the batch dimension, rows [0, m) chosen and [m, 2m) rejected (TRL's concatenated forward), and the loss splits
the logits with `split_pairs`.

Logits may be vocab-sharded (tensor parallelism without a row-parallel head): an objective never reads them
directly, only through the LossContext (neox/parallel/global_batch.py: `ctx.token_cross_entropy`,
`ctx.token_log_probs`, `ctx.token_correct`), which reduce across the shards.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from neox.parallel.global_batch import LossContext, TokenLoss

__all__ = ["Batch", "LossContext", "LossOutput", "Objective", "TokenLoss", "masked_token_sum", "sequence_log_probs",
           "split_pairs", "window_means"]

# A loader micro-batch: "tokens", "labels" (long, [rows, seq]; labels already shifted: labels[:, i] follows
# tokens[:, i]), "loss_mask" (float, 1 where the label is trained), "position_ids" (long); with train/valid/test
# _reward_data_paths also "reward" (float [rows, seq], the document's reward at each of its tokens). Pairwise
# batches (dataset_impl pairwise) hold 2m rows: the m chosen samples, then their m rejected samples, in order.
Batch = dict[str, torch.Tensor]


@dataclass
class LossOutput:
    """One micro-batch's contribution: the SUM of its per-unit losses (the engine normalises it), and metric sums.

    metrics: name -> (sum over this micro-batch, count of the items summed), both 0-dim tensors; the loop reports
    sum(sums) / sum(counts) over the global batch. Detach them (they are reported, not trained)."""

    loss: torch.Tensor
    metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class Objective(ABC):
    """One training objective (gpt-neox `train_impl`). Subclasses set `name` and implement `count` and `loss`."""

    name: ClassVar[str]  # the train_impl value
    pairwise: ClassVar[bool] = False  # batches hold chosen rows then rejected rows (dataset_impl: pairwise)
    metric_names: ClassVar[tuple[str, ...]] = ()  # every key `loss` puts in LossOutput.metrics, in this order

    def prepare(self, micro_batches: list[Batch], engine: Any) -> list[Batch]:
        """Once per step (and per evaluation batch), before counting: add per-sample inputs to the micro-batches.
        `engine` is the TrainEngine/ParallelTrainEngine running the step. Default: the batches unchanged."""
        return micro_batches

    def model_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, position_ids): what the model (a pipeline's first stage) reads."""
        return batch["tokens"], batch["position_ids"]

    def targets(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """The tensors `loss` reads besides the logits (a pipeline's last stage receives exactly these)."""
        return batch["labels"], batch["loss_mask"]

    def derived_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """Metrics computed from the global batch's means of `metric_names` (not (sum, count) means themselves, e.g.
        KTO's rewards_margin, TRL's difference of two means), merged into the step's metrics. Default: none."""
        return {}

    @abstractmethod
    def count(self, batch: Batch) -> torch.Tensor:
        """The number of loss units in this micro-batch (a 0-dim tensor): what the global mean divides by."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, targets: tuple[torch.Tensor, ...], ctx: LossContext) -> LossOutput:
        """The summed loss of one micro-batch (not divided by anything), and metric sums."""


def masked_token_sum(token_losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """sum(loss x mask) in fp32 over every position: the numerator of a mean over unmasked tokens."""
    return (token_losses.flatten().float() * loss_mask.flatten().float()).sum()


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) halves of a pairwise batch's rows: rows [0, m) and [m, 2m)."""
    rows = x.shape[0]
    if rows % 2:
        raise ValueError(f"a pairwise batch has an even number of rows (chosen then rejected), got {rows}")
    return x[: rows // 2], x[rows // 2:]


def sequence_log_probs(token_log_probs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-row sum of the unmasked tokens' log-probs ([rows]): a sequence's log-probability, as TRL's DPO sums it."""
    return (token_log_probs.float() * loss_mask.float()).sum(dim=-1)


def window_means(step_metrics: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over the logged window's steps (each step's value is already its global batch's)."""
    names = dict.fromkeys(name for metrics in step_metrics for name in metrics)
    return {name: sum(m[name] for m in step_metrics if name in m) / sum(1 for m in step_metrics if name in m)
            for name in names}
