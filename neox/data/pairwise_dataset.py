"""Chosen/rejected pairs (gpt-neox's `dataset_impl: pairwise`): document k of the chosen (pos) dataset with document
k of the rejected (neg) dataset, one pair per sample.

The datasets are aligned by index, as tools/preprocess_data_with_chat_template.py writes them (--jsonl-keys chosen
rejected: one document per input line in each). A pair is eligible when both documents are non-empty, fit in
seq_length + 1 tokens unless allow_chopped, and (with label datasets) each has a trained label among its first
seq_length + 1, as gpt-neox's unpacked pairwise index requires. The order is a fresh permutation of the eligible
pairs per epoch from a frozen np.random.RandomState stream (neox.data.packing, pack_impl unpacked), cached like the
GPT indices. Each side is cut to seq_length + 1 tokens and padded with token 0 and label -100 (padding is never
trained); without label datasets the label is the text.

Where gpt-neox differs, on purpose: its samples also read the first token of the NEXT pair's documents (its unpacked
index layout), which would add a token of another conversation to each sequence's log-probability; here a sample
is exactly its pair. gpt-neox's pack_until_overflow, several pairs per sample, is refused by the config: dpo and rm
score each sample as one pair.

Samples: "pos", "neg" (int64 [seq_length + 1]), "pos_label", "neg_label" (int64, -100 = not trained), and with
reference datasets "pos_ref", "neg_ref" (float32, 0 on padding): gpt-neox's precompute_model_name files
(neox/generate/precompute.py writes them).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neox.data import index_cache
from neox.data.errors import DataError
from neox.data.gpt_dataset import PAD_LABEL, PAD_TOKEN, digest
from neox.data.packing import build_document_samples, eligible_documents

__all__ = ["PairwiseDataset"]

_INDEX_FORMAT = "neox-pairwise-index-v1"
_ARRAY_NAMES = ("order",)
SIDES = ("pos", "neg")


def _identity(dataset: Any) -> tuple | None:
    """What makes a cached eligibility stale: the label file's path, size and modification time."""
    if dataset is None:
        return None
    stat = Path(dataset.data_path).stat()
    return str(Path(dataset.prefix).resolve()), stat.st_size, stat.st_mtime_ns


class PairwiseDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        name: str,
        pos: Any,
        neg: Any,
        num_samples: int,
        seq_length: int,
        seed: int,
        *,
        pos_label: Any = None,
        neg_label: Any = None,
        pos_ref: Any = None,
        neg_ref: Any = None,
        allow_chopped: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        build_lock: bool = True,
    ) -> None:
        self.name, self.seq_length, self.seed = name, int(seq_length), int(seed)
        self.num_samples = int(num_samples)
        self.sources = {"pos": pos, "neg": neg, "pos_label": pos_label, "neg_label": neg_label,
                        "pos_ref": pos_ref, "neg_ref": neg_ref}
        where = f"pairwise dataset {name!r} ({pos.prefix} / {neg.prefix})"
        self._validate(where)
        documents = np.arange(len(pos.sizes), dtype=np.int64)
        pos_sizes, neg_sizes = np.asarray(pos.sizes, np.int64), np.asarray(neg.sizes, np.int64)
        self.cache_key = digest(_INDEX_FORMAT, pos_sizes, neg_sizes, self.seq_length, self.num_samples, self.seed,
                                bool(allow_chopped), _identity(pos_label), _identity(neg_label))
        stem = f"{Path(pos.prefix).name}_{name}_pairs_{self.num_samples}ns_{self.seq_length}sl_{self.seed}s_" \
               f"{self.cache_key}"

        def build() -> dict[str, np.ndarray]:
            eligible = (eligible_documents(pos_sizes, documents, self.seq_length, allow_chopped, pos_label)
                        & eligible_documents(neg_sizes, documents, self.seq_length, allow_chopped, neg_label))
            try:
                doc_idx, _, _, epochs = build_document_samples(
                    np.maximum(pos_sizes, neg_sizes), documents, eligible, self.num_samples, self.seq_length,
                    self.seed, "unpacked")
            except DataError as err:
                raise DataError(f"{where}: {err}") from None
            return {"order": doc_idx[: epochs * int(eligible.sum())]}

        directories = index_cache.directories_for(pos.prefix, cache_dir)
        arrays, self.cache_dir = index_cache.load_or_build(stem, _ARRAY_NAMES, build, directories,
                                                           use_lock=build_lock)
        self.cache_stem = stem
        self.order = arrays["order"]

    def _validate(self, where: str) -> None:
        if self.seq_length < 1:
            raise DataError(f"{where}: seq_length must be >= 1, got {self.seq_length}")
        pos, neg = self.sources["pos"], self.sources["neg"]
        if len(pos.sizes) != len(neg.sizes):
            raise DataError(f"{where}: {len(pos.sizes)} chosen documents but {len(neg.sizes)} rejected ones; the "
                            "k-th document of each side is one pair, so both must come from the same input lines")
        if (self.sources["pos_label"] is None) != (self.sources["neg_label"] is None):
            raise DataError(f"{where}: label datasets are given for both sides or for neither")
        for key in ("pos_label", "neg_label"):
            extra = self.sources[key]
            text = self.sources[key.split("_")[0]]
            if extra is not None and not np.array_equal(extra.sizes, text.sizes):
                raise DataError(f"{where}: {extra.prefix} ({key}) does not have the sequence sizes of "
                                f"{text.prefix}; it must be written alongside that text")
        for key in ("pos_ref", "neg_ref"):
            # gpt-neox's files hold seq_length values per document (more documents, padding ones, may follow): one
            # per label position a sample can train.
            ref, text = self.sources[key], self.sources[key.split("_")[0]]
            if ref is None:
                continue
            n = len(text.sizes)
            needed = np.minimum(text.sizes, self.seq_length + 1) - 1
            if len(ref.sizes) < n or np.any(ref.sizes[:n] < needed):
                raise DataError(f"{where}: {ref.prefix} ({key}) does not hold a reference log-prob for every label "
                                f"position of {text.prefix} at seq_length {self.seq_length}; write it from that data "
                                "with `deepy generate` (text_gen_type: precompute) at this seq_length")

    def __len__(self) -> int:
        return len(self.order)

    def _read(self, key: str, document: int, fill: float, dtype: Any) -> np.ndarray:
        source = self.sources[key]
        width = self.seq_length + 1
        values = source.get(document, 0, min(int(source.sizes[document]), width))
        out = np.full(width, fill, dtype=dtype)
        out[: len(values)] = values
        return out

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for pairwise dataset {self.name!r} of {len(self)} pairs")
        document = int(self.order[index])
        item: dict[str, np.ndarray] = {}
        for side in SIDES:
            item[side] = self._read(side, document, PAD_TOKEN, np.int64)
            if self.sources[f"{side}_label"] is not None:
                item[f"{side}_label"] = self._read(f"{side}_label", document, PAD_LABEL, np.int64)
            else:
                label = item[side].copy()
                label[int(self.sources[side].sizes[document]):] = PAD_LABEL
                item[f"{side}_label"] = label
            if self.sources[f"{side}_ref"] is not None:
                item[f"{side}_ref"] = self._read(f"{side}_ref", document, 0.0, np.float32)
        return item

    # DataLoader workers started by spawn re-map the cached order instead of receiving a copy.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["order"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.order = np.load(index_cache.array_path(self.cache_dir, self.cache_stem, "order"), mmap_mode="r")

    def __repr__(self) -> str:
        return (f"PairwiseDataset({self.name!r}, {self.sources['pos'].prefix} / {self.sources['neg'].prefix}, "
                f"pairs={len(self)}, seq_length={self.seq_length}, seed={self.seed})")
