"""Opening a dataset prefix in the format `data_impl` names, and gpt-neox's `mmap_warmup`.

data_impl (gpt-neox's key): ``mmap`` is the MMIDIDX format tools/preprocess_data.py writes; ``cached`` the older
TNTIDX format (neox.data.legacy_indexed); ``infer`` (the default) reads the first bytes of the ``.idx`` and picks the
one it holds. A prefix in the other format than the one named is an error naming the key.
"""
from __future__ import annotations

import os
from typing import Union

from neox.data.errors import DataError
from neox.data.indexed import INDEX_MAGIC, IndexedDataset, IndexedDatasetError, data_file_path, index_file_path
from neox.data.legacy_indexed import CACHED_MAGIC, CachedIndexedDataset

__all__ = ["AnyIndexed", "DATA_IMPLS", "index_format", "open_indexed", "warm_up"]

DATA_IMPLS = ("infer", "mmap", "cached")
AnyIndexed = Union[IndexedDataset, CachedIndexedDataset]
# gpt-neox reads in 100 MiB chunks: large enough that the read loop costs nothing next to the I/O.
_WARMUP_CHUNK = 100 * 1024 * 1024


def index_format(prefix: str | os.PathLike[str]) -> str | None:
    """'mmap', 'cached', or None for an .idx of neither format."""
    with open(index_file_path(prefix), "rb") as stream:
        head = stream.read(len(INDEX_MAGIC))
    if head == INDEX_MAGIC:
        return "mmap"
    if head[: len(CACHED_MAGIC)] == CACHED_MAGIC:
        return "cached"
    return None


def warm_up(prefix: str | os.PathLike[str]) -> int:
    """Read the .idx and the .bin once from start to end (gpt-neox's mmap_warmup); the bytes read."""
    total = 0
    for path in (index_file_path(prefix), data_file_path(prefix)):
        with open(path, "rb", buffering=0) as stream:
            while chunk := stream.read(_WARMUP_CHUNK):
                total += len(chunk)
    return total


def open_indexed(prefix: str | os.PathLike[str], data_impl: str = "infer", *, key: str = "data_path",
                 warmup: bool = False) -> AnyIndexed:
    """The dataset at ``prefix`` read as ``data_impl``; DataError naming ``key`` (and data_impl) when it cannot be."""
    if data_impl not in DATA_IMPLS:
        raise DataError(f"data_impl must be one of {list(DATA_IMPLS)}, got {data_impl!r}")
    if not IndexedDataset.exists(prefix):
        raise DataError(f"{key}: no dataset at prefix {os.fspath(prefix)!r} (expected {os.fspath(prefix)}.bin and "
                        f"{os.fspath(prefix)}.idx; give the path without the extension, as written by "
                        f"tools/preprocess_data)")
    found = index_format(prefix)
    if found is None:
        raise DataError(f"{key}: {index_file_path(prefix)} is neither an mmap (MMIDIDX) nor a cached (TNTIDX) "
                        f"indexed dataset index")
    if data_impl != "infer" and found != data_impl:
        raise DataError(f"{key}: {index_file_path(prefix)} is in the {found} format but data_impl is {data_impl!r}; "
                        f"set data_impl: {found} (or infer)")
    try:
        dataset: AnyIndexed = IndexedDataset(prefix) if found == "mmap" else CachedIndexedDataset(prefix)
    except IndexedDatasetError as err:
        raise DataError(f"{key}: {err}") from err
    if warmup:
        warm_up(prefix)
    return dataset
