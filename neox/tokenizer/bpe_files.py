"""Reading GPT-2 style byte-level BPE files (vocab.json + merges.txt) into one checked structure."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from neox.tokenizer.base import TokenizerError

# GPT-2's pre-tokenizer split (contractions, letter runs, digit runs, punctuation runs, whitespace),
# shared by Megatron's Python BPE, HF's ByteLevel pre-tokenizer and tiktoken's r50k encodings.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: visible Latin-1 bytes stand for
    themselves, the other 68 bytes are shifted to U+0100.. in byte order."""
    visible = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet = {byte: chr(byte) for byte in visible}
    shifted = 0
    for byte in range(256):
        if byte not in alphabet:
            alphabet[byte] = chr(0x100 + shifted)
            shifted += 1
    return alphabet


@lru_cache(maxsize=1)
def _char_to_byte() -> dict[str, int]:
    return {char: byte for byte, char in byte_alphabet().items()}


def token_bytes(token: str) -> bytes | None:
    """The raw bytes a vocabulary entry stands for, or None if it is not written in the byte alphabet."""
    char_to_byte = _char_to_byte()
    try:
        return bytes(char_to_byte[char] for char in token)
    except KeyError:
        return None


@dataclass(frozen=True)
class BPEFiles:
    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    vocab_file: Path
    merge_file: Path


def read_vocab(path: Path) -> dict[str, int]:
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"vocab file '{path}' is not a readable JSON vocabulary: {err}") from err
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"vocab file '{path}' must hold a JSON object {{token: id}}; got {type(vocab).__name__}")
    for token, token_id in vocab.items():
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise TokenizerError(f"vocab file '{path}': entry {token!r} has id {token_id!r}, expected an int >= 0")
    if len(set(vocab.values())) != len(vocab):
        raise TokenizerError(f"vocab file '{path}' gives the same id to several tokens")
    return vocab


def read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerError(f"merges file '{path}' is not readable UTF-8 text: {err}") from err
    merges: list[tuple[str, str]] = []
    for line_number, line in enumerate(lines, start=1):
        if (line_number == 1 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(
                f"merges file '{path}' line {line_number}: expected two tokens separated by a space, got {line!r}"
            )
        merges.append((parts[0], parts[1]))
    if not merges:
        raise TokenizerError(f"merges file '{path}' holds no merges")
    return merges


def read_bpe_files(vocab_file: Path, merge_file: Path) -> BPEFiles:
    vocab = read_vocab(vocab_file)
    merges = read_merges(merge_file)
    for line_index, (left, right) in enumerate(merges):
        if left not in vocab or right not in vocab or left + right not in vocab:
            raise TokenizerError(
                f"merges file '{merge_file}' merge #{line_index + 1} ({left} {right}) uses or makes a token "
                f"missing from vocab file '{vocab_file}': are the two files from the same tokenizer?"
            )
    return BPEFiles(vocab=vocab, merges=merges, vocab_file=vocab_file, merge_file=merge_file)
