"""Concatenate mmap indexed datasets (.bin/.idx pairs) into one, keeping document boundaries.

    python tools/merge_datasets.py --input data/shards --output-prefix data/merged_text_document
    python tools/merge_datasets.py --input data/a_text_document data/b_text_document --output-prefix data/ab

A directory contributes every pair in it, in name order (as Megatron's merge tool does); other
inputs are dataset prefixes, merged in the order given. Nothing is written under the output prefix
until the merge has succeeded.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from neox.data.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter


class MergeError(ValueError):
    """The inputs cannot be merged as asked."""


@dataclass(frozen=True)
class MergeSummary:
    inputs: list[Path]
    dtype: str
    num_documents: int
    num_sequences: int
    num_tokens: int


def _strip_extension(path: Path) -> Path:
    return path.with_suffix("") if path.suffix in (".bin", ".idx") else path


def prefixes_in_directory(directory: Path) -> list[Path]:
    """Every ``X.bin``/``X.idx`` pair in ``directory``, sorted by name; a lone half is an error."""
    halves: dict[str, set[str]] = {}
    for entry in directory.iterdir():
        if entry.suffix in (".bin", ".idx") and entry.is_file():
            halves.setdefault(entry.stem, set()).add(entry.suffix)
    for stem, suffixes in sorted(halves.items()):
        if len(suffixes) == 1:
            (present,) = suffixes
            missing = ".idx" if present == ".bin" else ".bin"
            raise MergeError(f"{directory / (stem + present)} has no matching {stem}{missing}")
    if not halves:
        raise MergeError(f"no .bin/.idx pairs found in directory {directory}")
    return [directory / stem for stem in sorted(halves)]


def resolve_inputs(inputs: Sequence[str]) -> list[Path]:
    prefixes: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            prefixes.extend(prefixes_in_directory(path))
            continue
        prefix = _strip_extension(path)
        if not IndexedDataset.exists(prefix):
            raise MergeError(
                f"{raw} is neither a directory nor a dataset prefix ({prefix}.bin and {prefix}.idx must both exist)"
            )
        prefixes.append(prefix)
    return prefixes


def merge_datasets(inputs: Sequence[Path], output_prefix: Path) -> MergeSummary:
    """Append ``inputs`` in order into ``output_prefix``; all must share one token dtype."""
    output_resolved = output_prefix.resolve()
    if any(prefix.resolve() == output_resolved for prefix in inputs):
        raise MergeError(f"the output prefix {output_prefix} is also an input; choose another --output-prefix")
    dtypes: dict[Path, str] = {}
    for prefix in inputs:
        with IndexedDataset(prefix) as dataset:  # validates every input before writing anything
            dtypes[prefix] = str(dataset.dtype)
    if len(set(dtypes.values())) > 1:
        listing = "; ".join(f"{prefix}: {dtype}" for prefix, dtype in dtypes.items())
        raise MergeError(
            f"input datasets have different token dtypes ({listing}); re-tokenize them with the same "
            f"tokenizer so they share one dtype"
        )
    dtype = dtypes[inputs[0]]
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        for prefix in inputs:
            writer.append_dataset(prefix)
    return MergeSummary(
        inputs=list(inputs),
        dtype=dtype,
        num_documents=writer.num_documents,
        num_sequences=writer.num_sequences,
        num_tokens=writer.num_tokens,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group(title="input data")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="a directory holding the .bin/.idx pairs to merge (in name order), or dataset prefixes "
        "(merged in the order given)",
    )
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", required=True, help="path of the merged dataset without .bin/.idx")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        inputs = resolve_inputs(args.input)
        summary = merge_datasets(inputs, Path(args.output_prefix))
    except (MergeError, IndexedDatasetError, OSError) as err:
        print(f"merge_datasets: error: {err}", file=sys.stderr)
        return 2
    print(
        f"merged {len(summary.inputs)} datasets ({summary.dtype}): {summary.num_documents} documents, "
        f"{summary.num_sequences} sequences, {summary.num_tokens} tokens -> "
        f"{os.fspath(args.output_prefix)}.bin/.idx"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
