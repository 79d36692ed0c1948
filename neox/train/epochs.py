"""train_epochs: the number of iterations that passes over the train split that many times, as gpt-neox counts it.

gpt-neox builds the train dataset for one epoch, wraps it in a data loader of micro_batch x dp samples per batch
(the last incomplete batch dropped) and trains (loader length x train_epochs) // gradient_accumulation_steps
iterations; an epoch of a GPT dataset holds (tokens - 1) // seq_length samples, and a blend of several train
datasets is as long as its members together. Each sample is then seen at most train_epochs times.
"""
from __future__ import annotations

import numpy as np

from neox.data.build import split_document_ranges
from neox.data.errors import DataError
from neox.data.indexed import IndexedDataset, IndexedDatasetError


def samples_per_epoch(num_tokens: int, seq_length: int) -> int:
    return max(0, (int(num_tokens) - 1) // seq_length)


def _sizes(prefix: str, key: str) -> np.ndarray:
    if not IndexedDataset.exists(prefix):
        raise DataError(f"{key}: no dataset at prefix {prefix!r} (expected {prefix}.bin and {prefix}.idx)")
    try:
        return np.asarray(IndexedDataset(prefix).sizes, dtype=np.int64)
    except IndexedDatasetError as err:
        raise DataError(f"{key}: {err}") from err


def train_epoch_samples(data_path: str | None, train_data_paths: list[str] | None, split: str,
                        seq_length: int) -> int:
    """Samples in one epoch of the train split: data_path's train share of documents, or every train dataset."""
    if data_path:
        sizes = _sizes(data_path, "data_path")
        start, end = split_document_ranges(split, len(sizes))[0]
        return samples_per_epoch(sizes[start:end].sum(), seq_length)
    return sum(samples_per_epoch(_sizes(p, f"train_data_paths[{i}]").sum(), seq_length)
               for i, p in enumerate(train_data_paths or []))


def iterations_for_epochs(train_epochs: int, epoch_samples: int, micro_batch: int, dp_size: int,
                          grad_accum: int) -> int:
    """gpt-neox's train_iters = (len(train loader) x train_epochs) // gradient_accumulation_steps."""
    loader_batches = epoch_samples // (micro_batch * dp_size)
    iterations = loader_batches * train_epochs // grad_accum
    if iterations < 1:
        raise DataError(f"train_epochs {train_epochs} gives 0 iterations: one epoch of the train split holds "
                        f"{epoch_samples} samples, {loader_batches} micro-batches of {micro_batch} x {dp_size} ranks, "
                        f"fewer than one optimizer step of {grad_accum} micro-batches; use more data or train_iters")
    return iterations
