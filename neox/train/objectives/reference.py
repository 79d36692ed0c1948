"""The reference model of DPO and KTO, and forward-only sequence log-probs on every layout.

The reference is the model the run starts from, frozen. It is not a second model: `FrozenReference` keeps a copy of
what THIS rank holds of the policy's weights when training starts (its tensor-parallel shard of its pipeline stage's
layers), and `swapped_in()` puts those values into the policy's own parameters
for the length of a no-grad forward, then puts the trained values back. The reference therefore runs through the very
same modules, sharding and pipeline stages as the policy, at the cost of one copy of this rank's share of the
weights (gpt-neox builds a second DeepSpeed engine, TRL a second model).

Under ZeRO-3 a rank holds only its partition of each parameter (`param.ds_tensor`); DeepSpeed gathers the whole value
into `param.data` around each module's forward, keeps the small "persistent" parameters (stage3_param_persistence_
threshold) gathered from one step to the next, and leaves parameters it prefetched or expects to reuse gathered after
a forward. So the reference is the rank's partitions only, and every gathered value is released (DeepSpeed's
`empty_partition_cache`) before they are swapped in and again before they are swapped out: the reference forward
gathers from the reference partitions, the next training forward from the trained ones (persistent parameters are
gathered again then, a few small all-gathers). Swapping the partitions without these releases goes wrong from the
second step (the reference forward reads the persistent parameters' trained values, and once DeepSpeed's trace is
complete the next training forward reads parameters the prefetcher gathered from the reference partitions).

`SequenceLogProbs` runs such forwards: every rank of a model replica calls it with the same micro-batches (as they
hold the same batches); without a pipeline it calls the engine's module, with one it runs the stages point to point
(neox/parallel/stage_forward.py) over the training modules, and the last stage, the one that computes the loss and
needs the values, gets them (other stages get None).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from neox.parallel.stage_forward import PipelineStage
from neox.train.objectives.base import Batch, LossContext, sequence_log_probs


def _held(param: nn.Parameter) -> torch.Tensor:
    """The tensor holding this rank's values of a parameter: itself, or under ZeRO-3 its partition."""
    return param.ds_tensor if getattr(param, "ds_tensor", None) is not None else param


class FrozenReference:
    """This rank's share of the policy's weights at one moment (the start of training), restorable around a forward.

    `release`: under ZeRO-3, the optimizer's call that partitions every gathered parameter (None otherwise)."""

    def __init__(self, module: nn.Module, release: Callable[[], None] | None = None):
        self.release = release
        self.tensors = [_held(p) for p in dict.fromkeys(module.parameters())]
        with torch.no_grad():
            self.values = [t.data.detach().clone() for t in self.tensors]

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        self._release()
        trained = [t.data for t in self.tensors]
        try:
            for t, value in zip(self.tensors, self.values):
                t.data = value
            yield
        finally:
            self._release()
            for t, value in zip(self.tensors, trained):
                t.data = value

    def _release(self) -> None:
        if self.release is not None:
            self.release()


class SequenceLogProbs:
    """Forward-only sum of log p(label) over each row's trained positions, with the current or the reference weights.

    `train_engine` is the engine of the step (neox/train/engine.py or neox/parallel/engine.py): its DeepSpeed engine,
    its model and loss context, and under pipeline parallelism its topology. `fp32`: the log-probs from fp32 logits
    (dpo_fp32 / kto_fp32), else in the logits' dtype. `zero3`: the run's ZeRO stage is 3 (the reference is then
    the rank's own partitions, and gathered parameters are released around each swap)."""

    def __init__(self, fp32: bool, partition_method: str | None, zero3: bool = False):
        self.fp32 = fp32
        self.zero3 = zero3
        self.partition_method = partition_method
        self.reference: FrozenReference | None = None
        self._stage: PipelineStage | None = None

    def freeze_reference(self, train_engine: Any) -> None:
        """Keep this rank's share of the current weights as the reference (once: the first call wins)."""
        if self.reference is None:
            engine = train_engine.engine
            # The ZeRO-3 optimizer's own call: the engine's wraps it in a gc.collect() (0.5 s a call here).
            release = engine.optimizer.empty_partition_cache if self.zero3 else None
            self.reference = FrozenReference(engine.module, release)

    def __call__(self, train_engine: Any, batches: list[Batch], reference: bool) -> list[torch.Tensor | None]:
        """Per micro-batch: [rows] fp32 log-probs of batch["labels"] summed where batch["loss_mask"] is 1, on the
        rank that computes the loss (None on the other pipeline stages)."""
        module = train_engine.engine.module
        was_training = module.training
        module.eval()  # no dropout, no activation recomputation: the reference is a fixed function
        try:
            with torch.no_grad():
                if reference:
                    self.freeze_reference(train_engine)
                    with self.reference.swapped_in():
                        return [self._one(train_engine, b) for b in batches]
                return [self._one(train_engine, b) for b in batches]
        finally:
            module.train(was_training)

    def _one(self, train_engine: Any, batch: Batch) -> torch.Tensor | None:
        device = train_engine.device
        tokens, position_ids = batch["tokens"].to(device), batch["position_ids"].to(device)
        logits = self._forward(train_engine, tokens, position_ids)
        if logits is None:
            return None
        ctx: LossContext = train_engine.loss_context
        labels = batch["labels"].to(device)
        if self.fp32:
            token_logps = ctx.token_log_probs(logits.float(), labels)
        else:
            token_logps = -ctx.half_token_cross_entropy(logits, labels).float()
        return sequence_log_probs(token_logps, batch["loss_mask"].to(device))

    def _forward(self, train_engine: Any, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor | None:
        topo = getattr(train_engine, "topo", None)
        if topo is None or not topo.use_pipeline:
            return train_engine.engine.module(tokens, position_ids=position_ids)
        if self._stage is None:
            # This stage's training modules (already tensor-parallel), run without DeepSpeed's schedule.
            self._stage = PipelineStage(train_engine.model, topo, self.partition_method, parallelised=True)
        return self._stage(tokens, position_ids)
