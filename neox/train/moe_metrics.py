"""The MoE layers' routing statistics for each metrics line: router losses and every MoE layer's expert load.

Every MoE block sums, over its training forwards, its load-balancing and z losses and the assignments routed to each
expert (neox/model/moe.py: take_stats). At each log line the trainer collects them with one all-reduce over every
rank: a layer runs on one pipeline stage, its tp ranks hold the same numbers (only tp rank 0 adds them), and the
data-parallel replicas' sums add up. Over the logged steps' forwards:
- moe_aux_loss: the load-balancing loss (E x sum_e f_e P_e), averaged over the MoE layers: k when the router
  balances perfectly (uniform probabilities, k/E of the assignments per expert), up to k x E when it sends every
  token to the same experts;
- moe_z_loss: the router z-loss (mean logsumexp(logits)^2), averaged over the MoE layers;
- moe_loss: what the two add to the training objective: the sum over MoE layers of moe_aux_loss_coeff x the
  load-balancing loss + moe_z_loss_coeff x the z-loss (lm_loss does not include it);
- moe_dropped_fraction: assignments over the capacity (moe_capacity_factor), of all assignments;
- moe_expert_load: {layer index: [fraction of the layer's assignments routed to each expert]} (metrics.jsonl only:
  TensorBoard, wandb and Comet take scalars).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from neox.config.model import ModelConfig
from neox.model.moe import STAT_FIELDS, moe_blocks

_FORWARDS, _BALANCE, _Z, _DROPPED, _ASSIGNED = range(len(STAT_FIELDS))


class MoEMetrics:
    def __init__(self, model: nn.Module, cfg: ModelConfig, tp_rank: int, device: torch.device):
        self.blocks = moe_blocks(model)
        self.aux_coeff, self.z_coeff = cfg.moe_aux_loss_coeff, cfg.moe_z_loss_coeff
        self.tp_rank, self.device = tp_rank, device

    @classmethod
    def for_model(cls, model: nn.Module, cfg: ModelConfig, tp_rank: int, device: torch.device) -> MoEMetrics | None:
        return cls(model, cfg, tp_rank, device) if cfg.moe_layer_indices else None

    def collect(self) -> dict:
        """Collective (every rank, at the same log line): the statistics since the last call; resets them."""
        rows = torch.stack([block.take_stats().to(self.device) for _, block in self.blocks])
        if self.tp_rank != 0:
            rows.zero_()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(rows)
        rows = rows.cpu()
        forwards = rows[:, _FORWARDS].clamp(min=1.0)
        balance, z = rows[:, _BALANCE] / forwards, rows[:, _Z] / forwards
        assigned = rows[:, _ASSIGNED].clamp(min=1.0)
        load = rows[:, len(STAT_FIELDS):] / assigned[:, None]
        return {
            "moe_aux_loss": float(balance.mean()),
            "moe_z_loss": float(z.mean()),
            "moe_loss": float((self.aux_coeff * balance + self.z_coeff * z).sum()),
            "moe_dropped_fraction": float(rows[:, _DROPPED].sum() / assigned.sum()),
            "moe_expert_load": {str(layer): [round(float(f), 6) for f in fractions]
                                for (layer, _), fractions in zip(self.blocks, load)},
        }
