"""Summarise an mmap indexed dataset and decode samples from it.

    python tools/inspect_dataset.py --prefix data/enwik8_text_document
    python tools/inspect_dataset.py --prefix data/enwik8_text_document --document 3 \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt
    python tools/inspect_dataset.py --prefix data/enwik8_text_document --json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from neox.data.indexed import IndexedDataset, IndexedDatasetError

_BAR_WIDTH = 40


class InspectError(ValueError):
    """The request cannot be answered (bad index, missing tokenizer arguments...)."""


@dataclass(frozen=True)
class LengthStats:
    min: int | None
    mean: float | None
    max: int | None

    @classmethod
    def of(cls, lengths: np.ndarray) -> "LengthStats":
        if lengths.size == 0:
            return cls(None, None, None)
        return cls(int(lengths.min()), float(lengths.mean()), int(lengths.max()))


@dataclass(frozen=True)
class Bucket:
    low: int  # inclusive
    high: int  # exclusive
    count: int


@dataclass(frozen=True)
class Sample:
    kind: str  # "sequence" or "document"
    index: int
    num_tokens: int
    tokens: list[int]
    text: str | None


@dataclass
class Summary:
    prefix: str
    dtype: str
    num_documents: int
    num_sequences: int
    num_tokens: int
    bin_bytes: int
    idx_bytes: int
    document_length: LengthStats
    sequence_length: LengthStats
    document_length_histogram: list[Bucket]
    samples: list[Sample] = field(default_factory=list)


def document_lengths(dataset: IndexedDataset) -> np.ndarray:
    """Tokens per document: the sizes of its sequences ``doc_idx[j] : doc_idx[j+1]`` summed."""
    cumulative = np.zeros(len(dataset.sizes) + 1, dtype=np.int64)
    np.cumsum(dataset.sizes, dtype=np.int64, out=cumulative[1:])
    doc_idx = np.asarray(dataset.doc_idx, dtype=np.int64)
    return cumulative[doc_idx[1:]] - cumulative[doc_idx[:-1]]


def power_of_two_histogram(lengths: np.ndarray) -> list[Bucket]:
    """Counts in buckets [0,1), [1,2), [2,4), [4,8), ... up to the longest length."""
    if lengths.size == 0:
        return []
    top = int(lengths.max())
    edges = [0, 1]
    while edges[-1] <= top:
        edges.append(edges[-1] * 2)
    counts, _ = np.histogram(lengths, bins=np.array(edges) - 0.5)
    return [Bucket(edges[k], edges[k + 1], int(counts[k])) for k in range(len(counts))]


def summarise(dataset: IndexedDataset) -> Summary:
    doc_lengths = document_lengths(dataset)
    return Summary(
        prefix=str(dataset.prefix),
        dtype=str(dataset.dtype),
        num_documents=dataset.num_documents,
        num_sequences=len(dataset),
        num_tokens=dataset.num_tokens,
        bin_bytes=dataset.data_path.stat().st_size,
        idx_bytes=dataset.index_path.stat().st_size,
        document_length=LengthStats.of(doc_lengths),
        sequence_length=LengthStats.of(np.asarray(dataset.sizes)),
        document_length_histogram=power_of_two_histogram(doc_lengths),
    )


def take_sample(dataset: IndexedDataset, kind: str, index: int, tokenizer: Any | None) -> Sample:
    try:
        tokens = dataset.get_document(index) if kind == "document" else dataset.get(index)
    except IndexError as err:
        count = dataset.num_documents if kind == "document" else len(dataset)
        flag = "--document" if kind == "document" else "--sample"
        raise InspectError(f"{flag} {index} is out of range: {dataset.prefix} has {count} {kind}s") from err
    ids = tokens.tolist()
    text = None
    if tokenizer is not None:
        try:
            text = tokenizer.decode(ids)
        except ValueError as err:  # TokenizerError: ids the tokenizer does not know
            raise InspectError(f"cannot decode {kind} {index} with {tokenizer.name}: {err}") from err
    return Sample(kind, index, len(ids), ids, text)


def load_tokenizer(args: argparse.Namespace) -> Any | None:
    if args.tokenizer_type is None:
        if args.vocab_file or args.merge_file:
            raise InspectError("--vocab-file/--merge-file need --tokenizer-type to say how to read them")
        return None
    from neox.tokenizer import build_tokenizer  # only needed for decoding

    try:
        return build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
    except ValueError as err:  # TokenizerError: unknown type, missing or malformed files
        raise InspectError(f"cannot build the {args.tokenizer_type} tokenizer: {err}") from err


def _format_stats(name: str, stats: LengthStats) -> str:
    if stats.min is None:
        return f"{name}: none"
    return f"{name}: min {stats.min}  mean {stats.mean:.1f}  max {stats.max}"


def format_text(summary: Summary) -> str:
    lines = [
        f"dataset    {summary.prefix}",
        f"dtype      {summary.dtype}",
        f"documents  {summary.num_documents:,}",
        f"sequences  {summary.num_sequences:,}",
        f"tokens     {summary.num_tokens:,}",
        f"files      .bin {summary.bin_bytes:,} bytes, .idx {summary.idx_bytes:,} bytes",
        _format_stats("document length (tokens)", summary.document_length),
        _format_stats("sequence length (tokens)", summary.sequence_length),
    ]
    if summary.document_length_histogram:
        lines.append("document length histogram:")
        peak = max(bucket.count for bucket in summary.document_length_histogram)
        for bucket in summary.document_length_histogram:
            label = f"{bucket.low}" if bucket.high == bucket.low + 1 else f"{bucket.low}-{bucket.high - 1}"
            bar = "#" * (round(_BAR_WIDTH * bucket.count / peak) if peak else 0)
            lines.append(f"  {label:>15} | {bucket.count:>10,} {bar}")
    for sample in summary.samples:
        lines.append(f"--- {sample.kind} {sample.index} ({sample.num_tokens} tokens) ---")
        lines.append(sample.text if sample.text is not None else " ".join(map(str, sample.tokens)))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", required=True, help="dataset path without .bin/.idx")
    parser.add_argument("--sample", type=int, action="append", default=[], metavar="I",
                        help="show sequence I (repeatable); decoded when a tokenizer is given")
    parser.add_argument("--document", type=int, action="append", default=[], metavar="I",
                        help="show document I (all its sequences; repeatable)")
    parser.add_argument("--tokenizer-type", help="tokenizer used to decode samples, e.g. GPT2BPETokenizer, HFTokenizer")
    parser.add_argument("--vocab-file", help="tokenizer vocabulary file (tokenizer.json for HFTokenizer)")
    parser.add_argument("--merge-file", help="BPE merges file (GPT2BPETokenizer)")
    parser.add_argument("--json", action="store_true", help="print a machine-readable JSON summary instead")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tokenizer = load_tokenizer(args)
        with IndexedDataset(args.prefix) as dataset:
            summary = summarise(dataset)
            summary.samples = [take_sample(dataset, "sequence", i, tokenizer) for i in args.sample]
            summary.samples += [take_sample(dataset, "document", i, tokenizer) for i in args.document]
    except (InspectError, IndexedDatasetError, OSError) as err:
        print(f"inspect_dataset: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(summary), indent=2) if args.json else format_text(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
