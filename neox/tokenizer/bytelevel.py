"""GPT2BPETokenizer and HFGPT2Tokenizer: GPT-2 byte-level BPE over vocab.json + merges.txt.

Both encode through a tiktoken `Encoding` built offline from the two files (about 4x faster than
HF `tokenizers` here). tiktoken ranks a pair by the id of the token it makes, so this is used only
when every merge makes a new token whose id grows with the merge's line (true of GPT-2 and of files
written by HF's trainer); it was checked id for id against HF `tokenizers` on the 20k-document
bench corpus (tests/unit/test_tokenizer.py). Other files fall back to an HF `tokenizers` BPE.
The two types differ only in special tokens, as in gpt-neox: GPT2BPETokenizer (Megatron's BPE)
reads "<|endoftext|>" in a text as plain characters; HFGPT2Tokenizer (transformers'
GPT2TokenizerFast plus a "<|padding|>" pad token) turns "<|endoftext|>" and "<|padding|>" into
their ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import tiktoken
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from neox.tokenizer.base import TokenizerError, check_threads
from neox.tokenizer.bpe_files import GPT2_SPLIT_PATTERN, BPEFiles, byte_alphabet, token_bytes

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"


def tiktoken_ranks(bpe: BPEFiles) -> dict[bytes, int] | None:
    """Mergeable ranks equal to the vocab ids, or None when tiktoken's rank order (by id) would
    not replay the merges in their file order."""
    ranks: dict[bytes, int] = {}
    for byte, char in byte_alphabet().items():
        if char not in bpe.vocab:
            return None
        ranks[bytes([byte])] = bpe.vocab[char]
    previous_id = -1
    for left, right in bpe.merges:
        merged = left + right
        merged_id = bpe.vocab[merged]
        raw = token_bytes(merged)
        if raw is None or raw in ranks or merged_id <= previous_id:
            return None
        ranks[raw] = merged_id
        previous_id = merged_id
    return ranks


def tiktoken_encoding(label: str, bpe: BPEFiles, specials_in_text: dict[str, int]) -> tiktoken.Encoding | None:
    """A tiktoken Encoding giving the same ids as `bpe` with `specials_in_text` matched whole in
    text, or None when tiktoken cannot replay these merges faithfully."""
    ranks = tiktoken_ranks(bpe)
    if ranks is None or set(specials_in_text.values()) & set(ranks.values()):
        return None
    return tiktoken.Encoding(
        name=label, pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=dict(specials_in_text)
    )


def reference_hf_tokenizer(bpe: BPEFiles, special_tokens: Sequence[str] = ()) -> tokenizers.Tokenizer:
    """The same BPE in HF `tokenizers` (GPT-2's byte-level pre-tokenizer, no prefix space), with
    `special_tokens` matched in text as whole tokens; new ones get ids after the vocabulary."""
    model = models.BPE(vocab=dict(bpe.vocab), merges=list(bpe.merges), fuse_unk=False)
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    if special_tokens:
        tokenizer.add_special_tokens(
            [AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False) for token in special_tokens]
        )
    return tokenizer


@dataclass
class ByteLevelBPETokenizer:
    name: str
    vocab_size: int
    eod: int
    pad: int | None
    bpe: BPEFiles
    specials_in_text: dict[str, int]
    backend: str = field(init=False)
    _encoding: tiktoken.Encoding | None = field(init=False, repr=False)
    _hf: tokenizers.Tokenizer | None = field(init=False, repr=False)
    _id_to_bytes: dict[int, bytes] = field(init=False, repr=False)
    _allowed_special: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._allowed_special = frozenset(self.specials_in_text)
        self._encoding = tiktoken_encoding(f"{self.name}:{self.bpe.vocab_file}", self.bpe, self.specials_in_text)
        self._hf = None
        if self._encoding is not None:
            self.backend = "tiktoken"
        else:
            self._hf = reference_hf_tokenizer(self.bpe, list(self.specials_in_text))
            self.backend = "tokenizers"
        self._id_to_bytes = {}
        for token, token_id in self.bpe.vocab.items():
            raw = token_bytes(token)
            self._id_to_bytes[token_id] = raw if raw is not None else token.encode("utf-8")
        for token, token_id in self.specials_in_text.items():
            self._id_to_bytes[token_id] = token.encode("utf-8")

    def encode(self, text: str) -> list[int]:
        if self._encoding is None:
            return self._hf.encode(text).ids
        if self.specials_in_text:
            return self._encoding.encode(text, allowed_special=self._allowed_special, disallowed_special=())
        return self._encoding.encode_ordinary(text)

    def encode_numpy(self, text: str) -> np.ndarray:
        """encode() as a uint32 array. On the tiktoken path no Python int list is built, which is the part
        of encoding that holds the GIL, so preprocessing threads scale."""
        if self._encoding is None:
            return np.asarray(self.encode(text), dtype=np.uint32)
        # With no special tokens allowed, an empty allowed set + nothing disallowed is encode_ordinary.
        return self._encoding.encode_to_numpy(text, allowed_special=self._allowed_special, disallowed_special=())

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        num_threads = check_threads(num_threads)
        texts = list(texts)
        if num_threads == 1 or len(texts) < 2:
            return [self.encode(text) for text in texts]
        if self._encoding is None:
            return [encoding.ids for encoding in self._hf.encode_batch_fast(texts)]
        if self.specials_in_text:
            return self._encoding.encode_batch(
                texts, num_threads=num_threads, allowed_special=self._allowed_special, disallowed_special=()
            )
        return self._encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        try:
            raw = b"".join(self._id_to_bytes[int(token_id)] for token_id in ids)
        except KeyError as err:
            raise TokenizerError(
                f"{self.name}: cannot decode id {err.args[0]}, it is not in vocab file '{self.bpe.vocab_file}'"
            ) from None
        return raw.decode("utf-8", errors="replace")

    def files(self) -> list[Path]:
        return [self.bpe.vocab_file, self.bpe.merge_file]


def gpt2_bpe_tokenizer(bpe: BPEFiles) -> ByteLevelBPETokenizer:
    """Megatron's GPT2BPETokenizer: every vocab entry, eod = "<|endoftext|>", no pad, and no special
    tokens recognised in text."""
    if EOD_TOKEN not in bpe.vocab:
        raise TokenizerError(
            f"GPT2BPETokenizer: vocab file '{bpe.vocab_file}' has no {EOD_TOKEN!r} entry, which gpt-neox "
            f"uses as the end-of-document id; use a GPT-2 style vocabulary that has it"
        )
    return ByteLevelBPETokenizer(
        name="GPT2BPETokenizer",
        vocab_size=len(bpe.vocab),
        eod=bpe.vocab[EOD_TOKEN],
        pad=None,
        bpe=bpe,
        specials_in_text={},
    )


def hf_gpt2_tokenizer(bpe: BPEFiles) -> ByteLevelBPETokenizer:
    """transformers' GPT2TokenizerFast with gpt-neox's added "<|padding|>" pad token: both special
    tokens are matched in text; a special token missing from the vocab gets the next free id, as
    transformers' add_special_tokens does."""
    next_id = len(bpe.vocab)
    specials: dict[str, int] = {}
    for token in (EOD_TOKEN, PAD_TOKEN):
        if token in bpe.vocab:
            specials[token] = bpe.vocab[token]
        else:
            specials[token] = next_id
            next_id += 1
    return ByteLevelBPETokenizer(
        name="HFGPT2Tokenizer",
        vocab_size=next_id,
        eod=specials[EOD_TOKEN],
        pad=specials[PAD_TOKEN],
        bpe=bpe,
        specials_in_text=specials,
    )
