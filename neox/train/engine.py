"""The DeepSpeed engine the loop trains, and one optimizer step on it.

Shared by the training loop (neox/train/run.py) and benchmarks/train_throughput.py, so the benchmark times the
very code a training run executes.
"""
from __future__ import annotations

from typing import Iterator

import torch

from neox.config.deepspeed import deepspeed_config
from neox.config.neox_config import NeoXConfig
from neox.model import causal_lm_loss
from neox.model.mup import widths_by_param
from neox.optim import configured_optimizer, set_lr
from neox.parallel.activation_checkpoint import install_activation_checkpointing
from neox.parallel.parallelize import install_grad_norm_clipper


class TrainEngine:
    """A DeepSpeed engine over our model and optimizer, plus what the loop needs to know about it."""

    def __init__(self, cfg: NeoXConfig, model: torch.nn.Module, device: torch.device):
        import deepspeed

        optimizer = configured_optimizer(model, cfg.optim, device.type, widths_by_param(model))
        self.device = device
        self.half_precision_loss = cfg.model.fp16_lm_cross_entropy
        install_activation_checkpointing(model, cfg.model, None)  # gpt-neox's DeepSpeed checkpointing keys
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

    def micro_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.device
        logits = self.engine(batch["tokens"].to(device), position_ids=batch["position_ids"].to(device))
        return causal_lm_loss(logits, batch["labels"].to(device), batch["loss_mask"].to(device),
                              self.half_precision_loss)

    def step(self, micro_batches: Iterator[dict[str, torch.Tensor]], grad_accum: int,
             lr: float) -> tuple[torch.Tensor, float | None]:
        """One optimizer step over grad_accum micro-batches: (this rank's mean loss, global gradient norm)."""
        set_lr(self.engine.optimizer, lr)
        losses = []
        for _ in range(grad_accum):
            loss = self.micro_loss(next(micro_batches))
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        norm = self.engine.get_global_grad_norm()
        if norm is None and self.clipper is not None:
            norm = self.clipper.last_norm
        return torch.stack(losses).mean().float(), (None if norm is None else float(norm))
