"""A cheap check that a dataset's token ids fit the tokenizer it will be trained with.

Data tokenized with another tokenizer (GPT-2 ids in a 4k-vocabulary run) would otherwise fail deep inside the
embedding lookup of the first step. Reading evenly spaced windows of the .bin costs milliseconds even for a
terabyte file, and a foreign tokenizer's large ids are everywhere, so a sample finds them.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from neox.data.errors import DataError
from neox.data.formats import AnyIndexed, open_indexed
from neox.data.indexed import IndexedDataset

if TYPE_CHECKING:
    from neox.config.data import DataConfig

SAMPLE_WINDOWS = 64
WINDOW_TOKENS = 4096


def sampled_token_range(dataset: AnyIndexed, windows: int = SAMPLE_WINDOWS,
                        window_tokens: int = WINDOW_TOKENS) -> tuple[int, int] | None:
    """(min, max) token id over `windows` evenly spaced windows of the .bin (all of it when small); None if empty."""
    if dataset.num_tokens == 0:
        return None
    tokens = np.memmap(dataset.data_path, dtype=dataset.dtype, mode="r", shape=(dataset.num_tokens,))
    if dataset.num_tokens <= windows * window_tokens:
        sample = np.asarray(tokens)
    else:
        starts = np.linspace(0, dataset.num_tokens - window_tokens, windows).astype(np.int64)
        sample = np.concatenate([tokens[s:s + window_tokens] for s in starts])
    return int(sample.min()), int(sample.max())


def check_token_ids(prefix: str | os.PathLike[str], vocab_size: int, *, key: str, tokenizer: str,
                    data_impl: str = "infer") -> None:
    """DataError naming the key, the .bin file and the tokenizer when sampled ids fall outside 0..vocab_size-1."""
    with open_indexed(prefix, data_impl, key=f"'{key}'") as dataset:
        found = sampled_token_range(dataset)
        data_file = dataset.data_path
    if found is None or (found[0] >= 0 and found[1] < vocab_size):
        return
    low, high = found
    bad = high if high >= vocab_size else low
    raise DataError(
        f"'{key}': {data_file} holds token id {bad}, outside the vocabulary of the configured tokenizer "
        f"({tokenizer}: ids 0..{vocab_size - 1}), so the data was tokenized with another tokenizer. Set "
        "'tokenizer_type', 'vocab_file' and 'merge_file' to the ones tools/preprocess_data.py was given for this "
        "data, or preprocess it again with this tokenizer.")


def token_dataset_prefixes(data: DataConfig) -> list[tuple[str, str]]:
    """(key, prefix) of every token dataset a run reads; label datasets hold labels, not tokenizer ids."""
    found: list[tuple[str, str]] = []
    if data.data_path:
        found.append(("data_path", data.data_path))
    keys = ["train_data_paths", "valid_data_paths", "test_data_paths"]
    keys += [f"{side}_{split}_data_paths" for split in ("train", "valid", "test") for side in ("pos", "neg")]
    for key in keys:
        found += [(f"{key}[{i}]", p) for i, p in enumerate(getattr(data, key) or [])]
    return found


def tokenizer_label(data: DataConfig) -> str:
    files = [f for f in (data.vocab_file, data.merge_file) if f]
    return data.tokenizer_type + (f" {', '.join(files)}" if files else "")


def check_run_token_ids(data: DataConfig, vocab_size: int) -> None:
    """check_token_ids for every token dataset of the data config (missing ones are left to the dataset builder)."""
    for key, prefix in token_dataset_prefixes(data):
        if IndexedDataset.exists(prefix):
            check_token_ids(prefix, vocab_size, key=key, tokenizer=tokenizer_label(data), data_impl=data.data_impl)
