"""Resumable batches driven by one global sample cursor, ``consumed_samples``.

Global batch k is dataset samples [k*G, (k+1)*G) with G = micro_batch_size * grad_accum_steps
* dp_size. Inside it, micro-step j of data-parallel rank r reads the m = micro_batch_size
samples starting at k*G + j*m*dp_size + r*m. What a global batch contains therefore depends
only on the dataset (its seed) and the cursor, not on the layout: a run resumed at
``consumed_samples`` with another dp size (same G) sees the same samples per global batch.

Batches are dicts of torch tensors, [m, seq_length] each, built as gpt-neox's get_batch does:
``tokens`` = text[:, :-1]; ``labels`` = text[:, 1:] (or the label dataset's, shifted the same
way, negative labels replaced by 0); ``loss_mask`` (float) is 0 where the label is negative
and, with ``eod_mask_loss``, where the INPUT token is the end-of-document id (so the step that
would predict the next document's first token from an eod is not trained); ``position_ids``
is a plain arange. gpt-neox removed ``reset_position_ids``: positions run straight across the
document boundaries inside a sample (Pythia was trained so), and resetting them would also
need a document-wise attention mask, so we do not.

Validation: gpt-neox keeps ONE validation iterator that advances across evaluations, so each
evaluation sees new samples. Do the same: build the valid loader once with
``consumed_samples = evaluations_done * eval_iters * G`` (``eval_consumed_samples``) and pull
``eval_iters * grad_accum_steps`` micro-batches per evaluation; store that cursor in the
checkpoint (or recompute it from the iteration) so a resumed run continues the sequence. The
valid dataset is sized for every evaluation of the run (neox.data.build.split_num_samples).
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from neox.data.errors import DataError

__all__ = ["MicroBatchSampler", "build_loader", "collate_samples", "eval_consumed_samples"]


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class MicroBatchSampler:
    """This dp rank's micro-batches of dataset indices, from ``consumed_samples`` onwards.

    Iteration stops before the first global batch that would run past ``total_samples``.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        self.micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
        self.global_batch_size = _positive_int("global_batch_size", global_batch_size)
        self.dp_size = _positive_int("dp_size", dp_size)
        if not 0 <= dp_rank < self.dp_size:
            raise DataError(f"dp_rank must lie in 0..{self.dp_size - 1}, got {dp_rank}")
        self.dp_rank = int(dp_rank)
        per_step = self.micro_batch_size * self.dp_size
        if self.global_batch_size % per_step:
            raise DataError(
                f"global_batch_size {self.global_batch_size} is not divisible by micro_batch_size "
                f"{self.micro_batch_size} x dp_size {self.dp_size} = {per_step}; pick a global batch "
                f"that is a multiple of {per_step} (global = micro x grad_accum_steps x dp)"
            )
        self.grad_accum_steps = self.global_batch_size // per_step
        if total_samples < 0:
            raise DataError(f"total_samples must be >= 0, got {total_samples}")
        if consumed_samples < 0 or consumed_samples % self.global_batch_size:
            raise DataError(
                f"consumed_samples {consumed_samples} is not a non-negative multiple of "
                f"global_batch_size {self.global_batch_size}: a run resumes on a global-batch boundary"
            )
        if consumed_samples > total_samples:
            raise DataError(
                f"consumed_samples {consumed_samples} exceeds the {total_samples} samples of the "
                f"dataset; build it with more samples (train_iters x global_batch_size)"
            )
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)

    @property
    def num_global_batches(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.global_batch_size

    def __len__(self) -> int:
        return self.num_global_batches * self.grad_accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        m, g = self.micro_batch_size, self.global_batch_size
        rank_offset = self.dp_rank * m
        for k in range(self.num_global_batches):
            batch_start = self.consumed_samples + k * g
            for step in range(self.grad_accum_steps):
                first = batch_start + step * m * self.dp_size + rank_offset
                yield list(range(first, first + m))


def _stack(samples: Sequence[dict[str, np.ndarray]], key: str, fallback: str | None = None) -> np.ndarray:
    return np.stack([s.get(key, s[fallback]) if fallback else s[key] for s in samples])


def _collate_texts(text: np.ndarray, label: np.ndarray | None, eod_token: int,
                   eod_mask_loss: bool) -> dict[str, torch.Tensor]:
    """gpt-neox's _get_batch on [m, seq_length + 1] texts and (maybe) labels."""
    text = torch.from_numpy(text.astype(np.int64, copy=False))
    tokens = text[:, :-1].contiguous()
    if label is not None:
        shifted = torch.from_numpy(label.astype(np.int64, copy=False))[:, 1:]
        loss_mask = (shifted >= 0).float()
        labels = torch.where(shifted >= 0, shifted, torch.zeros_like(shifted)).contiguous()
    else:
        labels = text[:, 1:].contiguous()
        loss_mask = torch.ones(labels.shape, dtype=torch.float32)
    if eod_mask_loss:
        loss_mask[tokens == eod_token] = 0.0
    position_ids = torch.arange(tokens.shape[1], dtype=torch.int64).expand_as(tokens).contiguous()
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


def _values(values: np.ndarray) -> torch.Tensor:
    """Per-token values aligned with the labels (gpt-neox's [:, :-1] of rewards and reference log-probs)."""
    return torch.from_numpy(values.astype(np.float32, copy=False))[:, :-1].contiguous()


def collate_samples(samples: Sequence[dict[str, np.ndarray]], eod_token: int, eod_mask_loss: bool) -> dict[str, torch.Tensor]:
    """gpt-neox get_batch on a list of dataset samples. Pairwise samples (pos/neg) give 2m rows: the m chosen
    sequences, then their m rejected ones; "reward" and "ref" values come as "reward" and "ref_token_logps"."""
    if "pos" in samples[0]:
        sides = [_collate_texts(_stack(samples, side), _stack(samples, f"{side}_label"), eod_token, eod_mask_loss)
                 for side in ("pos", "neg")]
        if "pos_ref" in samples[0]:
            for side, batch in zip(("pos", "neg"), sides):
                batch["ref_token_logps"] = _values(_stack(samples, f"{side}_ref"))
        return {key: torch.cat([sides[0][key], sides[1][key]]) for key in sides[0]}
    # A blend may mix members with and without labels: the text is its own label.
    label = _stack(samples, "label", "text") if any("label" in s for s in samples) else None
    batch = _collate_texts(_stack(samples, "text"), label, eod_token, eod_mask_loss)
    if "reward" in samples[0]:
        batch["reward"] = _values(_stack(samples, "reward"))
    if "ref" in samples[0]:
        batch["ref_token_logps"] = _values(_stack(samples, "ref"))
    return batch


class _Collate:
    # A class, not a lambda, so spawned DataLoader workers can pickle it.
    def __init__(self, eod_token: int, eod_mask_loss: bool) -> None:
        self.eod_token = int(eod_token)
        self.eod_mask_loss = bool(eod_mask_loss)

    def __call__(self, samples: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        return collate_samples(samples, self.eod_token, self.eod_mask_loss)


def build_loader(
    dataset: Any,
    *,
    consumed_samples: int,
    micro_batch_size: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    eod_token: int,
    eod_mask_loss: bool = False,
    num_workers: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Iterator over this rank's micro-batches from ``consumed_samples`` to the dataset's end."""
    sampler = MicroBatchSampler(
        len(dataset), consumed_samples, micro_batch_size, global_batch_size, dp_rank, dp_size
    )
    if num_workers < 0:
        raise DataError(f"num_workers must be >= 0, got {num_workers}")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_Collate(eod_token, eod_mask_loss),
    )
    return iter(loader)


def eval_consumed_samples(evaluations_done: int, eval_iters: int, global_batch_size: int) -> int:
    """Valid-set cursor after ``evaluations_done`` evaluations of ``eval_iters`` global batches."""
    if evaluations_done < 0 or eval_iters < 0:
        raise DataError(f"evaluations_done and eval_iters must be >= 0, got {evaluations_done}, {eval_iters}")
    return evaluations_done * eval_iters * global_batch_size
