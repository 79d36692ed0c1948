"""Weighted mixtures of datasets whose every prefix follows the weights to within one sample.

Sample n of the blend is drawn from the dataset that most needs it: among the datasets not
ahead of their share, the one that would soonest fall a whole sample behind (earliest
deadline first over the windows of Tijdeman's chairman-assignment theorem). With k datasets of
normalised weights w, after any n samples dataset i has contributed c_i with
|c_i - w_i * n| <= 1 - 1 / (2 (k - 1)) < 1. The choice is deterministic and cached like the
GPT indices.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from neox.data import index_cache
from neox.data.errors import DataError

__all__ = ["BlendedDataset", "blending_indices", "normalized_weights", "weights_by_num_docs"]

_BLEND_FORMAT = "neox-blend-v1"
_ARRAY_NAMES = ("dataset_index", "dataset_sample_index")


def normalized_weights(weights: Sequence[float], what: str = "weights") -> np.ndarray:
    values = np.asarray([float(w) for w in weights], dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise DataError(f"{what} must be a non-empty list of numbers")
    if not np.all(np.isfinite(values)) or np.any(values < 0) or values.sum() <= 0:
        raise DataError(f"{what} must be finite, >= 0 and not all zero, got {list(weights)}")
    return values / values.sum()


def weights_by_num_docs(num_docs: Sequence[int], alpha: float) -> np.ndarray:
    """gpt-neox's weight_by_num_documents weights for datasets of ``num_docs`` documents.

    With p_i = n_i / sum(n): q_i = p_i ** alpha / sum_j p_j ** alpha (alpha < 1 lifts the small datasets), then
    w_i = q_i (1 - p_i) / sum_j q_j (1 - p_j). The (1 - p_i) factor is gpt-neox's own ("weights should be the
    inverse of the number of samples"), kept so a blend here draws as gpt-neox's does. One dataset gets [1.0].
    """
    counts = np.asarray([int(n) for n in num_docs], dtype=np.float64)
    if len(counts) == 1:
        return np.ones(1)
    if len(counts) == 0 or np.any(counts < 0) or counts.sum() <= 0:
        raise DataError(f"weight_by_num_documents needs datasets with documents, got counts {list(num_docs)}")
    unbiased = counts / counts.sum()
    boosted = unbiased**alpha
    boosted /= boosted.sum()
    weights = boosted * (1.0 - unbiased)
    if weights.sum() <= 0:
        raise DataError(f"weight_by_num_documents gives every dataset weight 0 for document counts "
                        f"{list(num_docs)} (all documents in one dataset); give *_data_weights instead")
    return weights / weights.sum()


def blending_indices(weights: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """For each blend sample: which dataset, and which of that dataset's samples (its running count).

    A per-sample loop over plain Python floats: 0.3 s per million samples for 2 datasets,
    0.8 s for 8 (one 2-core CPU machine); built once, then cached.
    """
    weights = [float(w) for w in weights]
    active = [i for i, w in enumerate(weights) if w > 0]
    # Tijdeman's bound: a sample may be taken once its dataset is at least `slack` behind,
    # and must be taken before it falls (1 - slack) behind.
    slack = 1.0 / (2 * (len(active) - 1)) if len(active) > 1 else 0.0
    inverse = {i: 1.0 / weights[i] for i in active}
    counts = [0] * len(weights)
    dataset_index = np.empty(num_samples, dtype=np.int16)
    dataset_sample_index = np.empty(num_samples, dtype=np.int64)
    for n in range(num_samples):
        due = n + 1
        chosen, chosen_deadline = -1, 0.0
        for i in active:
            count = counts[i]
            if weights[i] * due >= count + slack:
                deadline = (count + 1 - slack) * inverse[i]
                if chosen < 0 or deadline < chosen_deadline:
                    chosen, chosen_deadline = i, deadline
        if chosen < 0:  # only reachable through rounding of the weights: take the furthest behind
            chosen = max(active, key=lambda i: weights[i] * due - counts[i])
        dataset_index[n] = chosen
        dataset_sample_index[n] = counts[chosen]
        counts[chosen] += 1
    return dataset_index, dataset_sample_index


class BlendedDataset(torch.utils.data.Dataset):
    """``num_samples`` samples mixed from ``datasets`` in proportion to ``weights``.

    Members that carry a ``cache_key`` (GPTDataset) get the blend indices cached next to the
    first member's indices (or in ``cache_dir``); other members are blended in memory.
    """

    def __init__(
        self,
        datasets: Sequence[Any],
        weights: Sequence[float],
        num_samples: int,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        build_lock: bool = True,
    ) -> None:
        if len(datasets) == 0:
            raise DataError("a blend needs at least one dataset")
        if len(weights) != len(datasets):
            raise DataError(f"a blend of {len(datasets)} datasets got {len(weights)} weights")
        if len(datasets) > np.iinfo(np.int16).max:
            raise DataError(f"a blend holds at most {np.iinfo(np.int16).max} datasets, got {len(datasets)}")
        if num_samples < 0:
            raise DataError(f"num_samples must be >= 0, got {num_samples}")
        self.datasets = list(datasets)
        self.weights = normalized_weights(weights)
        self.num_samples = int(num_samples)
        self.build_seconds: float | None = None

        def build() -> dict[str, np.ndarray]:
            started = time.perf_counter()
            dataset_index, sample_index = blending_indices(self.weights, self.num_samples)
            self.build_seconds = time.perf_counter() - started
            return {"dataset_index": dataset_index, "dataset_sample_index": sample_index}

        member_keys = [getattr(d, "cache_key", None) for d in self.datasets]
        directories = [Path(cache_dir)] if cache_dir is not None else []
        directories += [Path(d.cache_dir) for d in self.datasets if getattr(d, "cache_dir", None) is not None][:1]
        if all(key is not None for key in member_keys) and directories:
            self.cache_key = _blend_key(member_keys, self.weights, self.num_samples)
            stem = f"blend_{len(self.datasets)}ds_{self.num_samples}ns_{self.cache_key}"
            arrays, _ = index_cache.load_or_build(stem, _ARRAY_NAMES, build, directories, use_lock=build_lock)
        else:
            self.cache_key = None
            arrays = build()
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        self._check_members_large_enough()

    def _check_members_large_enough(self) -> None:
        needed = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for i, (dataset, count) in enumerate(zip(self.datasets, needed)):
            if count > len(dataset):
                raise DataError(
                    f"blend member {i} ({getattr(dataset, 'name', dataset)!r}, weight "
                    f"{self.weights[i]:.4f}) has {len(dataset)} samples but the blend of "
                    f"{self.num_samples} samples takes {count} from it; build it with more samples"
                )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for a blend of {self.num_samples} samples")
        member = int(self.dataset_index[index])
        return self.datasets[member][int(self.dataset_sample_index[index])]

    def text_tokens(self, index: int) -> np.ndarray:
        """The unpadded text of blend sample ``index`` (char_level_ppl counts it)."""
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for a blend of {self.num_samples} samples")
        member = int(self.dataset_index[index])
        return self.datasets[member].text_tokens(int(self.dataset_sample_index[index]))

    def __repr__(self) -> str:
        return f"BlendedDataset({len(self.datasets)} datasets, weights={self.weights.round(4).tolist()}, samples={len(self)})"


def _blend_key(member_keys: Sequence[str], weights: np.ndarray, num_samples: int) -> str:
    hasher = hashlib.blake2b(digest_size=8)
    hasher.update(repr((_BLEND_FORMAT, list(member_keys), weights.tolist(), int(num_samples))).encode())
    return hasher.hexdigest()
