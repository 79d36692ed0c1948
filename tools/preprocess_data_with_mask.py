"""Text with a loss mask -> token + label datasets (gpt-neox's tool of the same name, plus prompt/completion pairs).

Prompt/completion pairs (TRL's "prompt-completion" format): the prompt is not trained, the completion is.

    python tools/preprocess_data_with_mask.py --input pairs.jsonl --prompt-key prompt --completion-key completion \\
        --tokenizer-type HFTokenizer --vocab-file data/tokenizers/neox-20b/tokenizer.json --append-eod \\
        --output-prefix data/sft/pairs

writes {prefix}_text_document (prompt tokens then completion tokens, each tokenized on its own so the boundary is
exact, then EOD with --append-eod) and {prefix}_label_document (-100 on the prompt, the tokens after it).

gpt-neox's mode: --jsonl-keys text --mask-before-token 42,7 masks every token up to and including the first
occurrence of that token sequence (a document without it is trained whole) and writes {prefix}_{key}_document and
{prefix}_label_document (one key). Config: train_data_paths [the text dataset], train_label_data_paths [the label
dataset].
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from neox.data.sources import InputError
from neox.tokenizer import TOKENIZER_TYPES, build_tokenizer
from tools.labelled_data import (LABEL_MASK, Document, LazyTokenizer, Output, add_common_args, check_common_args,
                                 encode_inputs, run_tool)
from tools.preprocess_data import output_prefix_for


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preprocess_data_with_mask.py", description=__doc__.split("\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True,
                       help="comma-separated input files, globs, directories or HF datasets directories")
    group.add_argument("--jsonl-keys", nargs="+", default=["text"],
                       help="with --mask-before-token: the key of the text (one; default: text)")
    group.add_argument("--mask-before-token", default=None,
                       help="comma-separated token ids, e.g. 0,1,1270: mask up to and including their first "
                       "occurrence in each document")
    group.add_argument("--prompt-key", default=None, help="prompt/completion pairs: the key of the prompt (masked)")
    group.add_argument("--completion-key", default=None, help="prompt/completion pairs: the key of the completion")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--vocab-file", default=None, help="vocabulary: vocab.json (GPT-2), tokenizer.json (HF), ...")
    group.add_argument("--merge-file", default=None, help="BPE merges file (GPT-2 tokenizers)")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token (trained)")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="output path prefix")
    add_common_args(parser)
    return parser


def pivot_tokens(spec: str | None) -> list[int]:
    if spec is None:
        return []
    try:
        tokens = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--mask-before-token {spec!r}: give comma-separated token ids, e.g. 0,1,1270") from None
    if not tokens or min(tokens) < 0:
        raise InputError(f"--mask-before-token {spec!r}: give one or more non-negative token ids")
    return tokens


def check_args(args: argparse.Namespace) -> None:
    check_common_args(args)
    pairs = args.prompt_key is not None or args.completion_key is not None
    if pairs and (args.prompt_key is None or args.completion_key is None):
        raise InputError("prompt/completion pairs need both --prompt-key and --completion-key")
    if pairs and args.mask_before_token is not None:
        raise InputError("--mask-before-token masks single texts; prompt/completion pairs are masked by their keys")
    if not pairs and args.mask_before_token is None:
        raise InputError("nothing to mask: give --prompt-key/--completion-key or --mask-before-token (for unmasked "
                         "data use tools/preprocess_data.py)")
    if not pairs and len(args.jsonl_keys) != 1:
        raise InputError(f"--mask-before-token writes one label dataset ({{prefix}}_label_document): give one "
                         f"--jsonl-keys entry, got {args.jsonl_keys}")


def first_occurrence(tokens: list[int], pattern: list[int]) -> int:
    """Index of the first occurrence of `pattern` in `tokens`, or -1."""
    width = len(pattern)
    for start in range(len(tokens) - width + 1):
        if tokens[start:start + width] == pattern:
            return start
    return -1


class MaskEncoder(LazyTokenizer):
    """One record -> {"text": Document}."""

    def __init__(self, args: argparse.Namespace):
        self.tokenizer_args = (args.tokenizer_type, args.vocab_file, args.merge_file)
        self.append_eod, self.ftfy, self.pivot = args.append_eod, args.ftfy, pivot_tokens(args.mask_before_token)
        self.pairs = args.prompt_key is not None

    def build_tokenizer(self):
        return build_tokenizer(*self.tokenizer_args)

    def _tokens(self, text: str) -> list[int]:
        if self.ftfy:
            import ftfy

            text = ftfy.fix_text(text)
        return list(self.tokenizer.encode(text)) if text else []

    def __call__(self, record: tuple) -> dict[str, Document]:
        eod = [self.tokenizer.eod] if self.append_eod else []
        if self.pairs:
            prompt, completion = self._tokens(record[0]), self._tokens(record[1]) + eod
            return {"text": Document(prompt + completion, [LABEL_MASK] * len(prompt) + completion)}
        tokens = self._tokens(record[0]) + eod
        found = first_occurrence(tokens, self.pivot)
        masked = 0 if found < 0 else found + len(self.pivot)
        return {"text": Document(tokens, [LABEL_MASK] * masked + tokens[masked:])}


def run(args: argparse.Namespace):
    check_args(args)
    encoder = MaskEncoder(args)
    tokenizer = encoder.tokenizer
    if encoder.pairs:
        keys, text_prefix = [args.prompt_key, args.completion_key], output_prefix_for(args.output_prefix, "text")
    else:
        keys, text_prefix = list(args.jsonl_keys), output_prefix_for(args.output_prefix, args.jsonl_keys[0])
    outputs = {"text": Output(text_prefix, output_prefix_for(args.output_prefix, "label"))}
    return encode_inputs(args, keys, encoder, outputs, f"tokenizer {tokenizer.name}: vocab size {tokenizer.vocab_size}",
                         tokenizer.decode)


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
