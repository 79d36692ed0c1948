"""CharLevelTokenizer: one id per UTF-8 byte, as gpt-neox's (vocab 512, eod 0, pad 1)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from neox.tokenizer.base import TokenizerError, check_threads


@dataclass
class CharLevelTokenizer:
    """gpt-neox encodes a text as its UTF-8 bytes and reserves ids 256..511 unused; eod 0 and
    pad 1 are the NUL and SOH bytes. Decoding joins the bytes back (gpt-neox's own decode clamps
    ids to >= 32 and so cannot round-trip newlines or non-ASCII text); ids >= 256 decode to U+FFFD."""

    name: str = "CharLevelTokenizer"
    vocab_size: int = 512
    eod: int = 0
    pad: int | None = 1

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        check_threads(num_threads)
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for token_id in ids:
            token_id = int(token_id)
            if token_id < 0 or token_id >= self.vocab_size:
                raise TokenizerError(f"CharLevelTokenizer: id {token_id} is outside its vocabulary 0..{self.vocab_size - 1}")
            out += bytes([token_id]) if token_id < 256 else "\ufffd".encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def files(self) -> list[Path]:
        return []
