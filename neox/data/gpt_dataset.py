"""GPT samples: windows of seq_length + 1 consecutive tokens running across document boundaries.

Three index arrays (as in gpt-neox/Megatron) map a sample to tokens:
  doc_idx     the document order: epoch after epoch, each a fresh permutation of ``documents``
  sample_idx  [num_samples + 1, 2]: (position in doc_idx, token offset) where sample i starts;
              sample i ends on the token where sample i + 1 starts (one token of overlap,
              since the labels are the inputs shifted by one)
  shuffle_idx sample order: samples are shuffled within their epoch (the epoch their first
              token falls in), so every sample of epoch e is served before any of epoch e + 1
They are built once per (documents' sizes, seq_length, num_samples, seed) and cached as .npy.
Randomness comes from ``np.random.RandomState`` (a frozen stream), so every machine and numpy
version builds the same order; asking for more samples only appends epochs and leaves the
order of the earlier epochs unchanged.

That is gpt-neox's ``pack_impl: packed`` (the default). ``pack_until_overflow`` and ``unpacked``
build the same three arrays from whole documents (neox.data.packing); their samples are cut or
padded to seq_length + 1 tokens, and padded positions carry label -100 (left out of the loss).
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neox.data import index_cache
from neox.data.errors import DataError
from neox.data.indexed import IndexedDataset
from neox.data.packing import PACK_IMPLS, build_document_samples, eligible_documents

__all__ = ["GPTDataset", "IndexMappings", "build_index_mappings", "num_epochs_for"]

# Bump when the index construction changes: old cache files then stop matching.
_INDEX_FORMAT = "neox-gpt-index-v1"
_ARRAY_NAMES = ("doc_idx", "sample_idx", "shuffle_idx")
# Whole-document samples also record how many document passes they drew (not derivable from the arrays).
_DOCUMENT_ARRAY_NAMES = _ARRAY_NAMES + ("epochs",)
_MAX_SEED = 2**32 - 1
PAD_TOKEN = 0  # gpt-neox pads text with 0 and labels with -100
PAD_LABEL = -100


@dataclass(frozen=True)
class IndexMappings:
    doc_idx: np.ndarray  # [(num_epochs + 1) * num_documents] document ids
    sample_idx: np.ndarray  # [num_samples + 1, 2] int64
    shuffle_idx: np.ndarray  # [num_samples] int64
    num_epochs: int


def num_epochs_for(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest passes whose sample starts number at least num_samples (a sample starts every
    seq_length tokens; the last one may borrow its tail from the next pass)."""
    if num_samples <= 0:
        return 1
    # ceil(E * T / s) >= N  <=>  E * T > (N - 1) * s
    return (num_samples - 1) * seq_length // tokens_per_epoch + 1


def build_index_mappings(
    doc_sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int, seed: int
) -> IndexMappings:
    """Doc/sample/shuffle indices, vectorised within each epoch (a Python loop runs per epoch
    only). ``doc_sizes[k]`` is the token count of ``documents[k]``."""
    doc_sizes = np.asarray(doc_sizes, dtype=np.int64)
    documents = np.asarray(documents, dtype=np.int64)
    num_documents = len(documents)
    tokens_per_epoch = int(doc_sizes.sum())
    if tokens_per_epoch < seq_length + 1:
        raise DataError(
            f"{tokens_per_epoch} tokens cannot fill one sample of seq_length + 1 = {seq_length + 1}"
        )
    num_epochs = num_epochs_for(tokens_per_epoch, seq_length, num_samples)
    # Each stream is drawn epoch after epoch, so asking for more epochs only appends draws.
    doc_rng = np.random.RandomState([seed, 0])
    sample_rng = np.random.RandomState([seed, 1])

    # One pass beyond num_epochs supplies the tail of the last sample (at most seq_length
    # tokens, fewer than one epoch holds).
    passes = num_epochs + 1
    order = np.empty(passes * num_documents, dtype=np.int64)
    for epoch in range(passes):
        order[epoch * num_documents : (epoch + 1) * num_documents] = doc_rng.permutation(num_documents)
    doc_idx = documents[order]
    doc_idx = doc_idx.astype(np.int32 if documents.max() < 2**31 else np.int64)

    total_samples = (num_epochs * tokens_per_epoch + seq_length - 1) // seq_length
    doc_starts = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(doc_sizes[order], out=doc_starts[1:])
    token_starts = np.arange(total_samples + 1, dtype=np.int64) * seq_length
    # side="right" - 1 skips empty documents: it lands on the last document starting at or before
    # the token, which is the non-empty one holding it.
    position = np.searchsorted(doc_starts, token_starts, side="right") - 1
    sample_idx = np.stack([position, token_starts - doc_starts[position]], axis=1)

    # A sample belongs to the epoch holding its first token; epoch e's samples are a contiguous
    # range, shuffled on its own.
    epoch_starts = -(-np.arange(num_epochs + 1, dtype=np.int64) * tokens_per_epoch // seq_length)
    epoch_starts[-1] = total_samples
    shuffle_idx = np.empty(total_samples, dtype=np.int64)
    for epoch in range(num_epochs):
        start, end = int(epoch_starts[epoch]), int(epoch_starts[epoch + 1])
        shuffle_idx[start:end] = start + sample_rng.permutation(end - start)
    return IndexMappings(doc_idx, sample_idx, shuffle_idx, num_epochs)


def digest(*parts: Any) -> str:
    """A short hash of arrays and reprs: the key of an index cache entry."""
    hasher = hashlib.blake2b(digest_size=8)
    for part in parts:
        data = np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray) else repr(part).encode()
        hasher.update(len(data).to_bytes(8, "little"))
        hasher.update(data)
    return hasher.hexdigest()


class GPTDataset(torch.utils.data.Dataset):
    """Samples of ``seq_length + 1`` tokens from the sequences ``documents`` of ``indexed``.

    ``documents`` index ``indexed.sizes`` (one sequence per document, as the preprocessing tool
    writes them; the gpt-neox convention). ``len(self)`` covers whole epochs, so it is at least
    ``num_samples``. A ``label_dataset`` must have the same sequence sizes; its tokens come
    back under ``label`` (negative = masked from the loss).

    Indices are looked up in ``cache_dir`` (if given), next to the data, then in
    ``index_cache.default_cache_dir()``, and built into the first of those that is writable;
    ``build_lock`` serialises concurrent builders with an fcntl lock (turn it off only on file
    systems without locks, with a single building rank).

    ``pack_impl``/``allow_chopped`` are gpt-neox's (see neox.data.packing); samples of the
    whole-document modes always carry a ``label`` (the label dataset's, or the text), -100 on padding.
    ``indexed`` and ``label_dataset`` may be either on-disk format (neox.data.formats).

    ``reward_dataset`` (one reward per document, its first value: gpt-neox's reward layout) adds ``reward``, each
    token's document reward (float32); ``ref_dataset`` (per-token float values of the text's sizes, e.g. reference
    log-probs written ahead of training) adds ``ref``. Both are padded with 0.
    """

    def __init__(
        self,
        name: str,
        indexed: IndexedDataset,
        documents: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        label_dataset: IndexedDataset | None = None,
        reward_dataset: IndexedDataset | None = None,
        ref_dataset: IndexedDataset | None = None,
        build_lock: bool = True,
        pack_impl: str = "packed",
        allow_chopped: bool = True,
    ) -> None:
        self.name = name
        self.indexed = indexed
        self.label_dataset = label_dataset
        self.reward_dataset = reward_dataset
        self.ref_dataset = ref_dataset
        self.seq_length = int(seq_length)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        where = f"dataset {name!r} ({indexed.prefix})"
        if pack_impl not in PACK_IMPLS:
            raise DataError(f"{where}: pack_impl must be one of {list(PACK_IMPLS)}, got {pack_impl!r}")
        self.pack_impl = pack_impl
        self.allow_chopped = bool(allow_chopped)
        documents = np.asarray(documents, dtype=np.int64)
        self._validate(where, documents)
        doc_sizes = np.asarray(indexed.sizes)[documents]
        tokens = int(doc_sizes.sum(dtype=np.int64))
        if pack_impl != "packed":
            self.tokens_per_epoch = tokens
            self._init_whole_documents(where, documents, doc_sizes, cache_dir, build_lock)
            return
        if tokens < self.seq_length + 1:
            raise DataError(
                f"{where} has {tokens} tokens in {len(documents)} documents, too few for one sample "
                f"of seq_length + 1 = {self.seq_length + 1} tokens; use more data, a larger share "
                f"in `split`, or a smaller seq_length"
            )
        self.tokens_per_epoch = tokens
        self.num_epochs = num_epochs_for(tokens, self.seq_length, self.num_samples)
        self.cache_key = digest(
            _INDEX_FORMAT, documents, doc_sizes.astype(np.int64), self.seq_length, self.num_samples, self.seed
        )
        stem = (
            f"{Path(indexed.prefix).name}_{name}_indexmap_{self.num_samples}ns_{self.seq_length}sl_"
            f"{self.seed}s_{self.cache_key}"
        )
        directories = index_cache.directories_for(indexed.prefix, cache_dir)
        self.build_seconds: float | None = None

        def build() -> dict[str, np.ndarray]:
            started = time.perf_counter()
            maps = build_index_mappings(doc_sizes, documents, self.num_samples, self.seq_length, self.seed)
            self.build_seconds = time.perf_counter() - started
            return {"doc_idx": maps.doc_idx, "sample_idx": maps.sample_idx, "shuffle_idx": maps.shuffle_idx}

        self._names = _ARRAY_NAMES
        arrays, self.cache_dir = index_cache.load_or_build(
            stem, _ARRAY_NAMES, build, directories, use_lock=build_lock
        )
        self.cache_stem = stem
        self._set_arrays(arrays)

    def _init_whole_documents(self, where: str, documents: np.ndarray, doc_sizes: np.ndarray,
                              cache_dir: str | os.PathLike[str] | None, build_lock: bool) -> None:
        """Indices of pack_until_overflow / unpacked samples (neox.data.packing), cached like packed ones."""
        # Which documents may start a sample depends on the label contents: a rewritten label file is a new entry.
        label_identity = None
        if self.label_dataset is not None:
            stat = Path(self.label_dataset.data_path).stat()
            label_identity = (str(Path(self.label_dataset.prefix).resolve()), stat.st_size, stat.st_mtime_ns)
        self.cache_key = digest(
            f"{_INDEX_FORMAT}-{self.pack_impl}", documents, doc_sizes.astype(np.int64), self.seq_length,
            self.num_samples, self.seed, self.allow_chopped, label_identity,
        )
        stem = (
            f"{Path(self.indexed.prefix).name}_{self.name}_indexmap_{self.num_samples}ns_{self.seq_length}sl_"
            f"{self.seed}s_{self.pack_impl}pi{'_ac' if self.allow_chopped else ''}_{self.cache_key}"
        )
        directories = index_cache.directories_for(self.indexed.prefix, cache_dir)
        self.build_seconds = None

        def build() -> dict[str, np.ndarray]:
            started = time.perf_counter()
            eligible = eligible_documents(doc_sizes, documents, self.seq_length, self.allow_chopped,
                                          self.label_dataset)
            try:
                doc_idx, sample_idx, shuffle_idx, epochs = build_document_samples(
                    doc_sizes, documents, eligible, self.num_samples, self.seq_length, self.seed, self.pack_impl)
            except DataError as err:
                raise DataError(f"{where}, pack_impl {self.pack_impl}: {err}") from None
            self.build_seconds = time.perf_counter() - started
            return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx,
                    "epochs": np.array([epochs], dtype=np.int64)}

        self._names = _DOCUMENT_ARRAY_NAMES
        arrays, self.cache_dir = index_cache.load_or_build(
            stem, _DOCUMENT_ARRAY_NAMES, build, directories, use_lock=build_lock
        )
        self.cache_stem = stem
        self._set_arrays(arrays)
        self.num_epochs = int(arrays["epochs"][0])

    def _validate(self, where: str, documents: np.ndarray) -> None:
        if self.seq_length < 1:
            raise DataError(f"{where}: seq_length must be >= 1, got {self.seq_length}")
        if self.num_samples < 0:
            raise DataError(f"{where}: num_samples must be >= 0, got {self.num_samples}")
        if not 0 <= self.seed <= _MAX_SEED:
            raise DataError(f"{where}: seed must lie in 0..{_MAX_SEED}, got {self.seed}")
        if documents.ndim != 1 or len(documents) == 0:
            raise DataError(f"{where}: documents must be a non-empty 1-D array of sequence indices")
        if documents.min() < 0 or documents.max() >= len(self.indexed.sizes):
            raise DataError(
                f"{where}: document indices must lie in 0..{len(self.indexed.sizes) - 1}, got "
                f"{documents.min()}..{documents.max()}"
            )
        for kind, extra in (("label", self.label_dataset), ("reference log-prob", self.ref_dataset)):
            if extra is not None and not np.array_equal(extra.sizes, self.indexed.sizes):
                raise DataError(
                    f"{where}: {kind} dataset {extra.prefix} does not have the same sequence "
                    f"sizes as the text dataset; it must be written together with its text"
                )
        if self.reward_dataset is not None and (len(self.reward_dataset.sizes) != len(self.indexed.sizes)
                                                or int(np.min(self.reward_dataset.sizes, initial=1)) < 1):
            raise DataError(f"{where}: reward dataset {self.reward_dataset.prefix} needs one non-empty reward "
                            f"document per text document ({len(self.reward_dataset.sizes)} for "
                            f"{len(self.indexed.sizes)})")

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.doc_idx = arrays["doc_idx"]
        self.sample_idx = arrays["sample_idx"]
        self.shuffle_idx = arrays["shuffle_idx"]

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def _segments(self, first: tuple[int, int], last: tuple[int, int]) -> list[tuple[int, int, int]]:
        """(document, offset, length) pieces of a sample. Packed: from `first` to `last`, both ends inclusive;
        whole-document modes: read no further than seq_length + 1 tokens (a chopped document may be far longer)."""
        (doc_first, offset_first), (doc_last, offset_last) = first, last
        sizes = self.indexed.sizes
        if self.pack_impl == "packed":
            if doc_first == doc_last:
                return [(int(self.doc_idx[doc_first]), offset_first, offset_last - offset_first + 1)]
            head = int(self.doc_idx[doc_first])
            pieces = [(head, offset_first, int(sizes[head]) - offset_first)]
            pieces += [(int(self.doc_idx[k]), 0, int(sizes[int(self.doc_idx[k])]))
                       for k in range(doc_first + 1, doc_last)]
            return pieces + [(int(self.doc_idx[doc_last]), 0, offset_last + 1)]
        room = self.seq_length + 1
        pieces = []
        for position in range(first[0], last[0] + 1):
            doc = int(self.doc_idx[position])
            size = int(sizes[doc]) if position < last[0] else min(int(sizes[doc]), last[1] + 1)
            take = min(size, room)
            if take:
                pieces.append((doc, 0, take))
                room -= take
            if room == 0:
                break
        return pieces

    @staticmethod
    def _read(source: IndexedDataset, pieces: list[tuple[int, int, int]]) -> np.ndarray:
        if not pieces:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([source.get(doc, offset, length) for doc, offset, length in pieces])

    def _rewards(self, pieces: list[tuple[int, int, int]]) -> np.ndarray:
        """Each token's document reward (gpt-neox: a reward document's first value, repeated over the document)."""
        assert self.reward_dataset is not None
        if not pieces:
            return np.empty(0, dtype=np.float32)
        return np.concatenate([np.full(length, self.reward_dataset.get(doc, 0, 1)[0], dtype=np.float32)
                               for doc, _, length in pieces])

    def _bounds(self, index: int) -> tuple[tuple[int, int], tuple[int, int]]:
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"sample {index} out of range for dataset {self.name!r} of {length} samples")
        sample = int(self.shuffle_idx[index])
        first = (int(self.sample_idx[sample, 0]), int(self.sample_idx[sample, 1]))
        last = (int(self.sample_idx[sample + 1, 0]), int(self.sample_idx[sample + 1, 1]))
        return first, last

    def text_tokens(self, index: int) -> np.ndarray:
        """The text of sample ``index`` without padding (what char_level_ppl counts)."""
        return self._read(self.indexed, self._segments(*self._bounds(index))).astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        pieces = self._segments(*self._bounds(index))
        text = self._read(self.indexed, pieces).astype(np.int64)
        if self.pack_impl == "packed" and len(text) != self.seq_length + 1:
            raise RuntimeError(
                f"sample {index} of {self.name!r} has {len(text)} tokens, expected {self.seq_length + 1}: "
                f"the index cache {self.cache_dir / self.cache_stem}_*.npy does not match "
                f"{self.indexed.prefix}; delete those files to rebuild them"
            )
        width = self.seq_length + 1

        def padded(values: np.ndarray, fill: float, dtype: Any) -> np.ndarray:
            if self.pack_impl == "packed":
                return values.astype(dtype)
            out = np.full(width, fill, dtype=dtype)
            out[: len(values)] = values
            return out

        item = {"text": padded(text, PAD_TOKEN, np.int64)}
        if self.label_dataset is not None:
            item["label"] = padded(self._read(self.label_dataset, pieces), PAD_LABEL, np.int64)
        elif self.pack_impl != "packed":
            item["label"] = padded(text, PAD_LABEL, np.int64)  # padding is never trained
        if self.reward_dataset is not None:
            item["reward"] = padded(self._rewards(pieces), 0.0, np.float32)
        if self.ref_dataset is not None:
            item["ref"] = padded(self._read(self.ref_dataset, pieces), 0.0, np.float32)
        return item

    # DataLoader workers started by spawn re-map the cached files instead of receiving copies.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in _ARRAY_NAMES:
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._set_arrays(
            {
                name: np.load(index_cache.array_path(self.cache_dir, self.cache_stem, name), mmap_mode="r")
                for name in self._names
            }
        )

    def __repr__(self) -> str:
        packing = "" if self.pack_impl == "packed" else f", pack_impl={self.pack_impl}"
        return (
            f"GPTDataset({self.name!r}, {self.indexed.prefix}, samples={len(self)}, "
            f"seq_length={self.seq_length}, seed={self.seed}{packing})"
        )
