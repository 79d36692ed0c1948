"""Tokenize raw text corpora into .bin/.idx datasets (command-line compatible with gpt-neox's tool).

    python tools/preprocess_data.py --input data/corpora/kjv.jsonl.zst --output-prefix out/kjv \\
        --tokenizer-type HFTokenizer --vocab-file data/tokenizers/neox-20b/tokenizer.json --append-eod

One output pair per --jsonl-keys entry: {output_prefix}_{key}_document.bin/.idx, one item per document
(its tokens, then eod with --append-eod). The main thread streams, decompresses and parses the input
into batches; --workers threads (or processes) tokenize them; the main thread writes the results in
input order, so the output does not depend on the worker count.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from neox.data.indexed import IndexedDatasetError, IndexedDatasetWriter, best_dtype
from neox.data.sources import TXT_MODES, InputError, ReadStats, expand_inputs, iter_records
from neox.tokenizer import TOKENIZER_TYPES, Tokenizer, TokenizerError, build_tokenizer

# Text per batch is capped as well as documents, so a few huge documents cannot blow up memory.
_BATCH_TEXT_CHARS = 4 << 20
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class Terminated(Exception):
    """Raised in the main thread on SIGTERM so that the writers clean up their temporary files."""


# ---------------------------------------------------------------------------------------------
# arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize jsonl/jsonl.zst/json(l).gz/txt/parquet files or Hugging Face datasets "
        "directories into mmap .bin/.idx datasets for training.",
    )
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True,
                       help="comma-separated input files, globs, directories or HF datasets directories")
    group.add_argument("--jsonl-keys", nargs="+", default=["text"],
                       help="keys (columns) to tokenize; one output dataset per key (default: text)")
    group.add_argument("--num-docs", type=int, default=None,
                       help="number of documents in the input, if known, for an accurate progress bar")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="skip (and count) malformed records instead of stopping at the first one")
    group.add_argument("--txt-mode", choices=TXT_MODES, default="file",
                       help=".txt inputs: 'file' = one document per file (default), "
                       "'paragraph' = one document per blank-line-separated block")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--vocab-file", default=None,
                       help="vocabulary: vocab.json (GPT-2), tokenizer.json (HF), model file (SPM, tiktoken)")
    group.add_argument("--merge-file", default=None, help="BPE merges file (GPT-2 tokenizers)")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    group.add_argument("--ftfy", action="store_true", help="fix broken unicode with ftfy before tokenizing")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="output path prefix; writes {prefix}_{key}_document.bin/.idx")
    group.add_argument("--dataset-impl", choices=["mmap"], default="mmap",
                       help="dataset format; only gpt-neox's default 'mmap' is written")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer workers (default: 1)")
    group.add_argument("--worker-kind", choices=["auto", "thread", "process"], default="auto",
                       help="run workers as threads or processes; auto (default): a thread for 1 worker "
                       "(no start-up cost), processes for more (building token lists holds the GIL)")
    group.add_argument("--batch-size", type=int, default=128,
                       help="documents per tokenizer batch (default: 128; batches also stop at 4 MiB of text)")
    group.add_argument("--log-interval", type=int, default=100,
                       help="documents between progress-rate updates (default: 100)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for name in ("workers", "batch_size", "log_interval"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_docs is not None and args.num_docs < 0:
        raise InputError(f"--num-docs must be >= 0, got {args.num_docs}")
    if len(set(args.jsonl_keys)) != len(args.jsonl_keys):
        raise InputError(f"--jsonl-keys lists a key twice: {args.jsonl_keys}")


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


# ---------------------------------------------------------------------------------------------
# encoding (runs in worker threads or processes)


@dataclass
class EncodedColumn:
    """The documents of one key in one batch: their tokens back to back and each one's length."""

    flat: np.ndarray
    lengths: np.ndarray  # documents that were blank or produced no token are left out


class BatchEncoder:
    """Turns a batch of per-key text lists into flat token arrays in the output dtype."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype, append_eod: bool, ftfy: bool) -> None:
        self.tokenizer = tokenizer
        self.dtype = np.dtype(dtype)
        self.eod = tokenizer.eod if append_eod else None
        self.limit = np.iinfo(self.dtype).max
        self.fix_text = None
        if ftfy:
            import ftfy as ftfy_module

            self.fix_text = ftfy_module.fix_text
        # Tokenizers may offer encode_numpy(text) -> 1-D int array: it skips building Python int
        # lists, the one part of encoding that holds the GIL, so threads then scale.
        self.encode_numpy = getattr(tokenizer, "encode_numpy", None)

    def __call__(self, columns: Sequence[Sequence[str]]) -> list[EncodedColumn]:
        return [self.encode_column(texts) for texts in columns]

    def encode_column(self, texts: Sequence[str]) -> EncodedColumn:
        if self.fix_text is not None:
            texts = [self.fix_text(t) for t in texts]
        texts = [t for t in texts if t]
        if self.encode_numpy is not None:
            return self._from_arrays([self.encode_numpy(t) for t in texts])
        return self._from_lists(self.tokenizer.encode_batch(texts, num_threads=1))

    def _from_lists(self, documents: list[list[int]]) -> EncodedColumn:
        documents = [ids for ids in documents if ids]
        eod = (self.eod,) if self.eod is not None else ()
        lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents)) + len(eod)
        # One pass from Python ints straight into the output dtype; the tokenizer's lists stay untouched.
        tokens = chain.from_iterable(part for ids in documents for part in (ids, eod))
        try:
            flat = np.fromiter(tokens, dtype=self.dtype, count=int(lengths.sum()))
        except OverflowError as err:
            raise self._out_of_range(err) from err
        return EncodedColumn(flat, lengths)

    def _from_arrays(self, documents: list[np.ndarray]) -> EncodedColumn:
        documents = [ids for ids in documents if ids.size]
        lengths = np.fromiter((ids.size for ids in documents), dtype=np.int64, count=len(documents))
        if not documents:
            return EncodedColumn(np.empty(0, self.dtype), lengths)
        if self.eod is not None:
            eod = np.array([self.eod], dtype=documents[0].dtype)
            documents = [part for ids in documents for part in (ids, eod)]
            lengths += 1
        flat = np.concatenate(documents)
        if int(flat.max()) > self.limit or int(flat.min()) < 0:
            raise self._out_of_range(f"ids span {int(flat.min())}..{int(flat.max())}")
        return EncodedColumn(flat.astype(self.dtype, copy=False), lengths)

    def _out_of_range(self, detail: object) -> TokenizerError:
        return TokenizerError(
            f"{self.tokenizer.name} produced a token id that does not fit the output dtype {self.dtype} "
            f"(vocab_size {self.tokenizer.vocab_size}; {detail}): the tokenizer's vocab_size is wrong"
        )


_process_encoder: BatchEncoder | None = None


def _init_process_worker(tokenizer_type: str, vocab_file: str | None, merge_file: str | None,
                         dtype: str, append_eod: bool, ftfy: bool) -> None:
    global _process_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and shuts us down
    tokenizer = build_tokenizer(tokenizer_type, vocab_file, merge_file)
    _process_encoder = BatchEncoder(tokenizer, np.dtype(dtype), append_eod, ftfy)


def _encode_in_process(columns: Sequence[Sequence[str]]) -> list[EncodedColumn]:
    assert _process_encoder is not None, "worker initializer did not run"
    return _process_encoder(columns)


# ---------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class RunTotals:
    inputs: list[Path]
    outputs: list[str]               # one prefix per key
    stats: ReadStats
    documents: list[int]             # per key
    tokens: list[int]                # per key
    dropped: list[int]               # per key: blank values, or documents with no token
    batches: int = 0
    seconds: float = 0.0


def batched_columns(records: Iterable[tuple[str, ...]], width: int, batch_docs: int) -> Iterator[list[list[str]]]:
    """Group records into batches, transposed to one text list per key."""
    columns: list[list[str]] = [[] for _ in range(width)]
    chars = 0
    for record in records:
        for column, value in zip(columns, record):
            column.append(value)
        chars += len(record[0])
        if len(columns[0]) >= batch_docs or chars >= _BATCH_TEXT_CHARS:
            yield columns
            columns = [[] for _ in range(width)]
            chars = 0
    if columns[0]:
        yield columns


class Progress:
    """A tqdm bar on stderr with documents/s, tokens/s and MB/s (MB of uncompressed input)."""

    def __init__(self, total: int | None, log_interval: int, stats: ReadStats) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="doc", file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 5.0)
        self.log_interval = log_interval
        self.stats = stats
        self.start = time.perf_counter()
        self.documents = 0
        self.tokens = 0
        self.last_postfix_at = 0

    def update(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        if self.documents - self.last_postfix_at >= self.log_interval:
            self.last_postfix_at = self.documents
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(
                f"{self.tokens / elapsed / 1e3:,.0f}k tok/s, {self.stats.bytes_read / elapsed / 1e6:.1f} MB/s",
                refresh=False,
            )
        self.bar.update(documents)

    def close(self) -> None:
        self.bar.close()


def resolve_worker_kind(worker_kind: str, workers: int) -> str:
    """Measured on the bench corpus (2 cores, GPT-2): 1 worker, a thread 3.3-3.5 s vs a process
    3.7-4.1 s; 2 workers, threads 3.4-3.6 s (the GIL serialises list building) vs processes 2.4 s."""
    if worker_kind != "auto":
        return worker_kind
    return "thread" if workers == 1 else "process"


def make_executor(args: argparse.Namespace, encoder: BatchEncoder, dtype: np.dtype) -> tuple[Executor, object]:
    if resolve_worker_kind(args.worker_kind, args.workers) == "process":
        import multiprocessing

        executor = ProcessPoolExecutor(
            max_workers=args.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_process_worker,
            initargs=(args.tokenizer_type, args.vocab_file, args.merge_file, dtype.str, args.append_eod, args.ftfy),
        )
        return executor, _encode_in_process
    return ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="tokenize"), encoder


def run(args: argparse.Namespace) -> RunTotals:
    started = time.perf_counter()
    check_args(args)
    inputs = expand_inputs(args.input)
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
    dtype = best_dtype(tokenizer.vocab_size)
    keys = list(args.jsonl_keys)
    prefixes = [output_prefix_for(args.output_prefix, key) for key in keys]
    print(f"tokenizer {tokenizer.name}: vocab size {tokenizer.vocab_size}, tokens stored as {dtype}; "
          f"{len(inputs)} input(s) -> {', '.join(p + '.{bin,idx}' for p in prefixes)}", file=sys.stderr)

    stats = ReadStats()
    zeros = [0] * len(keys)
    totals = RunTotals(inputs, prefixes, stats, list(zeros), list(zeros), list(zeros))
    encoder = BatchEncoder(tokenizer, dtype, args.append_eod, args.ftfy)
    records = iter_records(inputs, keys, skip_bad_lines=args.skip_bad_lines, txt_mode=args.txt_mode, stats=stats)
    max_in_flight = 2 * args.workers + 1

    with ExitStack() as stack:
        writers = [stack.enter_context(IndexedDatasetWriter(p, dtype)) for p in prefixes]
        executor, work = make_executor(args, encoder, dtype)
        # On the way out (error or Ctrl-C) drop queued batches rather than tokenizing them.
        stack.callback(executor.shutdown, wait=True, cancel_futures=True)
        progress = Progress(args.num_docs, args.log_interval, stats)
        stack.callback(progress.close)

        in_flight: deque[tuple[int, Future]] = deque()

        def write_oldest() -> None:
            batch_size, future = in_flight.popleft()
            encoded = future.result()
            for i, (writer, column) in enumerate(zip(writers, encoded)):
                writer.add_documents(column.flat, column.lengths)
                totals.documents[i] += column.lengths.size
                totals.tokens[i] += column.flat.size
                totals.dropped[i] += batch_size - column.lengths.size
            progress.update(batch_size, encoded[0].flat.size)

        for columns in batched_columns(records, len(keys), args.batch_size):
            in_flight.append((len(columns[0]), executor.submit(work, columns)))
            totals.batches += 1
            if len(in_flight) >= max_in_flight:
                write_oldest()
        while in_flight:
            write_oldest()
        for writer in writers:
            writer.finalize()
    totals.seconds = time.perf_counter() - started
    return totals


def _size_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def summary_line(totals: RunTotals) -> str:
    stats = totals.stats
    bytes_in = sum(_size_on_disk(p) for p in totals.inputs)
    bytes_out = sum(os.path.getsize(p + ext) for p in totals.outputs for ext in (".bin", ".idx"))
    tokens = sum(totals.tokens)
    per_key = "" if len(totals.outputs) == 1 else " (" + ", ".join(
        f"{Path(p).name}: {d} docs, {t} tokens" for p, d, t in zip(totals.outputs, totals.documents, totals.tokens)
    ) + ")"
    return (
        f"done: {max(totals.documents)} documents, {tokens} tokens{per_key}, "
        f"{bytes_in / 1e6:.1f} MB in ({stats.bytes_read / 1e6:.1f} MB uncompressed), {bytes_out / 1e6:.1f} MB out, "
        f"{stats.bad_lines_skipped} bad lines skipped, {stats.empty_skipped + max(totals.dropped)} empty documents "
        f"dropped, {totals.seconds:.2f} s, {tokens / max(totals.seconds, 1e-9):,.0f} tokens/s"
    )


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def run_guarded(run_fn, args: argparse.Namespace) -> tuple[int, object]:
    """(exit code, run_fn(args)): bad input exits 2 with one line, Ctrl-C/SIGTERM 130 (the writers have removed their
    temporary files), I/O failures and dead workers 1. Shared by the preprocessing tools."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return 0, run_fn(args)
    except (InputError, TokenizerError, IndexedDatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT, None
    except (KeyboardInterrupt, Terminated):
        print("interrupted: no output written (temporary files removed)", file=sys.stderr)
        return EXIT_INTERRUPTED, None
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILURE, None
    except BrokenExecutor as err:
        print(f"error: a tokenizer worker died ({err}); no output written. Out of memory? Try fewer "
              "--workers or a smaller --batch-size", file=sys.stderr)
        return EXIT_FAILURE, None
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_skipped(stats: ReadStats) -> None:
    for example in stats.bad_line_examples:
        print(f"skipped: {example}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code, totals = run_guarded(run, args)
    if code:
        return code
    print_skipped(totals.stats)
    print(summary_line(totals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
