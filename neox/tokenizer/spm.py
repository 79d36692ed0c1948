"""SPMTokenizer: a SentencePiece .model file, as gpt-neox's class of that name."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import sentencepiece

from neox.tokenizer.base import TokenizerError, check_threads

EOD_PIECE = "<|endoftext|>"


@dataclass
class SPMTokenizer:
    """ids from `SentencePieceProcessor.encode(text)` (no BOS/EOS added); vocab_size is the piece
    count. eod is the piece "<|endoftext|>" as in gpt-neox; when the model has no such piece
    gpt-neox silently takes the unknown-piece id, so we use the model's EOS id instead and fail
    if it has none. pad is the model's pad id (None if it has none)."""

    path: Path
    name: str = "SPMTokenizer"
    vocab_size: int = field(init=False)
    eod: int = field(init=False)
    pad: int | None = field(init=False)
    _processor: sentencepiece.SentencePieceProcessor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"SPMTokenizer: vocab_file '{self.path}' is not a SentencePiece model: {err}") from err
        self.vocab_size = self._processor.get_piece_size()
        eod = self._processor.piece_to_id(EOD_PIECE)
        if self._processor.id_to_piece(eod) != EOD_PIECE:
            eod = self._processor.eos_id()
            if eod < 0:
                raise TokenizerError(
                    f"SPMTokenizer: '{self.path}' has neither a {EOD_PIECE!r} piece nor an EOS id; "
                    f"train it with --user_defined_symbols={EOD_PIECE} or an eos piece"
                )
        self.eod = eod
        pad = self._processor.pad_id()
        self.pad = pad if pad >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        num_threads = check_threads(num_threads)
        texts = list(texts)
        if not texts:
            return []
        return self._processor.encode(texts, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(token_id) for token_id in ids]
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerError(f"SPMTokenizer: id {token_id} is outside '{self.path}' (size {self.vocab_size})")
        return self._processor.decode(ids)

    def files(self) -> list[Path]:
        return [self.path]
