"""Train/valid/test datasets from the data keys of the config (gpt-neox semantics).

Either ``data_path``: one prefix cut into document ranges by ``split`` ("969,30,1", normalised);
or ``train/valid/test_data_paths``: prefix lists blended by their weights. ``label_data_paths``
maps a text prefix to the prefix of its label dataset (gpt-neox's *_label_data_paths, zipped
with the corresponding data paths).
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np

from neox.data.blend import BlendedDataset, normalized_weights
from neox.data.errors import DataError
from neox.data.gpt_dataset import GPTDataset
from neox.data.indexed import IndexedDataset, IndexedDatasetError

__all__ = ["build_train_valid_test", "parse_split", "split_document_ranges", "split_num_samples"]

SPLIT_NAMES = ("train", "valid", "test")
# gpt-neox sizes each blend member 0.5% above its share so rounding never starves the blend.
BLEND_MEMBER_MARGIN = 1.005

Dataset = GPTDataset | BlendedDataset


def parse_split(split: str) -> list[float]:
    """"969,30,1" or "969/30/1" -> normalised [train, valid, test]; missing parts count as 0."""
    separator = "," if "," in split else "/"
    try:
        parts = [float(p) for p in split.split(separator)]
    except ValueError as err:
        raise DataError(f"split {split!r} must be up to 3 numbers separated by ',' or '/'") from err
    if len(parts) > 3 or any(not math.isfinite(p) or p < 0 for p in parts) or sum(parts) <= 0:
        raise DataError(f"split {split!r} must be up to 3 non-negative numbers, not all zero")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def split_document_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Document ranges [start, end) for train, valid, test, rounded as gpt-neox rounds them
    (each share rounded, then every boundary moved by the total's rounding excess)."""
    bounds = [0]
    for share in parse_split(split):
        bounds.append(bounds[-1] + int(round(share * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [min(max(b - excess, 0), num_documents) for b in bounds[1:]]
    return [(bounds[i], max(bounds[i], bounds[i + 1])) for i in range(3)]


def split_num_samples(train_iters: int, eval_interval: int, eval_iters: int, global_batch_size: int) -> tuple[int, int, int]:
    """Samples each split must hold for a run (gpt-neox): every evaluation, plus the final one,
    reads eval_iters fresh global batches; the test set is read once."""
    if eval_interval < 1:
        raise DataError(f"eval_interval must be >= 1, got {eval_interval}")
    return (
        train_iters * global_batch_size,
        (train_iters // eval_interval + 1) * eval_iters * global_batch_size,
        eval_iters * global_batch_size,
    )


class _Opener:
    """Opens each prefix once per build and turns file problems into errors naming the key."""

    def __init__(self, label_data_paths: Mapping[str, str] | None) -> None:
        self.labels = dict(label_data_paths or {})
        self.opened: dict[str, IndexedDataset] = {}

    def open(self, prefix: str, key: str) -> IndexedDataset:
        prefix = os.fspath(prefix)
        if prefix not in self.opened:
            if not IndexedDataset.exists(prefix):
                raise DataError(
                    f"{key}: no dataset at prefix {prefix!r} (expected {prefix}.bin and {prefix}.idx; "
                    f"give the path without the extension, as written by tools/preprocess_data)"
                )
            try:
                self.opened[prefix] = IndexedDataset(prefix)
            except IndexedDatasetError as err:
                raise DataError(f"{key}: {err}") from err
        return self.opened[prefix]

    def label_for(self, prefix: str) -> IndexedDataset | None:
        label = self.labels.get(os.fspath(prefix))
        return None if label is None else self.open(label, f"label_data_paths[{prefix!r}]")


def build_train_valid_test(
    *,
    data_path: str | None,
    train_data_paths: Sequence[str] | None,
    valid_data_paths: Sequence[str] | None,
    test_data_paths: Sequence[str] | None,
    train_data_weights: Sequence[float] | None,
    valid_data_weights: Sequence[float] | None,
    test_data_weights: Sequence[float] | None,
    label_data_paths: Mapping[str, str] | None = None,
    split: str = "969,30,1",
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """The three datasets (None where a split has no data or needs no samples)."""
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise DataError(f"num_samples must be 3 non-negative counts (train, valid, test), got {num_samples}")
    opener = _Opener(label_data_paths)
    given = {os.fspath(p) for p in [data_path or "", *(train_data_paths or []), *(valid_data_paths or []), *(test_data_paths or [])] if p}
    stray = sorted(set(opener.labels) - given)
    if stray:
        raise DataError(
            f"label_data_paths has labels for {stray}, which is not among data_path or the "
            f"train/valid/test data paths; key each label prefix by its text prefix, spelled the same"
        )
    if data_path and train_data_paths:
        raise DataError("set either data_path (one dataset, cut by `split`) or train_data_paths, not both")
    if data_path:
        return _from_split(opener, data_path, split, seq_length, seed, num_samples, cache_dir)
    if not train_data_paths:
        raise DataError("no training data: set data_path or train_data_paths")
    lists = (train_data_paths, valid_data_paths, test_data_paths)
    weights = (train_data_weights, valid_data_weights, test_data_weights)
    return tuple(  # type: ignore[return-value]
        _blend(opener, name, paths or [], w, n, seq_length, seed, cache_dir)
        for name, paths, w, n in zip(SPLIT_NAMES, lists, weights, num_samples)
    )


def _from_split(
    opener: _Opener,
    data_path: str,
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[GPTDataset | None, GPTDataset | None, GPTDataset | None]:
    indexed = opener.open(data_path, "data_path")
    label = opener.label_for(data_path)
    ranges = split_document_ranges(split, len(indexed.sizes))
    datasets: list[GPTDataset | None] = []
    for name, (start, end), wanted in zip(SPLIT_NAMES, ranges, num_samples):
        if wanted == 0:
            datasets.append(None)
            continue
        if end <= start:
            raise DataError(
                f"split {split!r} leaves the {name} split of {data_path} empty ({len(indexed.sizes)} "
                f"documents in all) but {wanted} {name} samples are needed; give {name} a larger "
                f"share or set its iterations to 0"
            )
        documents = np.arange(start, end, dtype=np.int64)
        datasets.append(
            GPTDataset(
                name, indexed, documents, wanted, seq_length, seed, cache_dir=cache_dir, label_dataset=label
            )
        )
    return datasets[0], datasets[1], datasets[2]


def _blend(
    opener: _Opener,
    split_name: str,
    paths: Sequence[str],
    weights: Sequence[float] | None,
    wanted: int,
    seq_length: int,
    seed: int,
    cache_dir: str | os.PathLike[str] | None,
) -> Dataset | None:
    if not paths or wanted == 0:
        return None
    key = f"{split_name}_data_paths"
    if weights is None or len(weights) == 0:
        weights = [1.0] * len(paths)
    if len(weights) != len(paths):
        raise DataError(
            f"{split_name}_data_weights has {len(weights)} entries but {key} has {len(paths)} paths; "
            f"give one weight per path"
        )
    shares = normalized_weights(weights, f"{split_name}_data_weights")
    members = []
    for i, (path, share) in enumerate(zip(paths, shares)):
        indexed = opener.open(path, f"{key}[{i}]")
        member_samples = wanted if len(paths) == 1 else math.ceil(wanted * share * BLEND_MEMBER_MARGIN)
        members.append(
            GPTDataset(
                f"{split_name}_{i}",
                indexed,
                np.arange(len(indexed.sizes), dtype=np.int64),
                member_samples,
                seq_length,
                seed,
                cache_dir=cache_dir,
                label_dataset=opener.label_for(path),
            )
        )
    if len(members) == 1:
        return members[0]
    return BlendedDataset(members, shares, wanted, cache_dir=cache_dir)
