"""Reader for the older fairseq/Megatron indexed format that gpt-neox calls ``cached`` (``data_impl: cached``).

``.idx`` (little-endian): 8-byte magic ``TNTIDX\\x00\\x00``, <Q version (1), <Q dtype code, <Q element size in
bytes, <Q item count n, <Q shape-entry count s, <Q doc_idx count d, then int64 dim_offsets[n + 1], int64
data_offsets[n + 1] (in elements, not bytes), int64 sizes[s] (the shape of every item, flattened), int64 doc_idx[d].
``.bin``: the items' elements back to back. Dtype codes are fairseq's: 1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f32,
7 f64, 8 u16. Token datasets hold 1-D items (one shape entry each), and that is all this reader accepts.

gpt-neox's IndexedCachedDataset copies the items it is asked to prefetch into memory; here the ``.bin`` is
memory-mapped like the mmap format (the page cache holds what is read), with the same read interface as
neox.data.indexed.IndexedDataset, so every dataset class takes either.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from neox.data.indexed import IndexedDatasetError, data_file_path, index_file_path

__all__ = ["CACHED_MAGIC", "CachedIndexedDataset"]

CACHED_MAGIC = b"TNTIDX\x00\x00"
_HEADER = struct.Struct("<8sQQQQQQ")  # magic, version, dtype code, element size, items, shape entries, doc_idx
_DTYPES = {1: "<u1", 2: "<i1", 3: "<i2", 4: "<i4", 5: "<i8", 8: "<u2"}  # the integer codes: tokens


class CachedIndexedDataset:
    """Read-only view of a ``TNTIDX`` ``prefix.idx`` / ``prefix.bin`` pair of 1-D token sequences."""

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.prefix = Path(os.fspath(prefix))
        self.index_path = index_file_path(prefix)
        self.data_path = data_file_path(prefix)
        for path in (self.index_path, self.data_path):
            if not path.is_file():
                raise IndexedDatasetError(f"{path} not found: a dataset prefix needs both {self.index_path.name} and "
                                          f"{self.data_path.name} (pass the path without the .bin/.idx extension)")
        self._read_index()
        self._map_data()

    def _read_index(self) -> None:
        path = self.index_path
        raw = path.read_bytes()
        if raw[:8] != CACHED_MAGIC:
            raise IndexedDatasetError(f"{path} is not a 'cached' (TNTIDX) index: magic {raw[:8]!r}, expected "
                                      f"{CACHED_MAGIC!r}")
        if len(raw) < _HEADER.size:
            raise IndexedDatasetError(f"{path} is truncated: {len(raw)} bytes, the header alone is {_HEADER.size}")
        _, version, code, element_size, items, shapes, docs = _HEADER.unpack_from(raw)
        if version != 1:
            raise IndexedDatasetError(f"{path} has index version {version}; only version 1 is known")
        if code not in _DTYPES:
            raise IndexedDatasetError(f"{path} has dtype code {code}, not an integer token type "
                                      f"(codes {sorted(_DTYPES)})")
        self.dtype = np.dtype(_DTYPES[code])
        if element_size != self.dtype.itemsize:
            raise IndexedDatasetError(f"{path} gives element size {element_size} for dtype {self.dtype} "
                                      f"({self.dtype.itemsize} bytes)")
        expected = _HEADER.size + 8 * (2 * (items + 1) + shapes + docs)
        if len(raw) != expected:
            raise IndexedDatasetError(f"{path} holds {len(raw)} bytes but its header announces {items} items, "
                                      f"{shapes} shape entries and {docs} doc_idx entries ({expected} bytes)")
        arrays = np.frombuffer(raw, dtype="<i8", offset=_HEADER.size)
        dim_offsets = arrays[: items + 1]
        data_offsets = arrays[items + 1 : 2 * (items + 1)]
        sizes = arrays[2 * (items + 1) : 2 * (items + 1) + shapes]
        if shapes != items or not np.array_equal(dim_offsets, np.arange(items + 1)):
            raise IndexedDatasetError(f"{path} holds multi-dimensional items; token datasets have one dimension")
        if items and (data_offsets[0] != 0 or not np.array_equal(np.diff(data_offsets), sizes)):
            raise IndexedDatasetError(f"{path} has data offsets that do not follow its item sizes")
        if sizes.size and sizes.max() > np.iinfo(np.int32).max:
            raise IndexedDatasetError(f"{path} has an item longer than 2^31 - 1 tokens")
        self.sizes: np.ndarray = sizes.astype(np.int32)
        self.pointers: np.ndarray = data_offsets[:-1] * element_size
        self.doc_idx: np.ndarray = arrays[2 * (items + 1) + shapes :].copy()
        self._end = int(data_offsets[-1]) if items else 0

    def _map_data(self) -> None:
        data_bytes = self.data_path.stat().st_size
        if data_bytes != self._end * self.dtype.itemsize:
            raise IndexedDatasetError(f"{self.data_path} holds {data_bytes} bytes but {self.index_path} says "
                                      f"{self._end * self.dtype.itemsize}; the pair is mismatched or truncated")
        self._data_map: np.ndarray | bytes = np.memmap(self.data_path, dtype=np.uint8, mode="r") if data_bytes else b""
        self.num_tokens: int = self._end

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return max(len(self.doc_idx) - 1, 0)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``i`` (a read-only view)."""
        n = len(self.sizes)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        i = i + n if i < 0 else i
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"offset {offset} + length {length} outside sequence {i} of {size} tokens")
        start = int(self.pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._data_map, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    @staticmethod
    def exists(prefix: str | os.PathLike[str]) -> bool:
        return index_file_path(prefix).is_file() and data_file_path(prefix).is_file()

    def close(self) -> None:
        self._data_map = b""

    def __enter__(self) -> "CachedIndexedDataset":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> str:
        return os.fspath(self.prefix)

    def __setstate__(self, prefix: str) -> None:
        self.__init__(prefix)  # type: ignore[misc]

    def __repr__(self) -> str:
        return (f"CachedIndexedDataset({os.fspath(self.prefix)!r}, dtype={self.dtype}, sequences={len(self)}, "
                f"tokens={self.num_tokens})")
