"""TiktokenTokenizer: an OpenAI tiktoken encoding chosen by name (e.g. "cl100k_base"), as gpt-neox's.

tiktoken downloads its rank files on first use and caches them (TIKTOKEN_CACHE_DIR); offline, pass
the downloaded "<name>.tiktoken" file itself as vocab_file and it is read locally.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from neox.tokenizer.base import TokenizerError, check_threads, suggest
from neox.tokenizer.bpe_files import GPT2_SPLIT_PATTERN

_CL100K_SPLIT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_SPLIT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_EOT = "<|endoftext|>"
# Split rule and special tokens of the encodings whose rank file is a plain "<name>.tiktoken"
# (the published definitions; the ranks themselves come from the user's file).
LOCAL_ENCODINGS: dict[str, tuple[str, dict[str, int]]] = {
    "r50k_base": (GPT2_SPLIT_PATTERN, {_EOT: 50256}),
    "p50k_base": (GPT2_SPLIT_PATTERN, {_EOT: 50256}),
    "cl100k_base": (
        _CL100K_SPLIT,
        {_EOT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
    ),
    "o200k_base": (_O200K_SPLIT, {_EOT: 199999, "<|endofprompt|>": 200018}),
}


def _load_by_name(name: str) -> tiktoken.Encoding:
    known = tiktoken.list_encoding_names()
    if name not in known:
        raise TokenizerError(
            f"TiktokenTokenizer: vocab_file {name!r} is neither a file nor a tiktoken encoding name"
            f"{suggest(name, known)}; known names: {', '.join(known)}"
        )
    try:
        return tiktoken.get_encoding(name)
    except (OSError, ValueError) as err:  # requests' ConnectionError is an OSError
        raise TokenizerError(
            f"TiktokenTokenizer: could not load tiktoken encoding {name!r} (it is downloaded on first use "
            f"and this machine could not fetch it: {type(err).__name__}). Download '{name}.tiktoken' where "
            f"there is network and pass its path as vocab_file, or point TIKTOKEN_CACHE_DIR at a cache that has it"
        ) from err


def _load_from_file(path: Path) -> tiktoken.Encoding:
    name = path.name.removesuffix(".tiktoken")
    if name not in LOCAL_ENCODINGS:
        raise TokenizerError(
            f"TiktokenTokenizer: cannot tell which encoding '{path}' holds; name the file after it "
            f"({', '.join(f'{known}.tiktoken' for known in LOCAL_ENCODINGS)})"
        )
    try:
        ranks = load_tiktoken_bpe(str(path))
    except (OSError, ValueError) as err:
        raise TokenizerError(f"TiktokenTokenizer: '{path}' is not a tiktoken rank file (base64 token, rank per line): {err}") from err
    split_pattern, special_tokens = LOCAL_ENCODINGS[name]
    try:
        return tiktoken.Encoding(name=name, pat_str=split_pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
    except (ValueError, AssertionError) as err:
        raise TokenizerError(f"TiktokenTokenizer: '{path}' does not match encoding {name!r}: {err}") from err


@dataclass
class TiktokenTokenizer:
    """eod is the encoding's end-of-text token and pad is None, as in gpt-neox. Special tokens that
    appear in a text become their ids (gpt-neox's batch path does this; its single-text path raises)."""

    source: str
    name: str = "TiktokenTokenizer"
    vocab_size: int = field(init=False)
    eod: int = field(init=False)
    pad: int | None = None
    _encoding: tiktoken.Encoding = field(init=False, repr=False)
    _path: Path | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        path = Path(self.source).expanduser()
        if path.is_file():
            self._path = path
            self._encoding = _load_from_file(path)
        elif path.exists() or "/" in self.source or self.source.endswith(".tiktoken"):
            raise TokenizerError(f"TiktokenTokenizer: vocab_file '{path}' is not a readable .tiktoken file")
        else:
            self._path = None
            self._encoding = _load_by_name(self.source)
        self.vocab_size = self._encoding.n_vocab
        self.eod = self._encoding.eot_token

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken Encoding itself (its ranks and split rule; the Hugging Face export rebuilds it)."""
        return self._encoding

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode(text, allowed_special="all")

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        num_threads = check_threads(num_threads)
        texts = list(texts)
        if num_threads == 1 or len(texts) < 2:
            return [self.encode(text) for text in texts]
        return self._encoding.encode_batch(texts, num_threads=num_threads, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return self._encoding.decode([int(token_id) for token_id in ids], errors="replace")
        except KeyError as err:
            raise TokenizerError(f"TiktokenTokenizer: id {err.args[0]} is not in encoding {self._encoding.name!r}") from None

    def files(self) -> list[Path]:
        return [self._path] if self._path is not None else []
