"""The DeepSpeed engine for a tensor- and/or pipeline-parallel layout, with TrainEngine's interface.

Built in one ordered place: tensor parallelism on the single-device model (a meta-device model is then
materialised as this rank's shards of the single-device initial values, in its pipeline stage's layers only) ->
PipelineModule spec (when pipe_parallel_size >= 1) -> optimizer over this rank's parameters -> deepspeed.initialize
with the grid as mpu -> gradient-norm clipping that counts tp-replicated and tied parameters once (ZeRO 0).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from neox.config.deepspeed import deepspeed_config
from neox.config.neox_config import NeoXConfig
from neox.model import GPTNeoX
from neox.model.mup import widths_by_param
from neox.optim import configured_optimizer, set_lr
from neox.parallel.activation_checkpoint import install_activation_checkpointing, reset_after_forward_only
from neox.parallel.lora import check_stage_trains
from neox.parallel.expert_parallel import apply_expert_parallel
from neox.parallel.global_batch import GlobalBatchLoss, loss_context, take_micro_batches
from neox.parallel.materialize import is_meta, materialize
from neox.parallel.moe import AuxLossScale
from neox.parallel.parallelize import apply_tensor_parallel, install_grad_norm_clipper
from neox.parallel.pipeline import build_pipeline_module, pipeline_batches, stage_parameters
from neox.parallel.topology import Topology


class ParallelTrainEngine:
    """objective: a neox/train/objectives Objective (train sits above parallel, so it is handed in, never imported);
    the loss is its mean over the global batch's units (neox/parallel/global_batch.py), its metrics of the last step
    are in `last_metrics` on every rank."""

    def __init__(self, cfg: NeoXConfig, model: GPTNeoX, device: torch.device, topo: Topology, objective: Any):
        import deepspeed

        self.topo, self.device = topo, device
        self.model, self.objective = model, objective
        self.model_cfg = cfg.model
        sequence_parallel = cfg.parallel.shards_sequence
        apply_tensor_parallel(model, topo, row_parallel_head=cfg.model.row_parallel_head,
                              sequence_parallel=sequence_parallel)
        apply_expert_parallel(model, topo)  # this rank's experts of each MoE block (dim 0, after tp's dim 1)
        if is_meta(model):
            # Built on the meta device: this rank's shards of the single-device initial values, drawn alone (the
            # full model never exists here); a pipeline stage draws only its own layers, the others stay meta.
            own = (stage_parameters(model, topo, cfg.parallel.pipe_partition_method) if topo.use_pipeline
                   else None)
            materialize(model, topo.tp_rank, topo.tp_size, own, topo.ep_rank, topo.ep_size)
        # Single-device names by parameter identity: the pipeline stages wrap these very parameters.
        self.param_names = {id(p): n for n, p in model.named_parameters()}
        self.loss_context = loss_context(topo, cfg.model.padded_vocab_size, cfg.model.row_parallel_head,
                                         cfg.model.fp16_lm_cross_entropy)
        # Also the pipeline's loss_fn: DeepSpeed calls it on the last stage with (logits, targets).
        self.loss = GlobalBatchLoss(objective, self.loss_context, topo.dp_group)
        self.last_metrics: dict[str, float] = {}
        checkpoint_func = install_activation_checkpointing(model, cfg.model, topo, sequence_parallel)
        self.aux_losses = AuxLossScale(model)  # MoE blocks' aux losses: the loss's backward scale, every step
        module: torch.nn.Module = model
        if topo.use_pipeline:
            module = build_pipeline_module(model, topo, self.loss, cfg.parallel.pipe_partition_method,
                                           cfg.model.checkpoint_activations, cfg.model.checkpoint_num_layers,
                                           checkpoint_func)
        if topo.use_pipeline:
            check_stage_trains(module, topo.pp_rank, cfg.parallel.pipe_partition_method)
        optimizer = configured_optimizer(module, cfg.optim, device.type, widths_by_param(model))
        # A PipelineModule carries its own grid (same topology); a plain module gets ours as DeepSpeed's mpu.
        mpu = None if topo.use_pipeline else topo.grid
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, mpu=mpu,
                                                    config=deepspeed_config(cfg), dist_init_required=False)
        self.clipper = None
        if cfg.optim.zero_stage == 0 and cfg.optim.precision == "fp32":
            self.clipper = install_grad_norm_clipper(self.engine, topo, cfg.optim.gradient_clipping)

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens, position_ids = self.objective.model_inputs(batch)
        logits = self.engine(tokens.to(self.device), position_ids=position_ids.to(self.device))
        return self.loss(logits, tuple(t.to(self.device) for t in self.objective.targets(batch)))

    def micro_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One micro-batch's loss on its own (the mean over its units); no data-parallel collective."""
        if self.topo.use_pipeline:
            raise RuntimeError("micro_loss runs the whole model on one rank; a pipeline evaluates through "
                               "eval_loss (DeepSpeed's eval_batch)")
        self.loss.begin_local([batch], self.device)
        return self._forward_loss(batch)

    def _batches(self, micro_batches: Iterator[dict[str, torch.Tensor]], count: int) -> list[dict[str, torch.Tensor]]:
        """The next global batch's micro-batches of this replica, prepared and counted (collective over dp)."""
        batches = self.objective.prepare(take_micro_batches(micro_batches, count), self)
        self.loss.begin_step(batches, self.device)
        return batches

    def _pipeline_input(self, batches: list[dict[str, torch.Tensor]]) -> Iterator[tuple[tuple, tuple]]:
        return pipeline_batches(batches, self.objective.model_inputs, self.objective.targets)

    def step(self, micro_batches: Iterator[dict[str, torch.Tensor]], grad_accum: int,
             lr: float) -> tuple[torch.Tensor, float | None]:
        """One optimizer step: (this dp replica's share of the global mean loss, the global gradient norm)."""
        set_lr(self.engine.optimizer, lr)
        batches = self._batches(micro_batches, grad_accum)
        self.aux_losses.before_step(self.engine)
        if self.topo.use_pipeline:
            # The loss comes from the last stage, averaged over micro-batches, broadcast along the pipeline.
            loss = self.engine.train_batch(self._pipeline_input(batches)).detach().float()
        else:
            losses = []
            for batch in batches:
                micro_loss = self._forward_loss(batch)
                self.engine.backward(micro_loss)
                self.engine.step()
                losses.append(micro_loss.detach())
            loss = torch.stack(losses).mean().float()
        self.last_metrics = self.loss.reduce_metrics(self.device, self.topo.grid.get_pipe_parallel_group(),
                                                     self.topo.is_last_stage)
        norm = self.engine.get_global_grad_norm()
        if norm is None and self.clipper is not None:
            norm = self.clipper.last_norm
        return loss, (None if norm is None else float(norm))

    @torch.no_grad()
    def eval_loss(self, micro_batches: Iterator[dict[str, torch.Tensor]], iters: int, grad_accum: int) -> torch.Tensor:
        """Mean over iters global batches of each one's loss (this dp replica's share, as step's). Collective."""
        losses = []
        for _ in range(iters):
            batches = self._batches(micro_batches, grad_accum)
            if self.topo.use_pipeline:
                loss = self.engine.eval_batch(self._pipeline_input(batches), num_micro_batches=grad_accum)
                losses.append(torch.as_tensor(loss).float())
            else:
                losses.append(torch.stack([self._forward_loss(batch) for batch in batches]).mean().float())
        if self.topo.use_pipeline:
            reset_after_forward_only(self.model_cfg)  # DeepSpeed's pipeline checkpoints its eval forwards too
        return torch.stack(losses).mean()
