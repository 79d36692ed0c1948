"""Memory-mapped token datasets in the Megatron/gpt-neox ``.bin``/``.idx`` format.

``.idx``: 9-byte magic ``MMIDIDX\\x00\\x00``, <Q version (1), <B dtype code, <Q sequence count,
<Q doc_idx count, then int32 sizes[], int64 byte pointers into ``.bin``[], int64 doc_idx[].
``.bin``: the tokens of every sequence, back to back, nothing else. ``doc_idx[j]`` is the first
sequence of document ``j``; it starts at 0 and each ``end_document()`` appends the sequence count.
"""
from __future__ import annotations

import os
import secrets
import shutil
import struct
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np

__all__ = [
    "DTYPE_CODES",
    "IndexedDataset",
    "IndexedDatasetError",
    "IndexedDatasetWriter",
    "best_dtype",
    "data_file_path",
    "index_file_path",
]

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# magic, version, dtype code, number of sequences, number of doc_idx entries
_HEADER = struct.Struct("<9sQBQQ")
HEADER_SIZE = _HEADER.size  # 34 bytes

# gpt-neox's codes (its indexed_dataset.py): 6 float32, 7 float64 (Megatron-core swapped them). Tokens are integers;
# float shards hold per-token values (reference log-probs), written only by a writer opened with values=True.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("<u1"),
    2: np.dtype("<i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<f4"),
    7: np.dtype("<f8"),
    8: np.dtype("<u2"),
}
_WRITABLE_CODES = {dtype: code for code, dtype in DTYPE_CODES.items()}
_TOKEN_DTYPE_CODES = {dtype: code for code, dtype in DTYPE_CODES.items() if dtype.kind in "iu"}
_MAX_SEQUENCE_LENGTH = np.iinfo(np.int32).max  # sizes[] is int32 on disk
_WRITE_BUFFER_BYTES = 1 << 20


class IndexedDatasetError(ValueError):
    """A dataset file is missing, malformed or inconsistent, or a write request is invalid."""


def best_dtype(vocab_size: int) -> np.dtype:
    """The token dtype gpt-neox picks for a vocabulary: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def data_file_path(prefix: str | os.PathLike[str]) -> Path:
    return Path(os.fspath(prefix) + ".bin")


def index_file_path(prefix: str | os.PathLike[str]) -> Path:
    return Path(os.fspath(prefix) + ".idx")


def _token_dtype(dtype: Any, values: bool = False) -> np.dtype:
    try:
        resolved = np.dtype(dtype).newbyteorder("<")
    except TypeError as err:
        raise IndexedDatasetError(f"{dtype!r} is not a numpy dtype") from err
    allowed_codes = _WRITABLE_CODES if values else _TOKEN_DTYPE_CODES
    if resolved not in allowed_codes:
        allowed = ", ".join(str(d) for d in allowed_codes)
        raise IndexedDatasetError(f"token dtype {resolved} cannot be written; use one of: {allowed}")
    return resolved


class _GrowableArray:
    """A 1-D numpy array with amortised appends (a list of Python ints costs ~4x the memory)."""

    def __init__(self, dtype: np.dtype, initial: Sequence[int] = ()) -> None:
        self._data = np.empty(max(1024, len(initial)), dtype=dtype)
        self._length = 0
        self.extend(np.asarray(initial, dtype=dtype))

    def __len__(self) -> int:
        return self._length

    def _reserve(self, extra: int) -> None:
        needed = self._length + extra
        if needed > len(self._data):
            grown = np.empty(max(needed, 2 * len(self._data)), dtype=self._data.dtype)
            grown[: self._length] = self._data[: self._length]
            self._data = grown

    def append(self, value: int) -> None:
        self._reserve(1)
        self._data[self._length] = value
        self._length += 1

    def extend(self, values: np.ndarray) -> None:
        self._reserve(len(values))
        self._data[self._length : self._length + len(values)] = values
        self._length += len(values)

    def view(self) -> np.ndarray:
        return self._data[: self._length]


def _temporary_path(final: Path) -> Path:
    # Hidden and ending in .tmp so no *.bin/*.idx glob (e.g. the merge tool's) picks it up.
    return final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _write_index(stream: BinaryIO, dtype: np.dtype, sizes: np.ndarray, doc_idx: np.ndarray) -> None:
    sizes = np.ascontiguousarray(sizes, dtype="<i4")
    pointers = np.zeros(len(sizes), dtype="<i8")
    if len(sizes) > 1:
        np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= dtype.itemsize
    stream.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, _WRITABLE_CODES[dtype], len(sizes), len(doc_idx)))
    stream.write(memoryview(sizes))
    stream.write(memoryview(pointers))
    stream.write(memoryview(np.ascontiguousarray(doc_idx, dtype="<i8")))


class IndexedDatasetWriter:
    """Builds ``prefix.bin``/``prefix.idx``; nothing appears under those names before finalize().

    Use as a context manager: a clean exit finalizes, an exception aborts (temporaries deleted).
    Output is byte-identical to gpt-neox's MMapIndexedDatasetBuilder for the same calls. values=True: a shard of
    per-token values (float32/float64 allowed, e.g. reference log-probs) instead of token ids.
    """

    def __init__(self, prefix: str | os.PathLike[str], dtype: Any, *, values: bool = False) -> None:
        self.prefix = Path(os.fspath(prefix))
        self.dtype = _token_dtype(dtype, values)
        self.data_path = data_file_path(prefix)
        self.index_path = index_file_path(prefix)
        self._limits = np.iinfo(self.dtype) if self.dtype.kind in "iu" else np.finfo(self.dtype)
        self._sizes = _GrowableArray(np.dtype(np.int32))
        self._doc_idx = _GrowableArray(np.dtype(np.int64), [0])
        self.num_tokens = 0
        parent = self.data_path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise IndexedDatasetError(f"cannot create output directory {parent}: {err}") from err
        self._tmp_data_path = _temporary_path(self.data_path)
        self._tmp_index_path: Path | None = None
        self._data_file: BinaryIO = open(self._tmp_data_path, "xb", buffering=_WRITE_BUFFER_BYTES)
        self._closed = False

    # -- state ---------------------------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        return len(self._sizes)

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    def _check_open(self) -> None:
        if self._closed:
            raise IndexedDatasetError(f"writer for {self.prefix} is already finalized or aborted")

    def _as_tokens(self, tokens: Any, what: str) -> np.ndarray:
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise IndexedDatasetError(f"{what} for {self.prefix} must be 1-D, got shape {array.shape}")
        if array.size == 0:
            return np.empty(0, dtype=self.dtype)
        if self.dtype.kind == "f":
            return np.ascontiguousarray(array, dtype=self.dtype)
        if array.dtype.kind not in "iu":
            raise IndexedDatasetError(
                f"{what} for {self.prefix} must be integers, got dtype {array.dtype}"
            )
        if not np.can_cast(array.dtype, self.dtype, casting="safe"):
            low, high = int(array.min()), int(array.max())
            if low < self._limits.min or high > self._limits.max:
                bad = low if low < self._limits.min else high
                raise IndexedDatasetError(
                    f"token id {bad} does not fit {self.dtype} (range {self._limits.min}.."
                    f"{self._limits.max}) while writing {self.data_path}; pick the dtype with "
                    f"best_dtype(vocab_size) (int32 for vocabularies of 65500 ids or more)"
                )
        return np.ascontiguousarray(array, dtype=self.dtype)

    # -- building ------------------------------------------------------------------------------
    def add_item(self, tokens: np.ndarray | Sequence[int]) -> None:
        """Append one sequence (gpt-neox: one sentence of the current document)."""
        self._check_open()
        array = self._as_tokens(tokens, "item")
        if array.size > _MAX_SEQUENCE_LENGTH:
            raise IndexedDatasetError(f"item of {array.size} tokens exceeds the int32 size field")
        self._data_file.write(memoryview(array))
        self._sizes.append(array.size)
        self.num_tokens += array.size

    def end_document(self) -> None:
        self._check_open()
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens: np.ndarray | Sequence[int]) -> None:
        self.add_item(tokens)
        self.end_document()

    def add_documents(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many one-item documents given as one concatenated array and their lengths."""
        self._check_open()
        flat = self._as_tokens(flat_tokens, "flat_tokens")
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or (lengths.size and lengths.dtype.kind not in "iu"):
            raise IndexedDatasetError(f"lengths for {self.prefix} must be a 1-D integer array")
        if lengths.size and (lengths.min() < 0 or lengths.max() > _MAX_SEQUENCE_LENGTH):
            raise IndexedDatasetError(f"lengths for {self.prefix} must lie in 0..{_MAX_SEQUENCE_LENGTH}")
        total = int(lengths.sum(dtype=np.int64))
        if total != flat.size:
            raise IndexedDatasetError(
                f"lengths for {self.prefix} sum to {total} but flat_tokens holds {flat.size} tokens"
            )
        self._data_file.write(memoryview(flat))
        first = len(self._sizes)
        self._sizes.extend(lengths.astype(np.int32))
        self._doc_idx.extend(np.arange(first + 1, first + lengths.size + 1, dtype=np.int64))
        self.num_tokens += total

    def append_dataset(self, prefix: str | os.PathLike[str]) -> None:
        """Append every sequence and document of an existing dataset (same dtype required)."""
        self._check_open()
        source = IndexedDataset(prefix)
        try:
            if source.dtype != self.dtype:
                raise IndexedDatasetError(
                    f"cannot append {source.index_path}: its dtype is {source.dtype} but "
                    f"{self.prefix} is being written as {self.dtype}"
                )
            first = len(self._sizes)
            self._sizes.extend(source.sizes)
            if len(source.doc_idx) > 1:
                self._doc_idx.extend(source.doc_idx[1:] + first)
            self.num_tokens += source.num_tokens
            with open(source.data_path, "rb") as data:
                shutil.copyfileobj(data, self._data_file, _WRITE_BUFFER_BYTES)
        finally:
            source.close()

    # -- ending --------------------------------------------------------------------------------
    def finalize(self) -> None:
        """Write the index and move both files into place (.bin first, then .idx)."""
        self._check_open()
        try:
            self._data_file.flush()
            os.fsync(self._data_file.fileno())
            self._data_file.close()
            self._tmp_index_path = _temporary_path(self.index_path)
            with open(self._tmp_index_path, "xb", buffering=_WRITE_BUFFER_BYTES) as index:
                _write_index(index, self.dtype, self._sizes.view(), self._doc_idx.view())
                index.flush()
                os.fsync(index.fileno())
            # A stale .idx next to the new .bin would look like a valid (mismatched) pair.
            self.index_path.unlink(missing_ok=True)
            os.replace(self._tmp_data_path, self.data_path)
            os.replace(self._tmp_index_path, self.index_path)
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Drop everything written so far; existing output under the prefix is left untouched."""
        if self._closed:
            return
        self._closed = True
        self._data_file.close()
        for path in (self._tmp_data_path, self._tmp_index_path):
            if path is not None:
                path.unlink(missing_ok=True)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()

    def __del__(self) -> None:
        # A writer dropped without finalize() leaves no files behind.
        if getattr(self, "_closed", True) is False:
            self.abort()


class IndexedDataset:
    """Read-only view of ``prefix.bin``/``prefix.idx``; both files are memory-mapped."""

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.prefix = Path(os.fspath(prefix))
        self.index_path = index_file_path(prefix)
        self.data_path = data_file_path(prefix)
        for path in (self.index_path, self.data_path):
            if not path.is_file():
                raise IndexedDatasetError(
                    f"{path} not found: a dataset prefix needs both {self.index_path.name} and "
                    f"{self.data_path.name} (pass the path without the .bin/.idx extension)"
                )
        self._read_index()
        self._map_data()

    def _read_index(self) -> None:
        path = self.index_path
        index_bytes = path.stat().st_size
        with open(path, "rb") as stream:
            header = stream.read(HEADER_SIZE)
        magic = header[: len(INDEX_MAGIC)]
        if magic != INDEX_MAGIC[: len(magic)]:
            raise IndexedDatasetError(
                f"{path} is not an mmap indexed dataset index (magic {magic!r}, expected "
                f"{INDEX_MAGIC!r}); it may be a legacy 'cached'/'lazy' index or another file"
            )
        if len(header) < HEADER_SIZE:
            raise IndexedDatasetError(f"{path} is truncated: {len(header)} bytes, the header alone is {HEADER_SIZE}")
        _, version, code, num_sequences, num_doc_idx = _HEADER.unpack(header)
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{path} has index version {version}; only version {INDEX_VERSION} is known")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{path} has unknown dtype code {code}; known codes: {sorted(DTYPE_CODES)}")
        self.dtype: np.dtype = DTYPE_CODES[code]
        expected = HEADER_SIZE + 12 * num_sequences + 8 * num_doc_idx
        if index_bytes < expected:
            raise IndexedDatasetError(
                f"{path} is truncated: {index_bytes} bytes, but its header announces {num_sequences} "
                f"sequences and {num_doc_idx} doc_idx entries ({expected} bytes); re-create the dataset"
            )
        if index_bytes > expected:
            raise IndexedDatasetError(
                f"{path} has {index_bytes - expected} bytes after the document index (expected "
                f"{expected} bytes); multimodal Megatron indexes are not supported"
            )
        self._index_map = np.memmap(path, dtype=np.uint8, mode="r")
        sizes_end = HEADER_SIZE + 4 * num_sequences
        pointers_end = sizes_end + 8 * num_sequences
        self.sizes: np.ndarray = self._index_map[HEADER_SIZE:sizes_end].view("<i4")
        self.pointers: np.ndarray = self._index_map[sizes_end:pointers_end].view("<i8")
        self.doc_idx: np.ndarray = self._index_map[pointers_end:expected].view("<i8")
        # O(1) sanity checks only: a full monotonicity scan would cost every rank at every start.
        if num_doc_idx and (self.doc_idx[0] != 0 or not 0 <= self.doc_idx[-1] <= num_sequences):
            raise IndexedDatasetError(
                f"{path} has a corrupt document index: it must run from 0 to at most {num_sequences} "
                f"(the sequence count), found {int(self.doc_idx[0])} .. {int(self.doc_idx[-1])}"
            )

    def _map_data(self) -> None:
        data_bytes = self.data_path.stat().st_size
        expected = 0
        if len(self.sizes):
            expected = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize
        if data_bytes != expected:
            raise IndexedDatasetError(
                f"{self.data_path} holds {data_bytes} bytes but {self.index_path} says {expected} "
                f"(last pointer + last size x {self.dtype.itemsize}); the pair is mismatched or "
                f"one file is truncated"
            )
        self._data_map: np.ndarray | bytes
        self._data_map = np.memmap(self.data_path, dtype=np.uint8, mode="r") if data_bytes else b""
        self.num_tokens: int = data_bytes // self.dtype.itemsize

    # -- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return max(len(self.doc_idx) - 1, 0)

    def _sequence_index(self, i: int) -> int:
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        return i + n if i < 0 else i

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``i`` (a read-only view)."""
        i = self._sequence_index(int(i))
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"offset {offset} + length {length} outside sequence {i} of {size} tokens")
        start = int(self.pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._data_map, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, key: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError(f"slices of {self.prefix} must be contiguous (step 1)")
            if stop <= start:
                return []
            total = int(self.sizes[start:stop].sum(dtype=np.int64))
            tokens = np.frombuffer(self._data_map, dtype=self.dtype, count=total, offset=int(self.pointers[start]))
            return np.split(tokens, np.cumsum(self.sizes[start : stop - 1], dtype=np.int64))
        return self.get(key)

    def get_document(self, j: int) -> np.ndarray:
        """All tokens of document ``j`` (its sequences are contiguous in ``.bin``)."""
        n = self.num_documents
        if not -n <= j < n:
            raise IndexError(f"document {j} out of range for {self.prefix} ({n} documents)")
        j = j + n if j < 0 else j
        first, end = int(self.doc_idx[j]), int(self.doc_idx[j + 1])
        if end <= first:
            return np.empty(0, dtype=self.dtype)
        start = int(self.pointers[first])
        stop = int(self.pointers[end - 1]) + int(self.sizes[end - 1]) * self.dtype.itemsize
        return np.frombuffer(self._data_map, dtype=self.dtype, count=(stop - start) // self.dtype.itemsize, offset=start)

    def get_doc_idx(self) -> np.ndarray:
        return self.doc_idx

    @staticmethod
    def exists(prefix: str | os.PathLike[str]) -> bool:
        return index_file_path(prefix).is_file() and data_file_path(prefix).is_file()

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the maps; arrays handed out earlier keep their own reference."""
        self._data_map = b""
        self.sizes = self.pointers = self.doc_idx = np.empty(0, dtype=np.int64)
        self._index_map = None

    def __enter__(self) -> "IndexedDataset":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # Worker processes re-open the files instead of pickling the maps.
    def __getstate__(self) -> str:
        return os.fspath(self.prefix)

    def __setstate__(self, prefix: str) -> None:
        self.__init__(prefix)  # type: ignore[misc]

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({os.fspath(self.prefix)!r}, dtype={self.dtype}, sequences={len(self)}, "
            f"documents={self.num_documents}, tokens={self.num_tokens})"
        )
