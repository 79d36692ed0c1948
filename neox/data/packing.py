"""Sample indices for gpt-neox's `pack_impl: pack_until_overflow` and `unpacked` (``packed`` is gpt_dataset.py's).

Both keep GPTDataset's three arrays and its reading rule (sample i runs from sample_idx[i] to sample_idx[i + 1],
both ends inclusive), with every sample starting at offset 0 of a document:

- unpacked: sample i is document doc_idx[i] from its first token, plus the first token of doc_idx[i + 1];
- pack_until_overflow: whole documents are added to a sample while they fit in seq_length + 1 tokens; the document
  that would overflow starts the next sample. A sample holds its documents plus the first token of the next sample.

That one borrowed token is gpt-neox's: its index layout reads it, so the last token of a sample's last document is
trained to predict it, as in packed data. GPTDataset then cuts a longer sample to seq_length + 1 tokens (the rest of
the document is dropped: gpt-neox's "chopped") and pads a shorter one with token 0 and label -100.

Documents are eligible when non-empty, no longer than seq_length + 1 unless allow_chopped, and (with a label
dataset) have at least one label >= 0 among their first seq_length + 1 (gpt-neox skips all-masked ones). The
document order is a fresh permutation of the eligible documents per epoch, drawn from a frozen
np.random.RandomState stream, so asking for more samples appends epochs and keeps every earlier sample; samples are
served in that order (shuffle_idx is the identity: the documents are already shuffled).

Where gpt-neox differs, on purpose: it walks document positions 0..len(documents)-1 instead of the `documents` it is
given (a valid/test split of data_path would read the train documents), its unpacked order is the file order, its
unpacked path needs a label dataset, and its last pack_until_overflow sample holds a single document.
"""
from __future__ import annotations

import numpy as np

from neox.data.errors import DataError

__all__ = ["PACK_IMPLS", "eligible_documents", "build_document_samples"]

PACK_IMPLS = ("packed", "pack_until_overflow", "unpacked")


def eligible_documents(doc_sizes: np.ndarray, documents: np.ndarray, seq_length: int, allow_chopped: bool,
                       label_dataset=None) -> np.ndarray:
    """Boolean mask over ``documents``: the documents a sample may start with."""
    sizes = np.asarray(doc_sizes, dtype=np.int64)
    keep = sizes > 0
    if not allow_chopped:
        keep &= sizes <= seq_length + 1
    if label_dataset is not None:
        for k in np.flatnonzero(keep):
            head = label_dataset.get(int(documents[k]), 0, int(min(sizes[k], seq_length + 1)))
            keep[k] = bool((head >= 0).any())
    return keep


def build_document_samples(
    doc_sizes: np.ndarray, documents: np.ndarray, eligible: np.ndarray, num_samples: int, seq_length: int, seed: int,
    pack_impl: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(doc_idx, sample_idx, shuffle_idx, epochs) holding at least ``num_samples`` samples."""
    if pack_impl not in PACK_IMPLS[1:]:
        raise ValueError(f"build_document_samples builds {PACK_IMPLS[1:]}, not {pack_impl!r}")
    docs = np.asarray(documents, dtype=np.int64)[eligible]
    sizes = np.asarray(doc_sizes, dtype=np.int64)[eligible]
    if len(docs) == 0:
        raise DataError("no document can start a sample: every one is empty, longer than seq_length + 1 with "
                        "allow_chopped false, or has every label masked")
    rng = np.random.RandomState([seed, 0])
    wanted = max(int(num_samples), 1)
    if pack_impl == "unpacked":
        epochs = -(-wanted // len(docs))
        # One pass more than the samples cover supplies the token borrowed by the last sample.
        doc_idx = np.concatenate([docs[rng.permutation(len(docs))] for _ in range(epochs + 1)])
        total = epochs * len(docs)
        sample_idx = np.zeros((total + 1, 2), dtype=np.int64)
        sample_idx[:, 0] = np.arange(total + 1)
        return doc_idx, sample_idx, np.arange(total, dtype=np.int64), epochs
    limit = seq_length + 1
    starts: list[int] = []
    stream: list[int] = []
    running = 0
    epochs = 0
    # A Python loop over documents (gpt-neox's is one too): built once, then cached.
    while len(starts) <= wanted:
        order = rng.permutation(len(docs))
        epochs += 1
        for doc, size in zip(docs[order].tolist(), sizes[order].tolist()):
            if not starts or running + size > limit:
                starts.append(len(stream))
                running = size
                if len(starts) > wanted:  # the start of sample `wanted` ends the last sample
                    stream.append(doc)
                    break
            else:
                running += size
            stream.append(doc)
    sample_idx = np.zeros((len(starts), 2), dtype=np.int64)
    sample_idx[:, 0] = starts
    return np.asarray(stream, dtype=np.int64), sample_idx, np.arange(len(starts) - 1, dtype=np.int64), epochs
