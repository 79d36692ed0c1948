"""Streaming readers for raw text corpora: JSON lines (plain, zstd, gzip), text, parquet, HF datasets dirs.

Every reader yields documents one at a time and never holds the corpus in memory. Problems are raised
as InputError naming the file (and line or row) so a user can find and fix the offending record.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Sequence

__all__ = [
    "InputError",
    "ReadStats",
    "SUPPORTED_SUFFIXES",
    "TXT_MODES",
    "expand_inputs",
    "iter_records",
    "iter_texts",
    "is_hf_dataset_dir",
]

# Longest suffixes first: ".jsonl.zst" must win over a bare ".zst"-style match.
JSONL_SUFFIXES = (".jsonl.zst", ".jsonl.gz", ".json.gz", ".jsonl")
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + (".txt", ".parquet")
TXT_MODES = ("file", "paragraph")

_READ_BUFFER = 1 << 20
_PARQUET_BATCH_ROWS = 1024
_MAX_REPORTED_BAD_LINES = 5


class InputError(ValueError):
    """An input file is missing, unreadable, of an unsupported kind, or holds a bad record."""


@dataclass
class ReadStats:
    """Counters filled in while iterating; pass one to iter_texts/iter_records to read them afterwards."""

    files: int = 0                  # files (or dataset dirs) opened so far
    documents: int = 0              # records yielded
    empty_skipped: int = 0          # records whose text was empty (whitespace-only text is kept, as gpt-neox does)
    bad_lines_skipped: int = 0      # malformed records skipped under skip_bad_lines
    bytes_read: int = 0             # uncompressed bytes consumed (parquet / HF datasets: characters)
    bad_line_examples: list[str] = field(default_factory=list)  # first few "FILE:LINE: why" messages

    def note_bad_line(self, message: str) -> None:
        self.bad_lines_skipped += 1
        if len(self.bad_line_examples) < _MAX_REPORTED_BAD_LINES:
            self.bad_line_examples.append(message)


def is_hf_dataset_dir(path: Path) -> bool:
    """True if `path` is a directory written by `datasets` save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def _suffix_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def _unsupported(path: Path) -> InputError:
    return InputError(
        f"{path}: unsupported input kind; expected one of {', '.join(SUPPORTED_SUFFIXES)} "
        "or a Hugging Face datasets directory written by save_to_disk"
    )


def _expand_one(path: Path, spec: str) -> list[Path]:
    if is_hf_dataset_dir(path):
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and _suffix_of(p) is not None)
        if not found:
            raise InputError(
                f"input spec {spec!r}: directory {path} holds no {'/'.join(SUPPORTED_SUFFIXES)} file "
                "and is not a Hugging Face datasets directory"
            )
        return found
    if not path.is_file():
        raise InputError(f"input spec {spec!r}: {path} does not exist")
    if _suffix_of(path) is None:
        raise _unsupported(path)
    return [path]


def expand_inputs(spec: str | Sequence[str]) -> list[Path]:
    """Resolve comma-separated paths, globs and directories into an ordered, de-duplicated file list.

    Order follows the spec, and glob matches are sorted, so the output order (and so the dataset) is
    reproducible. A piece matching nothing is an error rather than silently shrinking the corpus.
    """
    pieces = [spec] if isinstance(spec, str) else list(spec)
    parts = [p.strip() for piece in pieces for p in str(piece).split(",") if p.strip()]
    if not parts:
        raise InputError("no input given: pass one or more comma-separated files, globs or directories")
    resolved: list[Path] = []
    seen: set[Path] = set()
    for part in parts:
        expanded = os.path.expanduser(part)
        if glob.has_magic(expanded):
            matches = sorted(glob.glob(expanded, recursive=True))
            if not matches:
                raise InputError(f"input spec {part!r} matches no file")
            paths = [q for m in matches for q in _expand_one(Path(m), part)]
        else:
            paths = _expand_one(Path(expanded), part)
        for p in paths:
            if p not in seen:
                seen.add(p)
                resolved.append(p)
    return resolved


class TruncatedStream(EOFError):
    """A compressed stream ended inside a frame."""


def _zstd_lines(raw: IO[bytes]) -> Iterator[bytes]:
    """Lines of a (possibly multi-frame) zstd stream; a stream cut inside a frame raises TruncatedStream.

    zstandard's stream_reader stops silently at a truncated frame, which would turn a damaged file
    into a silently shorter corpus, so frames are followed here with decompressobj and its eof flag.
    """
    import zstandard  # only the zstd path pays for it

    dctx = zstandard.ZstdDecompressor()
    frame = dctx.decompressobj()
    inside_frame = False
    pending: list[bytes] = []  # the start of a line not ended yet (a list: a huge line costs no re-copying)
    while chunk := raw.read(_READ_BUFFER):
        pieces = []
        while chunk:
            pieces.append(frame.decompress(chunk))
            inside_frame = True
            if frame.eof:  # a frame ended: what follows is the next frame
                chunk, frame, inside_frame = frame.unused_data, dctx.decompressobj(), False
            else:
                chunk = b""
        data = b"".join(pieces)
        if b"\n" not in data:
            pending.append(data)
            continue
        lines = data.split(b"\n")
        if pending:
            lines[0] = b"".join(pending) + lines[0]
        pending = [lines.pop()]
        for line in lines:
            yield line + b"\n"
    if inside_frame:
        raise TruncatedStream("the last zstd frame is incomplete")
    if any(pending):
        yield b"".join(pending)


def _iter_lines(path: Path, suffix: str) -> Iterator[bytes]:
    if suffix == ".jsonl.zst":
        with open(path, "rb") as raw:
            yield from _zstd_lines(raw)
    elif suffix in (".jsonl.gz", ".json.gz"):
        with gzip.open(path, "rb") as lines:
            yield from lines
    else:
        with open(path, "rb", buffering=_READ_BUFFER) as lines:
            yield from lines


def _describe_keys(obj: dict) -> str:
    keys = list(obj)
    shown = ", ".join(repr(k) for k in keys[:20])
    return shown + (f", ... ({len(keys)} keys)" if len(keys) > 20 else "") if keys else "none"


def _parse_json_line(line: bytes, keys: Sequence[str], structured: bool = False) -> tuple | str:
    """The values of `keys` in one JSON line (strings, or with `structured` any JSON value), or a description of
    what is wrong with it."""
    try:
        obj = json.loads(line)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return f"malformed JSON line ({exc})"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    values = []
    for key in keys:
        if key not in obj:
            return f"key {key!r} not found; keys present: {_describe_keys(obj)}"
        value = obj[key]
        if not structured and not isinstance(value, str):
            return f"value of key {key!r} is {type(value).__name__}, expected a string"
        values.append(value)
    return tuple(values)


def _iter_jsonl(path: Path, suffix: str, keys: Sequence[str], skip_bad_lines: bool,
                stats: ReadStats, structured: bool = False) -> Iterator[tuple]:
    lineno = 0
    try:
        for lineno, line in enumerate(_iter_lines(path, suffix), start=1):
            stats.bytes_read += len(line)
            if line.isspace():
                continue
            parsed = _parse_json_line(line, keys, structured)
            if isinstance(parsed, tuple):
                yield parsed
                continue
            message = f"{path}:{lineno}: {parsed}"
            if not skip_bad_lines:
                raise InputError(message + " (fix the record, or skip such lines with --skip-bad-lines)")
            stats.note_bad_line(message)
    except EOFError as exc:  # a gzip or zstd stream cut short
        raise InputError(f"{path}: corrupt or truncated compressed stream after line {lineno}: {exc}") from exc
    except OSError as exc:  # gzip.BadGzipFile is one, as are plain I/O errors
        raise InputError(f"{path}: cannot read after line {lineno}: {exc}") from exc
    except Exception as exc:
        if type(exc).__name__ == "ZstdError":  # zstandard is imported lazily, so match by name
            raise InputError(f"{path}: corrupt zstd data after line {lineno}: {exc}") from exc
        raise


def _iter_txt(path: Path, keys: Sequence[str], txt_mode: str, stats: ReadStats) -> Iterator[tuple[str, ...]]:
    width = len(keys)
    try:
        if txt_mode == "file":
            data = path.read_bytes()
            stats.bytes_read += len(data)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}: not valid UTF-8 at byte {exc.start}") from exc
            yield (text,) * width
            return
        with open(path, "r", encoding="utf-8", buffering=_READ_BUFFER) as fh:
            block: list[str] = []
            lineno = 0
            try:
                for lineno, line in enumerate(fh, start=1):
                    stats.bytes_read += len(line)
                    if line.strip():
                        block.append(line)
                    elif block:
                        yield ("".join(block).rstrip("\n"),) * width
                        block = []
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}:{lineno + 1}: not valid UTF-8 ({exc.reason})") from exc
            if block:
                yield ("".join(block).rstrip("\n"),) * width
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc}") from exc


def _check_string_columns(path: Path, keys: Sequence[str], column_types: dict[str, str], kind: str,
                           structured: bool = False) -> None:
    for key in keys:
        if key not in column_types:
            present = ", ".join(repr(c) for c in column_types) or "none"
            raise InputError(f"{path}: {kind} has no column {key!r}; columns present: {present}")
        if not structured and column_types[key] not in ("string", "large_string", "string_view"):
            raise InputError(f"{path}: {kind} column {key!r} has type {column_types[key]}, expected strings")


def _rows_from_columns(path: Path, keys: Sequence[str], columns: list[list], first_row: int,
                       skip_bad_lines: bool, stats: ReadStats) -> Iterator[tuple[str, ...]]:
    for offset, values in enumerate(zip(*columns)):
        bad = next((k for k, v in zip(keys, values) if v is None), None)
        if bad is not None:
            message = f"{path}:{first_row + offset}: value of column {bad!r} is null"
            if not skip_bad_lines:
                raise InputError(message + " (fix the row, or skip such rows with --skip-bad-lines)")
            stats.note_bad_line(message)
            continue
        stats.bytes_read += sum(len(v) if isinstance(v, str) else 0 for v in values)
        yield values


def _iter_parquet(path: Path, keys: Sequence[str], skip_bad_lines: bool,
                  stats: ReadStats, structured: bool = False) -> Iterator[tuple]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: not a readable parquet file: {exc}") from exc
    with parquet:
        schema = parquet.schema_arrow
        _check_string_columns(path, keys, {f.name: str(f.type) for f in schema}, "parquet file", structured)
        row = 1  # 1-based, like a line number
        try:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=list(keys)):
                columns = [batch.column(k).to_pylist() for k in keys]
                yield from _rows_from_columns(path, keys, columns, row, skip_bad_lines, stats)
                row += batch.num_rows
        except pa.ArrowException as exc:
            raise InputError(f"{path}: cannot read parquet data near row {row}: {exc}") from exc


def _iter_hf_dataset(path: Path, keys: Sequence[str], skip_bad_lines: bool,
                     stats: ReadStats, structured: bool = False) -> Iterator[tuple]:
    import datasets  # slow to import: only when such an input is given

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several unrelated types for a damaged directory
        raise InputError(f"{path}: cannot load the Hugging Face dataset: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if len(splits) != 1:
            raise InputError(
                f"{path}: a DatasetDict with splits {splits}; pass one split's directory "
                f"(e.g. {path / splits[0]}) so that only the intended split is tokenized"
            )
        loaded = loaded[splits[0]]
    features = loaded.features
    column_types = {}
    for name, feature in features.items():
        column_types[name] = getattr(feature, "dtype", type(feature).__name__)
    _check_string_columns(path, keys, column_types, "dataset", structured)
    row = 1
    for batch in loaded.select_columns(list(keys)).iter(batch_size=_PARQUET_BATCH_ROWS):
        columns = [batch[k] for k in keys]
        yield from _rows_from_columns(path, keys, columns, row, skip_bad_lines, stats)
        row += len(columns[0])


def iter_records(paths: Sequence[str | Path], keys: Sequence[str] = ("text",), *, skip_bad_lines: bool = False,
                 txt_mode: str = "file", stats: ReadStats | None = None,
                 structured: bool = False) -> Iterator[tuple]:
    """Yield, for each document in order, a tuple holding the value of every key in `keys`.

    Values are strings, or with `structured` any JSON value (chat `messages` lists, rewards): then text files,
    which hold no records, are refused.

    Empty values are yielded as they are (a caller writing one output per key drops them per key);
    records in which every value is empty are skipped and counted. Whitespace-only text is a document,
    as in gpt-neox (lm_dataformat drops only empty texts), so outputs stay byte-identical to its.
    Text files have no keys: each of their documents fills every slot of the tuple.
    """
    if txt_mode not in TXT_MODES:
        raise InputError(f"txt_mode must be one of {TXT_MODES}, got {txt_mode!r}")
    keys = tuple(keys)
    if not keys:
        raise InputError("at least one key is needed")
    stats = stats if stats is not None else ReadStats()
    for raw_path in paths:
        path = Path(raw_path)
        if is_hf_dataset_dir(path):
            records = _iter_hf_dataset(path, keys, skip_bad_lines, stats, structured)
        else:
            suffix = _suffix_of(path)
            if suffix is None:
                raise _unsupported(path)
            if not path.is_file():
                raise InputError(f"{path}: input file does not exist")
            if suffix == ".txt" and structured:
                raise InputError(f"{path}: a text file holds no records with {list(keys)}; give JSON lines, parquet "
                                 "or a Hugging Face datasets directory")
            if suffix == ".txt":
                records = _iter_txt(path, keys, txt_mode, stats)
            elif suffix == ".parquet":
                records = _iter_parquet(path, keys, skip_bad_lines, stats, structured)
            else:
                records = _iter_jsonl(path, suffix, keys, skip_bad_lines, stats, structured)
        stats.files += 1
        yielded_before, skipped_before = stats.documents + stats.empty_skipped, stats.bad_lines_skipped
        examples_before = len(stats.bad_line_examples)
        for record in records:
            if all(not value for value in record):  # gpt-neox (lm_dataformat) drops only empty texts
                stats.empty_skipped += 1
                continue
            stats.documents += 1
            yield record
        skipped = stats.bad_lines_skipped - skipped_before
        if skipped and stats.documents + stats.empty_skipped == yielded_before:
            # Every record was bad: almost surely a wrong key or format, not a few damaged lines.
            first = (stats.bad_line_examples[examples_before]
                     if len(stats.bad_line_examples) > examples_before else "see the first skipped line")
            raise InputError(f"{path}: all {skipped} records were skipped as bad; first problem: {first}")


def iter_texts(paths: Sequence[str | Path], key: str = "text", *, skip_bad_lines: bool = False,
               txt_mode: str = "file", stats: ReadStats | None = None) -> Iterator[str]:
    """Yield the non-empty text under `key` of every document, in file order."""
    for (text,) in iter_records(paths, (key,), skip_bad_lines=skip_bad_lines, txt_mode=txt_mode, stats=stats):
        yield text
