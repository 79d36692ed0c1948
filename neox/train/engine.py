"""The DeepSpeed engine the loop trains, and one optimizer step on it.

Shared by the training loop (neox/train/run.py) and benchmarks/train_throughput.py, so the benchmark times the
very code a training run executes.
"""
from __future__ import annotations

from typing import Iterator

import torch

from neox.config.deepspeed import deepspeed_config
from neox.config.neox_config import NeoXConfig
from neox.model import GPTNeoX
from neox.model.base_shapes import mup_setup
from neox.model.mup import widths_by_param
from neox.optim import configured_optimizer, set_lr
from neox.parallel.activation_checkpoint import install_activation_checkpointing
from neox.parallel.engine import ParallelTrainEngine
from neox.parallel.global_batch import GlobalBatchLoss, loss_context, take_micro_batches
from neox.parallel.materialize import meta_model
from neox.parallel.moe import AuxLossScale
from neox.parallel.parallelize import install_grad_norm_clipper
from neox.parallel.topology import Topology
from neox.train.objectives import LanguageModelObjective, Objective


class TrainEngine:
    """A DeepSpeed engine over our model and optimizer, plus what the loop needs to know about it.

    Every rank is a data-parallel rank. The loss is `objective`'s (neox/train/objectives; default: next-token cross
    entropy), the mean over the global batch's units (neox/parallel/global_batch.py); the objective's metrics of the
    last step are in `last_metrics`."""

    def __init__(self, cfg: NeoXConfig, model: torch.nn.Module, device: torch.device,
                 objective: Objective | None = None):
        import deepspeed

        optimizer = configured_optimizer(model, cfg.optim, device.type, widths_by_param(model))
        self.device = device
        self.model = model
        self.objective = objective if objective is not None else LanguageModelObjective()
        self.loss_context = loss_context(None, cfg.model.padded_vocab_size,
                                         half_precision=cfg.model.fp16_lm_cross_entropy)
        self.loss = GlobalBatchLoss(self.objective, self.loss_context)  # dp group: every rank
        self.last_metrics: dict[str, float] = {}
        install_activation_checkpointing(model, cfg.model, None)  # gpt-neox's DeepSpeed checkpointing keys
        self.aux_losses = AuxLossScale(model)  # MoE blocks' aux losses: the loss's backward scale, every step
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=deepspeed_config(cfg), dist_init_required=False)
        stage = cfg.optim.zero_stage
        if stage == 0 and self.engine.dp_world_size == 1:
            # Without ZeRO DeepSpeed all-reduces every gradient through flat buffers even in a data-parallel
            # world of one: two full copies of the gradients per step (0.4 s of a 2.8 s step at 70M parameters
            # on 2 CPU cores) for a sum over one rank. Numerically a no-op, so skip it.
            self.engine.enable_backward_allreduce = False
        # DeepSpeed reports the global gradient norm only from its ZeRO / fp16 / bf16 optimizers; with a plain
        # fp32 torch optimizer (ZeRO 0) it clips without keeping the norm, by a float32 sum: the clipper measures
        # the norm (fp64 sum, the same as a tp or pp layout's) and clips with that very number.
        self.clipper = None
        if stage == 0 and cfg.optim.precision == "fp32":
            self.clipper = install_grad_norm_clipper(self.engine, None, cfg.optim.gradient_clipping)

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens, position_ids = self.objective.model_inputs(batch)
        logits = self.engine(tokens.to(self.device), position_ids=position_ids.to(self.device))
        return self.loss(logits, tuple(t.to(self.device) for t in self.objective.targets(batch)))

    def micro_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One micro-batch's loss on its own (the mean over its units); no collective."""
        self.loss.begin_local([batch], self.device)
        return self._forward_loss(batch)

    def step(self, micro_batches: Iterator[dict[str, torch.Tensor]], grad_accum: int,
             lr: float) -> tuple[torch.Tensor, float | None]:
        """One optimizer step over grad_accum micro-batches: (this rank's share of the global mean loss: the mean
        over ranks is the global batch's loss, global gradient norm). Collective."""
        set_lr(self.engine.optimizer, lr)
        batches = self.objective.prepare(take_micro_batches(micro_batches, grad_accum), self)
        self.loss.begin_step(batches, self.device)
        self.aux_losses.before_step(self.engine)
        losses = []
        for batch in batches:
            loss = self._forward_loss(batch)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        self.last_metrics = self.loss.reduce_metrics(self.device)
        norm = self.engine.get_global_grad_norm()
        if norm is None and self.clipper is not None:
            norm = self.clipper.last_norm
        return torch.stack(losses).mean().float(), (None if norm is None else float(norm))

    @torch.no_grad()
    def eval_loss(self, micro_batches: Iterator[dict[str, torch.Tensor]], iters: int, grad_accum: int) -> torch.Tensor:
        """Mean over iters global batches of each one's loss (this rank's share, as step's). Collective."""
        losses = []
        for _ in range(iters):
            batches = self.objective.prepare(take_micro_batches(micro_batches, grad_accum), self)
            self.loss.begin_step(batches, self.device)
            losses.append(torch.stack([self._forward_loss(batch) for batch in batches]).mean())
        return torch.stack(losses).mean().float()


def build_train_engine(cfg: NeoXConfig, model: torch.nn.Module, device: torch.device, topo: Topology,
                       objective: Objective) -> TrainEngine | ParallelTrainEngine:
    """The engine of a run's layout: DeepSpeed's pipeline engine over tensor/pipeline shards when the run is
    model-parallel (model may then be a meta-device structure: each rank initialises its own shard), else the
    plain DeepSpeed engine over the whole model. Expert parallelism (ranks holding different experts) is
    neox.parallel's layout too."""
    if cfg.parallel.shards_parameters:
        return ParallelTrainEngine(cfg, model, device, topo, objective)
    return TrainEngine(cfg, model, device, objective)


def initial_model(cfg: NeoXConfig, value_head: bool = False, whole: bool = False) -> GPTNeoX:
    """The model a run starts from, before build_train_engine: only its structure (the meta device) when the ranks
    hold different shards of it (ParallelTrainEngine then draws each rank's shards of these same initial values),
    else the whole initialised model. whole: always the whole model (weights are about to be loaded into it)."""
    build = meta_model if cfg.parallel.shards_parameters and not whole else GPTNeoX
    return build(cfg.model, mup_setup(cfg.mup), value_head=value_head)
