"""The DeepSpeed engine for a tensor- and/or pipeline-parallel layout, with TrainEngine's interface.

Built in one ordered place: tensor parallelism on the single-device model (a meta-device model is then
materialised as this rank's shards of the single-device initial values, in its pipeline stage's layers only) ->
PipelineModule spec (when pipe_parallel_size >= 1) -> optimizer over this rank's parameters -> deepspeed.initialize
with the grid as mpu -> gradient-norm clipping that counts tp-replicated and tied parameters once (ZeRO 0).
"""
from __future__ import annotations

from typing import Iterator

import torch

from neox.config.deepspeed import deepspeed_config
from neox.config.neox_config import NeoXConfig
from neox.model import GPTNeoX
from neox.model.mup import widths_by_param
from neox.optim import configured_optimizer, set_lr
from neox.parallel.activation_checkpoint import install_activation_checkpointing, reset_after_forward_only
from neox.parallel.materialize import is_meta, materialize
from neox.parallel.parallelize import apply_tensor_parallel, install_grad_norm_clipper, lm_loss_fn
from neox.parallel.pipeline import build_pipeline_module, pipeline_batches, stage_parameters
from neox.parallel.topology import Topology


class ParallelTrainEngine:
    def __init__(self, cfg: NeoXConfig, model: GPTNeoX, device: torch.device, topo: Topology):
        import deepspeed

        self.topo, self.device = topo, device
        self.model_cfg = cfg.model
        sequence_parallel = cfg.parallel.shards_sequence
        apply_tensor_parallel(model, topo, row_parallel_head=cfg.model.row_parallel_head,
                              sequence_parallel=sequence_parallel)
        if is_meta(model):
            # Built on the meta device: this rank's shards of the single-device initial values, drawn alone (the
            # full model never exists here); a pipeline stage draws only its own layers, the others stay meta.
            own = (stage_parameters(model, topo, cfg.parallel.pipe_partition_method) if topo.use_pipeline
                   else None)
            materialize(model, topo.tp_rank, topo.tp_size, own)
        # Single-device names by parameter identity: the pipeline stages wrap these very parameters.
        self.param_names = {id(p): n for n, p in model.named_parameters()}
        self.loss_fn = lm_loss_fn(topo, cfg.model.padded_vocab_size, cfg.model.row_parallel_head,
                                  cfg.model.fp16_lm_cross_entropy)
        checkpoint_func = install_activation_checkpointing(model, cfg.model, topo, sequence_parallel)
        module: torch.nn.Module = model
        if topo.use_pipeline:
            module = build_pipeline_module(model, topo, self.loss_fn, cfg.parallel.pipe_partition_method,
                                           cfg.model.checkpoint_activations, cfg.model.checkpoint_num_layers,
                                           checkpoint_func)
        optimizer = configured_optimizer(module, cfg.optim, device.type, widths_by_param(model))
        # A PipelineModule carries its own grid (same topology); a plain module gets ours as DeepSpeed's mpu.
        mpu = None if topo.use_pipeline else topo.grid
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, mpu=mpu,
                                                    config=deepspeed_config(cfg), dist_init_required=False)
        self.clipper = None
        if cfg.optim.zero_stage == 0 and cfg.optim.precision == "fp32":
            self.clipper = install_grad_norm_clipper(self.engine, topo, cfg.optim.gradient_clipping)

    def micro_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.topo.use_pipeline:
            raise RuntimeError("micro_loss runs the whole model on one rank; a pipeline evaluates through "
                               "eval_loss (DeepSpeed's eval_batch)")
        device = self.device
        logits = self.engine(batch["tokens"].to(device), position_ids=batch["position_ids"].to(device))
        return self.loss_fn(logits, batch["labels"].to(device), batch["loss_mask"].to(device))

    def step(self, micro_batches: Iterator[dict[str, torch.Tensor]], grad_accum: int,
             lr: float) -> tuple[torch.Tensor, float | None]:
        """One optimizer step: (this dp replica's mean loss, the global gradient norm)."""
        set_lr(self.engine.optimizer, lr)
        if self.topo.use_pipeline:
            # The loss comes from the last stage, averaged over micro-batches, broadcast along the pipeline.
            loss = self.engine.train_batch(pipeline_batches(micro_batches)).detach().float()
        else:
            losses = []
            for _ in range(grad_accum):
                micro_loss = self.micro_loss(next(micro_batches))
                self.engine.backward(micro_loss)
                self.engine.step()
                losses.append(micro_loss.detach())
            loss = torch.stack(losses).mean().float()
        norm = self.engine.get_global_grad_norm()
        if norm is None and self.clipper is not None:
            norm = self.clipper.last_norm
        return loss, (None if norm is None else float(norm))

    @torch.no_grad()
    def eval_loss(self, micro_batches: Iterator[dict[str, torch.Tensor]], iters: int, grad_accum: int) -> torch.Tensor:
        """Mean loss over iters x grad_accum micro-batches on this dp replica."""
        if not self.topo.use_pipeline:
            return torch.stack([self.micro_loss(next(micro_batches)) for _ in range(iters * grad_accum)]).mean()
        batches = pipeline_batches(micro_batches)
        losses = [self.engine.eval_batch(batches, num_micro_batches=grad_accum) for _ in range(iters)]
        reset_after_forward_only(self.model_cfg)  # DeepSpeed's pipeline checkpoints its eval forwards too
        return torch.stack([torch.as_tensor(l).float() for l in losses]).mean()
