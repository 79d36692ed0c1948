"""train_impl 'kto': Kahneman-Tversky Optimization (gpt-neox's kto, TRL's KTOTrainer with loss_type 'kto').

Unpaired data: each row is one prompt + completion (labels -100 on the prompt) with a reward (train_reward_data_paths,
gpt-neox's --reward-key data): > 0 desirable, < 0 undesirable (a 0 reward weighs nothing, as in gpt-neox). With a
row's log-ratio r = logp - ref (summed over its trained positions) and the reference point z (below):

    desirable:   kto_desirable_weight   x (1 - sigmoid(beta (r - z)))
    undesirable: kto_undesirable_weight x (1 - sigmoid(beta (z - r)))

the mean over the rows of the global batch.

z, TRL's KL estimate: for each micro-batch, every row's prompt is paired with the previous row's completion (row 0
with the last row's), TRL's KTOTrainer "KL dataset" (y_{i-1} after x_i); z = max(0, mean over those mismatched rows of
(policy - reference) log-probs), no gradient. TRL forms the pairs within each per-device batch and averages z over the
processes; here z is each micro-batch's own, so every (micro-batch, accumulation, dp) split of the same micro-batches
trains alike (at one process and one micro-batch per step TRL's number is the same).

Metrics: rewards_chosen / rewards_rejected (beta x log-ratio, means over desirable / undesirable rows), rewards_margin
(their difference, as TRL), logps_chosen / logps_rejected, kl (z, mean over the micro-batches), rewards_accuracy
(gpt-neox's reward_acc: the share of rows whose implied reward has their label's sign).
"""
from __future__ import annotations

import torch

from neox.data.errors import DataError
from neox.train.objectives.base import Batch, LossContext, LossOutput, Objective
from neox.train.objectives.dpo import REF_LOGPS, policy_log_probs
from neox.train.objectives.reference import SequenceLogProbs

KL_REFERENCE_POINT = "kto_kl"
DESIRABILITY = "kto_sign"


def trained_span(loss_mask: torch.Tensor) -> tuple[int, int]:
    """(first, last) trained label positions of one row."""
    where = (loss_mask > 0).nonzero().flatten()
    return int(where[0]), int(where[-1])


def mismatched_pairs(batch: Batch) -> Batch:
    """TRL's KL rows: row i = the prompt of row i followed by the completion of row i-1 (row 0: of the last row), in the
    loader's layout (tokens, labels shifted by one, loss_mask on the completion), padded or cut to the batch's
    length."""
    tokens, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    rows, length = tokens.shape
    out_tokens, out_labels = torch.zeros_like(tokens), torch.zeros_like(labels)
    out_mask = torch.zeros_like(mask)
    spans = [trained_span(mask[i]) for i in range(rows)]
    for i in range(rows):
        j = (i - 1) % rows
        first_i = spans[i][0]
        first_j, last_j = spans[j]
        # The whole sequence: the prompt tokens[:first+1] (the last of them is the first completion label's input),
        # then the completion labels[first_j : last_j+1].
        seq = torch.cat((tokens[i, :first_i + 1], labels[j, first_j:last_j + 1]))[:length + 1]
        completion_mask = torch.cat((mask.new_zeros(first_i), mask[j, first_j:last_j + 1]))[:length]
        n = seq.numel() - 1
        out_tokens[i, :n], out_labels[i, :n], out_mask[i, :n] = seq[:-1], seq[1:], completion_mask[:n]
    positions = torch.arange(length, dtype=batch["position_ids"].dtype).expand(rows, length).contiguous()
    return {"tokens": out_tokens, "labels": out_labels, "loss_mask": out_mask, "position_ids": positions}


def desirability(batch: Batch) -> torch.Tensor:
    """[rows] +1 desirable, -1 undesirable, 0 neither: the sign of the row's reward on its trained positions."""
    if "reward" not in batch:
        raise DataError("train_impl kto needs a reward per sample: set train_reward_data_paths (data written by "
                        "tools/preprocess_data_with_chat_template.py --reward-key)")
    mask = batch["loss_mask"].float()
    reward = (batch["reward"].float() * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return torch.sign(reward)


class KTOObjective(Objective):
    name = "kto"
    metric_names = ("rewards_chosen", "rewards_rejected", "rewards_accuracy", "logps_chosen", "logps_rejected", "kl")

    def __init__(self, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 fp32: bool = True, partition_method: str | None = None, zero3: bool = False):
        self.beta, self.fp32 = beta, fp32
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.logps = SequenceLogProbs(fp32, partition_method, zero3)

    def prepare(self, micro_batches: list[Batch], engine) -> list[Batch]:
        prepared = []
        signs = [desirability(b) for b in micro_batches]  # before any forward: a batch without rewards fails first
        kl_batches = [mismatched_pairs(b) for b in micro_batches]
        refs = self.logps(engine, micro_batches, reference=True)
        ref_kl = self.logps(engine, kl_batches, reference=True)
        policy_kl = self.logps(engine, kl_batches, reference=False)
        for b, sign, ref, pol, refk in zip(micro_batches, signs, refs, policy_kl, ref_kl):
            rows = b["tokens"].shape[0]
            if ref is None:  # a pipeline stage that does not compute the loss
                ref, z = torch.zeros(rows), torch.zeros(rows)
            else:
                z = (pol - refk).mean().clamp(min=0).expand(rows)
            prepared.append({**b, REF_LOGPS: ref, KL_REFERENCE_POINT: z, DESIRABILITY: sign})
        return prepared

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["tokens"].shape[0], dtype=torch.float64)

    def targets(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return (batch["labels"], batch["loss_mask"], batch[REF_LOGPS].float(), batch[KL_REFERENCE_POINT].float(),
                batch[DESIRABILITY].float())

    def loss(self, logits: torch.Tensor, targets: tuple[torch.Tensor, ...], ctx: LossContext) -> LossOutput:
        labels, loss_mask, ref, z, sign = targets
        logps = policy_log_probs(logits, labels, loss_mask, ctx, self.fp32)
        ref, sign = ref.to(logps.device), sign.to(logps.device)
        ratio = logps - ref
        z = z.to(logps.device)[0]
        desirable, undesirable = sign > 0, sign < 0
        chosen_losses = 1 - torch.sigmoid(self.beta * (ratio - z))
        rejected_losses = 1 - torch.sigmoid(self.beta * (z - ratio))
        per_row = torch.where(desirable, self.desirable_weight * chosen_losses,
                              torch.where(undesirable, self.undesirable_weight * rejected_losses,
                                          torch.zeros_like(ratio)))
        return LossOutput(per_row.sum(), self._metrics(logps, ratio, z, desirable, undesirable))

    def _metrics(self, logps, ratio, z, desirable, undesirable) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            logps, rewards = logps.detach().double(), self.beta * ratio.detach().double()
            n_chosen, n_rejected = desirable.double().sum(), undesirable.double().sum()
            right_sign = (desirable & (rewards > 0)) | (undesirable & (rewards < 0))
            labelled = n_chosen + n_rejected
            one = torch.ones((), dtype=torch.float64, device=logps.device)
            return {"rewards_chosen": ((rewards * desirable).sum(), n_chosen),
                    "rewards_rejected": ((rewards * undesirable).sum(), n_rejected),
                    "rewards_accuracy": (right_sign.double().sum(), labelled),
                    "logps_chosen": ((logps * desirable).sum(), n_chosen),
                    "logps_rejected": ((logps * undesirable).sum(), n_rejected),
                    "kl": (z.detach().double().reshape(()), one)}

    def derived_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """TRL's rewards/margins for KTO: the difference of the two sides' mean rewards."""
        return {"rewards_margin": means["rewards_chosen"] - means["rewards_rejected"]}


def from_config(cfg) -> KTOObjective:
    """The kto objective of a run (cfg: NeoXConfig)."""
    post = cfg.post_training
    return KTOObjective(post.kto_beta, post.kto_desirable_weight, post.kto_undesirable_weight, fp32=post.kto_fp32,
                        partition_method=cfg.parallel.pipe_partition_method, zero3=cfg.optim.zero_stage == 3)
