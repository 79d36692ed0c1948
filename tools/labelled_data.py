"""The shared pipeline of tools/preprocess_data_with_chat_template.py and tools/preprocess_data_with_mask.py.

Records come from neox.data.sources (JSON lines, parquet, Hugging Face datasets); an encoder turns each into, per
output key, a document of tokens, its labels (the tokens, -100 where the loss is off) and maybe a reward. The main
thread reads and writes in input order; --workers threads or processes encode batches in between. Each output is an
mmap .bin/.idx pair written through IndexedDatasetWriter (temporary files, renamed into place at the end), named as
gpt-neox's tools name them: {prefix}_{key}_document, {prefix}_{key}_label_document, {prefix}_{key}_reward_document.
Tokens and labels are int32 (labels need the sign), as gpt-neox writes them; rewards int32 too (gpt-neox's reward
layout: one value per document).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from neox.data.indexed import IndexedDatasetWriter
from neox.data.sources import InputError, ReadStats, expand_inputs, iter_records
from tools.preprocess_data import Progress, output_prefix_for, print_skipped, resolve_worker_kind, run_guarded

LABEL_MASK = -100
DTYPE = np.dtype(np.int32)


@dataclass
class Document:
    """One output key's document: its tokens, their labels (None: no label dataset) and its reward (or None)."""

    tokens: list[int]
    labels: list[int] | None = None
    reward: int | None = None


@dataclass
class Output:
    """The dataset prefixes of one output key (None where that kind is not written)."""

    tokens: str
    labels: str | None = None
    reward: str | None = None

    def prefixes(self) -> list[str]:
        return [p for p in (self.tokens, self.labels, self.reward) if p is not None]


def outputs_for(prefix: str, keys: Sequence[str], rewards: bool) -> dict[str, Output]:
    """gpt-neox's names: {prefix}_{key}_document, ..._{key}_label_document, ..._{key}_reward_document."""
    return {key: Output(output_prefix_for(prefix, key), output_prefix_for(prefix, f"{key}_label"),
                        output_prefix_for(prefix, f"{key}_reward") if rewards else None) for key in keys}


@dataclass
class Totals:
    outputs: dict[str, Output]
    stats: ReadStats
    documents: int = 0
    tokens: int = 0
    trained: int = 0  # labels >= 0
    seconds: float = 0.0
    first: dict[str, Document] = field(default_factory=dict)  # the first record's documents, shown to the user

    def summary(self) -> str:
        written = ", ".join(p for out in self.outputs.values() for p in out.prefixes())
        share = f" ({self.trained / self.tokens:.1%} of the tokens)" if self.tokens else ""
        return (f"done: {self.documents} records -> {written}; {self.tokens} tokens, {self.trained} with a trained "
                f"label{share}; {self.stats.bad_lines_skipped} bad lines skipped, {self.seconds:.2f} s")


Encoder = Callable[[tuple], dict[str, Document]]


class LazyTokenizer:
    """Base of the tools' encoders: picklable, the tokenizer is built in each worker on first use, never shipped."""

    _tokenizer: Any = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    def build_tokenizer(self) -> Any:
        raise NotImplementedError

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.build_tokenizer()
        return self._tokenizer
_installed: Encoder | None = None


def _install(encoder: Encoder) -> None:
    global _installed
    _installed = encoder


def _encode_installed(batch: list[tuple]) -> list[dict[str, Document]]:
    assert _installed is not None, "worker initializer did not run"
    return [_installed(record) for record in batch]


def _executor(encoder: Encoder, workers: int, worker_kind: str) -> tuple[Executor, Callable]:
    if resolve_worker_kind(worker_kind, workers) == "process":
        import multiprocessing

        # The encoder travels once per process (it builds its tokenizer there on first use), not once per batch.
        return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_install, initargs=(encoder,)), _encode_installed
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="encode"), \
        lambda batch: [encoder(record) for record in batch]


def _batches(records: Iterable[tuple], size: int) -> Iterator[list[tuple]]:
    batch: list[tuple] = []
    for record in records:
        batch.append(record)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_labelled(records: Iterable[tuple], encoder: Encoder, outputs: dict[str, Output], stats: ReadStats, *,
                   workers: int = 1, worker_kind: str = "auto", batch_size: int = 64, num_docs: int | None = None,
                   log_interval: int = 100) -> Totals:
    """Encode every record and write its documents in input order; nothing appears under the output names unless
    every record was written."""
    started = time.perf_counter()
    totals = Totals(outputs, stats)
    with ExitStack() as stack:
        writers: dict[str, dict[str, IndexedDatasetWriter]] = {
            key: {kind: stack.enter_context(IndexedDatasetWriter(prefix, DTYPE))
                  for kind, prefix in (("tokens", out.tokens), ("labels", out.labels), ("reward", out.reward))
                  if prefix is not None}
            for key, out in outputs.items()}
        executor, work = _executor(encoder, workers, worker_kind)
        stack.callback(executor.shutdown, wait=True, cancel_futures=True)  # drop queued batches on the way out
        progress = Progress(num_docs, log_interval, stats)
        stack.callback(progress.close)
        in_flight: deque[Future] = deque()

        def write_oldest() -> None:
            encoded = in_flight.popleft().result()
            tokens = 0
            for documents in encoded:
                totals.first = totals.first or documents
                for key, document in documents.items():
                    _write(writers[key], document)
                    tokens += len(document.tokens)
                    labels = document.labels if document.labels is not None else document.tokens
                    totals.trained += sum(1 for label in labels if label >= 0)
            totals.documents += len(encoded)
            totals.tokens += tokens
            progress.update(len(encoded), tokens)

        for batch in _batches(records, batch_size):
            in_flight.append(executor.submit(work, batch))
            if len(in_flight) >= 2 * workers + 1:
                write_oldest()
        while in_flight:
            write_oldest()
        for key_writers in writers.values():
            for writer in key_writers.values():
                writer.finalize()
    totals.seconds = time.perf_counter() - started
    return totals


def _write(writers: dict[str, IndexedDatasetWriter], document: Document) -> None:
    writers["tokens"].add_document(np.asarray(document.tokens, dtype=DTYPE))
    if "labels" in writers:
        writers["labels"].add_document(np.asarray(document.labels, dtype=DTYPE))
    if "reward" in writers:
        writers["reward"].add_document(np.asarray([document.reward], dtype=DTYPE))


def show_first(totals: Totals, describe: Callable[[list[int]], Any]) -> None:
    """Print the first record's documents (tokens, then the text the labels train), as gpt-neox's tools do."""
    for key, document in totals.first.items():
        trained = [t for t, label in zip(document.tokens, document.labels or document.tokens) if label >= 0]
        reward = "" if document.reward is None else f", reward {document.reward}"
        print(f"first record, {key}: {len(document.tokens)} tokens, {len(trained)} trained{reward}; trained text: "
              f"{describe(trained)!r}")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags both tools share with gpt-neox's: input bookkeeping, output format and workers."""
    group = parser.add_argument_group("common")
    group.add_argument("--num-docs", type=int, default=None, help="number of records, for the progress bar")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="skip (and count) malformed records instead of stopping at the first one")
    group.add_argument("--ftfy", action="store_true", help="fix broken unicode with ftfy before tokenizing")
    group.add_argument("--dataset-impl", choices=["mmap"], default="mmap",
                       help="dataset format; only gpt-neox's default 'mmap' is written")
    group.add_argument("--workers", type=int, default=1, help="encoding workers (default: 1)")
    group.add_argument("--worker-kind", choices=["auto", "thread", "process"], default="auto",
                       help="threads or processes (auto: a thread for 1 worker, processes for more)")
    group.add_argument("--log-interval", type=int, default=100, help="records between progress-rate updates")


def check_common_args(args: argparse.Namespace) -> None:
    for name in ("workers", "log_interval"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def encode_inputs(args: argparse.Namespace, keys: list[str], encoder: Encoder, outputs: dict[str, Output],
                  tokenizer_line: str, describe: Callable[[list[int]], Any], structured: bool = False) -> Totals:
    """Read --input's records (the values under `keys`), encode and write them, then show the first record."""
    inputs = expand_inputs(args.input)
    written = ", ".join(p for out in outputs.values() for p in out.prefixes())
    print(f"{tokenizer_line}; {len(inputs)} input(s) -> {written}", file=sys.stderr)
    stats = ReadStats()
    records = iter_records(inputs, keys, skip_bad_lines=args.skip_bad_lines, stats=stats, structured=structured)
    totals = write_labelled(records, encoder, outputs, stats, workers=args.workers, worker_kind=args.worker_kind,
                            num_docs=args.num_docs, log_interval=args.log_interval)
    show_first(totals, describe)
    return totals


def run_tool(run: Callable[[Any], Totals], args: Any) -> int:
    """A tool's main: run with the preprocessing tools' exit codes, then the skipped lines and the summary."""
    code, totals = run_guarded(run, args)
    if code:
        return code
    print_skipped(totals.stats)
    print(totals.summary())
    return 0
