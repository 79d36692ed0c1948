"""build_tokenizer: a tokenizer_type name (gpt-neox's names) and its files -> a Tokenizer."""
from __future__ import annotations

from pathlib import Path

from neox.tokenizer.base import Tokenizer, TokenizerError, require_file, suggest
from neox.tokenizer.bpe_files import read_bpe_files
from neox.tokenizer.bytelevel import gpt2_bpe_tokenizer, hf_gpt2_tokenizer
from neox.tokenizer.char_level import CharLevelTokenizer
from neox.tokenizer.hf_json import HFTokenizer
from neox.tokenizer.spm import SPMTokenizer
from neox.tokenizer.tiktoken_named import TiktokenTokenizer

TOKENIZER_TYPES = (
    "HFTokenizer",
    "HFGPT2Tokenizer",
    "GPT2BPETokenizer",
    "SPMTokenizer",
    "CharLevelTokenizer",
    "TiktokenTokenizer",
)

_VOCAB_JSON = "a GPT-2 style vocab.json (e.g. data/tokenizers/gpt2/vocab.json)"
_MERGES_TXT = "the matching merges.txt (e.g. data/tokenizers/gpt2/merges.txt)"


def canonical_type(tokenizer_type: str) -> str:
    """gpt-neox compares type names case-insensitively; return the canonical spelling."""
    for known in TOKENIZER_TYPES:
        if known.lower() == str(tokenizer_type).lower():
            return known
    raise TokenizerError(
        f"unknown tokenizer_type {tokenizer_type!r}{suggest(str(tokenizer_type), TOKENIZER_TYPES)}; "
        f"choose one of {', '.join(TOKENIZER_TYPES)}"
    )


def _bpe_paths(kind: str, vocab_file: str | Path | None, merge_file: str | Path | None) -> tuple[Path, Path]:
    if vocab_file is not None and merge_file is None and Path(vocab_file).expanduser().is_dir():
        # gpt-neox's HFGPT2Tokenizer takes a directory holding vocab.json and merges.txt
        folder = Path(vocab_file).expanduser()
        vocab_file, merge_file = folder / "vocab.json", folder / "merges.txt"
    vocab = require_file(vocab_file, "vocab_file", kind, _VOCAB_JSON)
    if merge_file is None:
        raise TokenizerError(
            f"{kind} needs merge_file as well as vocab_file '{vocab}': pass {_MERGES_TXT} "
            f"(--merge-file / merge_file)"
        )
    merges = require_file(merge_file, "merge_file", kind, _MERGES_TXT)
    return vocab, merges


def build_tokenizer(
    tokenizer_type: str,
    vocab_file: str | Path | None = None,
    merge_file: str | Path | None = None,
) -> Tokenizer:
    kind = canonical_type(tokenizer_type)
    if kind == "HFTokenizer":
        return HFTokenizer(require_file(vocab_file, "vocab_file", kind, "a Hugging Face tokenizer.json"))
    if kind in ("GPT2BPETokenizer", "HFGPT2Tokenizer"):
        bpe = read_bpe_files(*_bpe_paths(kind, vocab_file, merge_file))
        return gpt2_bpe_tokenizer(bpe) if kind == "GPT2BPETokenizer" else hf_gpt2_tokenizer(bpe)
    if kind == "SPMTokenizer":
        return SPMTokenizer(require_file(vocab_file, "vocab_file", kind, "a SentencePiece .model file"))
    if kind == "TiktokenTokenizer":
        if vocab_file is None or str(vocab_file) == "":
            raise TokenizerError(
                "TiktokenTokenizer needs vocab_file: pass a tiktoken encoding name (e.g. cl100k_base) "
                "or a downloaded '<name>.tiktoken' file"
            )
        return TiktokenTokenizer(str(vocab_file))
    return CharLevelTokenizer()
