"""Tokenizers: one protocol (encode, encode_batch, decode, eod, pad, vocab_size, files) and its
builds, selected by gpt-neox's tokenizer_type names and giving the same ids as gpt-neox."""
from neox.tokenizer.base import Tokenizer, TokenizerError
from neox.tokenizer.build import TOKENIZER_TYPES, build_tokenizer

__all__ = ["TOKENIZER_TYPES", "Tokenizer", "TokenizerError", "build_tokenizer"]
