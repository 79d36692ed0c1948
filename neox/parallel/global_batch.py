"""The loss of one optimizer step as a mean over the whole global batch, shared by both training engines.

An objective (neox/train/objectives/base.py: passed in by the trainer, which sits above this package) returns the SUM
of a micro-batch's per-unit losses and says how many units each micro-batch holds. Before the step, `GlobalBatchLoss`
counts the units of the step's micro-batches, sums the counts over the data-parallel group, and then scales every
micro-batch's summed loss by grad_accum x dp / global_count. DeepSpeed divides the backward by grad_accum and averages
the gradients over dp, so what is differentiated is (sum over the global batch) / global_count: the mean over every
unmasked token (or pair, or sample) of the global batch. A mean of per-micro-batch means would weight a token by
1 / (its micro-batch's count), so the gradients would change with the micro-batch size, the accumulation and the dp
split whenever masks leave micro-batches with different counts (gpt-neox's per-micro-batch mean does).

Without masks every micro-batch holds micro x seq tokens: the denominator is exactly that count, and the loss is
bit-for-bit today's mean per micro-batch.

Metrics are (sum, count) pairs summed over the micro-batches and the dp ranks; under a pipeline only the last stage
has them, and `reduce_metrics` hands them to every stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from neox.model.loss import half_token_cross_entropy, token_cross_entropy
from neox.parallel.tensor import vocab_parallel_cross_entropy
from neox.parallel.topology import Topology

# (logits [rows, seq, vocab or vocab/tp], labels [rows, seq]) -> a per-token float tensor [rows, seq].
TokenLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


@dataclass(frozen=True)
class LossContext:
    """What an objective's loss needs from the layout it runs on: per-token functions of the (maybe vocab-sharded)
    logits, which reduce across the tensor-parallel shards themselves."""

    token_cross_entropy: TokenLoss  # -log p(label), fp32 (fp16_lm_cross_entropy: computed in the logits' dtype)
    token_correct: TokenLoss  # 1.0 where the label's logit is the largest (the greedy prediction is right), else 0.0
    half_token_cross_entropy: TokenLoss  # -log p(label) computed in the logits' own dtype (dpo_fp32/kto_fp32 false)

    def token_log_probs(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(label) per token, fp32 [rows, seq] (TRL's per-token log-probs before masking)."""
        return -self.token_cross_entropy(logits, labels)


def loss_context(topo: Topology | None, padded_vocab_size: int, row_parallel_head: bool = False,
                 half_precision: bool = False) -> LossContext:
    """The per-token functions for this layout's logits: whole logits (one device, tp 1, or a row-parallel head),
    or vocab-sharded ones. half_precision: fp16_lm_cross_entropy."""
    if topo is None or topo.tp_size == 1 or row_parallel_head:
        def whole(half: bool) -> TokenLoss:
            per_token = half_token_cross_entropy if half else token_cross_entropy

            def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
                return per_token(logits.flatten(0, -2), labels.flatten()).float().view(labels.shape)

            return cross_entropy

        def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            target = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            return (target >= logits.max(dim=-1).values).float()

        return LossContext(whole(half_precision), correct, whole(True))
    group, vocab_start = topo.tp_group, topo.tp_rank * (padded_vocab_size // topo.tp_size)

    def sharded(half: bool) -> TokenLoss:
        def cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return vocab_parallel_cross_entropy(local_logits, labels, vocab_start, group, half).float()

        return cross_entropy

    def sharded_correct(local_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            largest = local_logits.max(dim=-1).values
            outside = (labels < vocab_start) | (labels >= vocab_start + local_logits.shape[-1])
            local_labels = (labels - vocab_start).masked_fill(outside, 0)
            target = local_logits.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1)
            target = target.masked_fill(outside, float("-inf"))
            both = torch.stack([largest, target]).float()
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)  # the label's logit lives on one shard
            return (both[1] >= both[0]).float()

    return LossContext(sharded(half_precision), sharded_correct, sharded(True))


def take_micro_batches(loader: Iterator[dict[str, torch.Tensor]], count: int) -> list[dict[str, torch.Tensor]]:
    """The next `count` micro-batches: a step's (or an evaluation batch's) whole share, read before it runs."""
    return [next(loader) for _ in range(count)]


class GlobalBatchLoss:
    """loss(logits, targets) for one micro-batch of the current step, normalised by the step's global unit count.

    Called by the engines directly, and by DeepSpeed's pipeline engine as the last stage's loss_fn (it is the
    PipelineModule's loss_fn: `__call__(logits, targets)`). `begin_step` must run first on every rank of the step.
    """

    def __init__(self, objective: Any, ctx: LossContext, dp_group=None):
        self.objective, self.ctx, self.dp_group = objective, ctx, dp_group
        self.__name__ = f"{objective.name}_loss"  # DeepSpeed's pipeline engine logs the loss_fn by name
        self.denominator: torch.Tensor | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}

    def begin_step(self, micro_batches: list[dict[str, torch.Tensor]], device: torch.device) -> None:
        """Collective over dp: count the global batch's units (every rank of a dp replica passes the same batches)."""
        self._begin(micro_batches, device, _world(self.dp_group))

    def begin_local(self, micro_batches: list[dict[str, torch.Tensor]], device: torch.device) -> None:
        """No collective: normalise by these micro-batches' own units (a loss measured on one rank alone)."""
        self._begin(micro_batches, device, 1)

    def _begin(self, micro_batches: list[dict[str, torch.Tensor]], device: torch.device, dp: int) -> None:
        count = torch.zeros((), dtype=torch.float64, device=device)
        for batch in micro_batches:
            count += self.objective.count(batch).to(device=device, dtype=torch.float64)
        if dp > 1:
            dist.all_reduce(count, group=self.dp_group)
        # The mean a micro-batch would have alone is sum / (its own count); with the global count shared out over
        # grad_accum x dp micro-batches, DeepSpeed's 1/grad_accum and dp averaging leave sum / global_count.
        per_micro = count.clamp(min=1.0) / (len(micro_batches) * dp)
        self.denominator = per_micro.float()
        self._sums, self._counts = {}, {}

    def __call__(self, logits: torch.Tensor, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.denominator is None:
            raise RuntimeError("GlobalBatchLoss called before begin_step: the global batch's unit count is unknown")
        out = self.objective.loss(logits, targets, self.ctx)
        for name, (total, n) in out.metrics.items():
            self._sums[name] = self._sums.get(name, 0.0) + total.detach().double()
            self._counts[name] = self._counts.get(name, 0.0) + torch.as_tensor(n).detach().double()
        return out.loss / self.denominator.to(out.loss.device)

    def reduce_metrics(self, device: torch.device, pp_group=None, is_last_stage: bool = True) -> dict[str, float]:
        """Collective (dp, then pp): the global batch's mean of each of the objective's metrics, then the metrics the
        objective derives from those means (objective.derived_metrics)."""
        names = self.objective.metric_names
        if not names:
            return {}
        sums = torch.zeros(2 * len(names), dtype=torch.float64, device=device)
        if is_last_stage:
            for i, name in enumerate(names):
                sums[i] = self._sums.get(name, 0.0)
                sums[len(names) + i] = self._counts.get(name, 0.0)
        if _world(self.dp_group) > 1:
            dist.all_reduce(sums, group=self.dp_group)
        if pp_group is not None and _world(pp_group) > 1:
            dist.all_reduce(sums, group=pp_group)  # only the last stage holds non-zero sums
        self._sums, self._counts = {}, {}
        means = {name: float(sums[i] / sums[len(names) + i]) if sums[len(names) + i] > 0 else float("nan")
                 for i, name in enumerate(names)}
        return {**means, **self.objective.derived_metrics(means)}
