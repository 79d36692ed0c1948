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
from neox.train.optimizer import build_optimizer, set_lr


class TrainEngine:
    """A DeepSpeed engine over our model and optimizer, plus what the loop needs to know about it."""

    def __init__(self, cfg: NeoXConfig, model: torch.nn.Module, device: torch.device):
        import deepspeed

        optimizer = build_optimizer(model, cfg.optim.optimizer["type"], cfg.optim.optimizer["params"],
                                    cfg.optim.weight_decay, device.type)
        self.device = device
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=deepspeed_config(cfg), dist_init_required=False)
        stage = self.engine.zero_optimization_stage()
        if stage == 0 and self.engine.dp_world_size == 1:
            # Without ZeRO DeepSpeed all-reduces every gradient through flat buffers even in a data-parallel
            # world of one: two full copies of the gradients per step (0.4 s of a 2.8 s step at 70M parameters
            # on 2 CPU cores) for a sum over one rank. Numerically a no-op, so skip it.
            self.engine.enable_backward_allreduce = False
        # DeepSpeed reports the global gradient norm only from its ZeRO / fp16 / bf16 optimizers; with a plain
        # fp32 torch optimizer (ZeRO 0) it clips without keeping the norm, so the step measures it itself.
        self.measure_grad_norm = stage == 0 and cfg.optim.precision == "fp32"

    def micro_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.device
        logits = self.engine(batch["tokens"].to(device), position_ids=batch["position_ids"].to(device))
        return causal_lm_loss(logits, batch["labels"].to(device), batch["loss_mask"].to(device))

    def step(self, micro_batches: Iterator[dict[str, torch.Tensor]], grad_accum: int,
             lr: float) -> tuple[torch.Tensor, float | None]:
        """One optimizer step over grad_accum micro-batches: (this rank's mean loss, global gradient norm)."""
        set_lr(self.engine.optimizer, lr)
        losses = []
        own_grad_norm = None
        for micro in range(grad_accum):
            loss = self.micro_loss(next(micro_batches))
            self.engine.backward(loss)
            if micro == grad_accum - 1 and self.measure_grad_norm:
                own_grad_norm = grad_norm(self.engine.module)
            self.engine.step()
            losses.append(loss.detach())
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = own_grad_norm
        return torch.stack(losses).mean().float(), (None if norm is None else float(norm))


def grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """L2 norm of all gradients, read after the boundary backward (ZeRO 0 has all-reduced them by then)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
