"""Hugging Face `tokenizers` backends that give the ids of each of our tokenizer types, built offline.

Each builder returns a `tokenizers.Tokenizer` plus the special tokens transformers should name (eos, pad, ...):
- GPT-2 vocab.json + merges.txt: a byte-level BPE over the same vocabulary and merges.
- SentencePiece: transformers' own converter (SpmConverter.build_tokenizer_from_spm_proto), which follows the
  model's normalizer spec (dummy prefix, whitespace handling, byte fallback, user-defined pieces).
- tiktoken: vocabulary and merges from transformers' TikTokenConverter (a merge for each way a token splits into
  two tokens, ranked by the token); the special tokens keep their tiktoken ids, gaps included (cl100k_base).
- char-level: one token per UTF-8 byte (GPT-2's printable byte alphabet), ids 256..511 reserved.

SentencePiece never reads its control pieces (<s>, </s>, <unk>) in text and our char-level tokenizer reads
NUL/SOH as bytes, so those exports set split_special_tokens: HF then encodes the special tokens' text like any
other text instead of matching it.
"""
from __future__ import annotations

import base64
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from neox.tokenizer.bpe_files import byte_alphabet
from neox.tokenizer.bytelevel import ByteLevelBPETokenizer
from neox.tokenizer.char_level import CharLevelTokenizer
from neox.tokenizer.spm import SPMTokenizer
from neox.tokenizer.tiktoken_named import TiktokenTokenizer


class TokenizerConversionError(ValueError):
    """A tokenizer cannot cross the Hugging Face boundary as asked."""


@dataclass
class Backend:
    """A `tokenizers` Tokenizer and the keyword arguments PreTrainedTokenizerFast needs to name its specials."""
    tokenizer: tokenizers.Tokenizer
    special_tokens: dict[str, str] = field(default_factory=dict)  # e.g. {"eos_token": "</s>"}
    split_special_tokens: bool = False
    extra_files: list[Path] = field(default_factory=list)  # copied beside tokenizer.json (e.g. tokenizer.model)


def bytelevel_backend(tokenizer: ByteLevelBPETokenizer) -> tokenizers.Tokenizer:
    """A `tokenizers` byte-level BPE giving the ids of our GPT-2 style tokenizer."""
    bpe = tokenizer.bpe
    vocab = dict(bpe.vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in bpe.merges]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # HFGPT2Tokenizer matches its specials in text and may append them past the vocab; GPT2BPETokenizer only
    # names the end-of-document token, which must exist for the export to carry an eos token.
    specials = dict(tokenizer.specials_in_text) or {tok: i for tok, i in vocab.items() if i == tokenizer.eod}
    for token, token_id in sorted(specials.items(), key=lambda item: item[1]):
        if token not in vocab:
            added = backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
            if added != 1 or backend.token_to_id(token) != token_id:
                raise TokenizerConversionError(f"{tokenizer.name}: special token {token!r} would get id "
                                               f"{backend.token_to_id(token)} instead of {token_id}")
        else:
            backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    return backend


# ------------------------------------------------------------------------------------------ SentencePiece

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


def spm_backend(tokenizer: SPMTokenizer) -> Backend:
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    try:
        proto.ParseFromString(tokenizer.path.read_bytes())
    except Exception as err:  # protobuf's DecodeError has no common base with OSError
        raise TokenizerConversionError(f"SPMTokenizer: cannot read '{tokenizer.path}' as a SentencePiece model: "
                                       f"{err}") from None
    pieces = proto.pieces
    model_type = proto.trainer_spec.model_type
    if model_type == 2:  # BPE
        vocab: dict | list = {p.piece: i for i, p in enumerate(pieces)}
    elif model_type == 1:  # unigram
        # SentencePiece never emits control or unknown pieces from text; a score no path would choose keeps
        # `tokenizers` from taking them either, except where the text spells one out and its first character is
        # outside the model's alphabet (`tokenizers` adds no unknown-character path where a longer piece starts).
        vocab = [(p.piece, p.score if p.type in (_NORMAL, _USER_DEFINED, _BYTE) else -1e9) for p in pieces]
    else:
        raise TokenizerConversionError(
            f"SPMTokenizer: '{tokenizer.path}' is a SentencePiece {('word', 'char')[model_type == 4]} model; "
            "Hugging Face `tokenizers` can express its unigram and bpe models only")
    # legacy=True: the dummy prefix goes before every piece of text between user-defined symbols, as
    # SentencePiece does (it sees them as ordinary pieces), and a leading "▁" still gets its own prefix.
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if backend is None:
        raise TokenizerConversionError(f"SPMTokenizer: transformers cannot convert '{tokenizer.path}'")
    unk = proto.trainer_spec.unk_piece
    # SentencePiece decodes the unknown piece as its unk_surface (" ⁇ "); keep decode() identical.
    backend.decoder = decoders.Sequence([decoders.Replace(unk, proto.trainer_spec.unk_surface), backend.decoder])
    names = {"eos_token": tokenizer.eod, "unk_token": proto.trainer_spec.unk_id, "pad_token": tokenizer.pad,
             "bos_token": proto.trainer_spec.bos_id}
    specials = {key: pieces[i].piece for key, i in names.items() if i is not None and 0 <= i < len(pieces)}
    return Backend(backend, specials, split_special_tokens=True, extra_files=[tokenizer.path])


# ------------------------------------------------------------------------------------------ tiktoken

def tiktoken_backend(tokenizer: TiktokenTokenizer) -> Backend:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding = tokenizer.encoding
    ranks: dict[bytes, int] = encoding._mergeable_ranks  # tiktoken has no public accessor for its ranks
    specials: dict[str, int] = encoding._special_tokens
    with tempfile.TemporaryDirectory(prefix="neox-tiktoken-") as work:
        rank_file = Path(work) / f"{encoding.name}.tiktoken"
        lines = (base64.b64encode(token) + b" " + str(rank).encode() for token, rank in
                 sorted(ranks.items(), key=lambda item: item[1]))
        rank_file.write_bytes(b"\n".join(lines) + b"\n")
        converter = TikTokenConverter(vocab_file=str(rank_file), pattern=encoding._pat_str)
        vocab, merges = converter.extract_vocab_merges_from_model(str(rank_file))
    taken = set(vocab.values())
    clash = [token for token, token_id in specials.items() if token_id in taken or token in vocab]
    if clash:
        raise TokenizerConversionError(f"TiktokenTokenizer {encoding.name}: special tokens {clash} share an id or "
                                       "a text with a mergeable token")
    # Special tokens enter the model's vocabulary with their tiktoken ids (tokenizers would number added tokens
    # consecutively after the vocabulary, and cl100k_base leaves gaps), then are marked special so text matches them.
    # ignore_merges: a pre-token that is itself a token is taken whole, as tiktoken does before merging.
    backend = tokenizers.Tokenizer(models.BPE(vocab={**vocab, **specials}, merges=merges, fuse_unk=False,
                                              ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(oniguruma_pattern(encoding._pat_str)), behavior="isolated",
                             invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token in sorted(specials, key=specials.get)])
    moved = {token: backend.token_to_id(token) for token, token_id in specials.items()
             if backend.token_to_id(token) != token_id}
    if moved:
        raise TokenizerConversionError(f"TiktokenTokenizer {encoding.name}: special tokens got other ids in the "
                                       f"Hugging Face tokenizer: {moved}")
    eos = next(token for token, token_id in specials.items() if token_id == tokenizer.eod)
    return Backend(backend, {"eos_token": eos})


def oniguruma_pattern(pattern: str) -> str:
    """tiktoken's split rule for `tokenizers`' Oniguruma (Ruby syntax), where "x{1,3}+" is not a possessive
    "x{1,3}" but "(x{1,3})+": cl100k_base would read a run of digits as one piece instead of groups of three.
    The rule's bounded repeats stand alone in their alternatives, so greedy matching finds the same pieces."""
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


# ------------------------------------------------------------------------------------------ char-level

def char_level_backend(tokenizer: CharLevelTokenizer) -> Backend:
    """Byte b -> id b through GPT-2's printable byte alphabet; no merges, so every byte stays a token."""
    alphabet = byte_alphabet()
    vocab = {alphabet[b]: b for b in range(256)}
    vocab.update({f"<|reserved_{i}|>": i for i in range(256, tokenizer.vocab_size)})
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    specials = {"eos_token": alphabet[tokenizer.eod]}
    if tokenizer.pad is not None:
        specials["pad_token"] = alphabet[tokenizer.pad]
    return Backend(backend, specials, split_special_tokens=True)
