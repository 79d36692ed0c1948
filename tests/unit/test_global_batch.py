"""neox/parallel/global_batch.py in one process: the arithmetic that makes the trained loss the mean over every unit of
the global batch, and the metrics the objectives report (the multi-rank and engine checks: tests/distributed/
test_sft.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from neox.parallel.global_batch import GlobalBatchLoss, loss_context
from neox.train.objectives import SFTObjective

VOCAB, SEQ = 11, 6


def micro_batch(seed: int, trained: list[int]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(trained), SEQ)
    for row, n in enumerate(trained):
        mask[row, SEQ - n:] = 1.0
    return {"tokens": torch.randint(0, VOCAB, (len(trained), SEQ), generator=gen),
            "labels": torch.randint(0, VOCAB, (len(trained), SEQ), generator=gen), "loss_mask": mask,
            "position_ids": torch.arange(SEQ).expand(len(trained), SEQ)}


def test_scaled_micro_losses_average_to_the_global_token_mean():
    batches = [micro_batch(0, [1, 6]), micro_batch(1, [2, 0]), micro_batch(2, [5, 3])]
    logits = [torch.randn(2, SEQ, VOCAB, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    loss = GlobalBatchLoss(SFTObjective(), loss_context(None, VOCAB))
    loss.begin_local(batches, torch.device("cpu"))
    # DeepSpeed divides each backward by grad_accum (3): what it differentiates is the mean of the scaled losses.
    trained = torch.stack([loss(l, (b["labels"], b["loss_mask"])) for l, b in zip(logits, batches)]).mean()
    every = torch.cat([F.cross_entropy(l.flatten(0, 1), b["labels"].flatten(), reduction="none")
                       for l, b in zip(logits, batches)])
    mask = torch.cat([b["loss_mask"].flatten() for b in batches])
    assert torch.allclose(trained, every[mask > 0].mean(), rtol=1e-6)
    per_micro = torch.stack([every[i * 2 * SEQ:(i + 1) * 2 * SEQ][mask[i * 2 * SEQ:(i + 1) * 2 * SEQ] > 0].mean()
                             for i in range(3)]).mean()
    assert abs(float(per_micro - trained)) > 1e-3  # the old mean of micro-batch means is another number
    accuracy = loss.reduce_metrics(torch.device("cpu"))["mean_token_accuracy"]
    correct = torch.cat([(l.argmax(-1) == b["labels"]).flatten() for l, b in zip(logits, batches)])
    assert accuracy == float(correct[mask > 0].double().mean())


class MarginSFT(SFTObjective):
    def derived_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return {"error_rate": 1.0 - means["mean_token_accuracy"]}


def test_derived_metrics_join_the_reduced_means():
    batch = micro_batch(3, [4, 4])
    logits = torch.randn(2, SEQ, VOCAB)
    loss = GlobalBatchLoss(MarginSFT(), loss_context(None, VOCAB))
    loss.begin_local([batch], torch.device("cpu"))
    loss(logits, (batch["labels"], batch["loss_mask"]))
    metrics = loss.reduce_metrics(torch.device("cpu"))
    assert set(metrics) == {"mean_token_accuracy", "error_rate"}
    assert metrics["error_rate"] == 1.0 - metrics["mean_token_accuracy"]
