"""train_impl 'dpo': Direct Preference Optimization with the sigmoid loss (gpt-neox's dpo, TRL's DPOTrainer with
loss_type 'sigmoid').

A pairwise micro-batch holds m chosen rows, then their m rejected rows (dataset_impl pairwise). A row's log-prob is
the sum of log p(label) over its trained positions (the completion: labels -100 on the prompt). With the reference
model's log-probs ref_* (the starting weights, frozen: neox/train/objectives/reference.py; or read from the files
precompute_model_name names, gpt-neox's per-token log-probs that `deepy generate` writes with text_gen_type
precompute, summed here over the trained positions; or 0 with dpo_reference_free):

    rewards_chosen = beta (logp_chosen - ref_chosen),  rewards_rejected = beta (logp_rejected - ref_rejected)
    loss per pair = -log sigmoid(rewards_chosen - rewards_rejected)

the mean over the pairs of the global batch. Metrics, global-batch means over pairs under TRL's definitions:
rewards_chosen, rewards_rejected, rewards_accuracy (chosen > rejected), rewards_margin, logps_chosen, logps_rejected.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from neox.train.objectives.base import Batch, LossContext, LossOutput, Objective, sequence_log_probs, split_pairs
from neox.train.objectives.reference import SequenceLogProbs
from neox.train.objectives.rm import pair_metrics

# The batch key the reference's per-row log-probs ride in (prepare() adds it), and the loader's key of the
# precomputed per-token ones (neox/data/loader.py).
REF_LOGPS = "ref_logps"
REF_TOKEN_LOGPS = "ref_token_logps"


def precomputed_log_probs(batch: Batch) -> torch.Tensor:
    """[rows] reference log-probs summed from the precomputed per-token ones over the trained positions."""
    if REF_TOKEN_LOGPS not in batch:
        raise KeyError(f"precompute_model_name is set but the batch has no '{REF_TOKEN_LOGPS}': the datasets did not "
                       "read the precomputed reference log-probs")
    return sequence_log_probs(batch[REF_TOKEN_LOGPS], batch["loss_mask"])


def policy_log_probs(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, ctx: LossContext,
                     fp32: bool) -> torch.Tensor:
    """[rows] summed log-probs of the trained labels, differentiable; fp32: from fp32 logits (dpo_fp32/kto_fp32)."""
    if fp32:
        token_logps = ctx.token_log_probs(logits.float() if logits.dtype != torch.float32 else logits, labels)
    else:
        token_logps = -ctx.half_token_cross_entropy(logits, labels).float()
    return sequence_log_probs(token_logps, loss_mask)


class DPOObjective(Objective):
    name = "dpo"
    pairwise = True
    metric_names = ("rewards_chosen", "rewards_rejected", "rewards_accuracy", "rewards_margin", "logps_chosen",
                    "logps_rejected")

    def __init__(self, beta: float, reference_free: bool = False, fp32: bool = True,
                 partition_method: str | None = None, precomputed: bool = False, zero3: bool = False):
        self.beta, self.reference_free, self.fp32, self.precomputed = beta, reference_free, fp32, precomputed
        self.logps = SequenceLogProbs(fp32, partition_method, zero3)

    def prepare(self, micro_batches: list[Batch], engine) -> list[Batch]:
        if self.reference_free:
            return micro_batches
        if self.precomputed:
            refs = [precomputed_log_probs(b) for b in micro_batches]
        else:
            refs = self.logps(engine, micro_batches, reference=True)
        # Pipeline stages other than the last never read the targets: any [rows] tensor does there.
        return [{**b, REF_LOGPS: ref if ref is not None else torch.zeros(b["tokens"].shape[0])}
                for b, ref in zip(micro_batches, refs)]

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["tokens"].shape[0] // 2, dtype=torch.float64)

    def targets(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        ref = batch[REF_LOGPS] if REF_LOGPS in batch else torch.zeros(batch["tokens"].shape[0])
        return batch["labels"], batch["loss_mask"], ref.float()

    def loss(self, logits: torch.Tensor, targets: tuple[torch.Tensor, ...], ctx: LossContext) -> LossOutput:
        labels, loss_mask, ref = targets
        logps = policy_log_probs(logits, labels, loss_mask, ctx, self.fp32)
        chosen, rejected = split_pairs(logps)
        ref_chosen, ref_rejected = split_pairs(ref.to(logps.device))
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        per_pair = -F.logsigmoid(self.beta * (chosen_ratio - rejected_ratio))  # TRL's order of operations
        chosen_rewards, rejected_rewards = self.beta * chosen_ratio, self.beta * rejected_ratio
        metrics = pair_metrics(chosen_rewards, rejected_rewards)
        n = metrics["rewards_chosen"][1]
        metrics["logps_chosen"] = (chosen.detach().double().sum(), n)
        metrics["logps_rejected"] = (rejected.detach().double().sum(), n)
        return LossOutput(per_pair.sum(), metrics)


def from_config(cfg) -> DPOObjective:
    """The dpo objective of a run (cfg: NeoXConfig)."""
    post = cfg.post_training
    return DPOObjective(post.dpo_beta, reference_free=post.dpo_reference_free, fp32=post.dpo_fp32,
                        partition_method=cfg.parallel.pipe_partition_method,
                        precomputed=post.precompute_model_name is not None, zero3=cfg.optim.zero_stage == 3)
