"""Train a byte-level BPE tokenizer (HF `tokenizers`) on a corpus and write its tokenizer.json.

The result is GPT-2 style (byte alphabet, GPT-2 split, no normalizer, so decode(encode(t)) == t)
with "<|endoftext|>" (eod) and "<|padding|>" (pad) as its first two ids, and loads with
build_tokenizer("HFTokenizer", path).

    python tools/train_tokenizer.py --input data/corpora/kjv.jsonl.zst --vocab-size 8000 --output runs/tok/
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from neox.data.sources import TXT_MODES, InputError, ReadStats, expand_inputs, iter_texts
from neox.tokenizer import TokenizerError, build_tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>")
BYTE_ALPHABET_SIZE = 256


class TrainTokenizerError(ValueError):
    """Bad flags or inputs for tokenizer training."""


@dataclass(frozen=True)
class TrainSummary:
    output: Path
    vocab_size: int
    documents: int
    characters: int
    seconds: float


def output_path(output: str) -> Path:
    """--output may name the file or a directory (existing, or written with a trailing slash)."""
    path = Path(output).expanduser()
    if path.is_dir() or output.endswith(("/", os.sep)):
        return path / "tokenizer.json"
    return path


def new_bpe_tokenizer() -> tokenizers.Tokenizer:
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(
    inputs: str,
    output: str,
    *,
    vocab_size: int,
    min_frequency: int = 2,
    jsonl_key: str = "text",
    txt_mode: str = "file",
    skip_bad_lines: bool = False,
) -> TrainSummary:
    if vocab_size <= BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS):
        raise TrainTokenizerError(
            f"--vocab-size {vocab_size} leaves no room for merges: it must exceed the "
            f"{BYTE_ALPHABET_SIZE} byte tokens plus {len(SPECIAL_TOKENS)} special tokens"
        )
    if min_frequency < 1:
        raise TrainTokenizerError(f"--min-frequency must be >= 1, got {min_frequency}")
    paths = expand_inputs(inputs)
    target = output_path(output)

    stats = ReadStats()
    characters = 0

    def texts() -> Iterator[str]:
        nonlocal characters
        for text in iter_texts(paths, jsonl_key, skip_bad_lines=skip_bad_lines, txt_mode=txt_mode, stats=stats):
            characters += len(text)
            yield text

    tokenizer = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    started = time.perf_counter()
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    if stats.documents == 0:
        raise TrainTokenizerError(f"no non-empty documents under key {jsonl_key!r} in {', '.join(map(str, paths))}")

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrainTokenizerError(f"cannot create the output directory '{target.parent}': {err}") from err
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tokenizer.save(str(temporary), pretty=False)
        trained = build_tokenizer("HFTokenizer", temporary)  # the output must load the way training runs load it
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return TrainSummary(
        output=target,
        vocab_size=trained.vocab_size,
        documents=stats.documents,
        characters=characters,
        seconds=time.perf_counter() - started,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="comma-separated files, globs or directories (jsonl, jsonl.zst, jsonl.gz, txt, parquet, HF dataset dirs)")
    parser.add_argument("--jsonl-key", default="text", help="JSON key (or column) holding the text (default: text)")
    parser.add_argument("--vocab-size", type=int, required=True, help="size of the trained vocabulary, special tokens included")
    parser.add_argument("--min-frequency", type=int, default=2, help="least count a pair needs to be merged (default: 2)")
    parser.add_argument("--output", required=True, help="tokenizer.json path, or a directory to write tokenizer.json into")
    parser.add_argument("--txt-mode", choices=TXT_MODES, default="file", help="how .txt inputs split into documents (default: file)")
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip malformed records instead of stopping")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = train_tokenizer(
            args.input,
            args.output,
            vocab_size=args.vocab_size,
            min_frequency=args.min_frequency,
            jsonl_key=args.jsonl_key,
            txt_mode=args.txt_mode,
            skip_bad_lines=args.skip_bad_lines,
        )
    except (InputError, TokenizerError, TrainTokenizerError) as err:
        print(f"train_tokenizer: error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {summary.output}: vocab {summary.vocab_size} trained on {summary.documents} documents "
        f"({summary.characters / 1e6:.1f} M characters) in {summary.seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
