"""HFTokenizer: a Hugging Face `tokenizers` tokenizer.json, as gpt-neox's class of that name.

A tokenizer.json that is nothing but a GPT-2 style byte-level BPE (no normalizer, the GPT-2 split,
plain merges, only whole-token special tokens; tools/train_tokenizer.py writes such files) is
encoded through tiktoken, which gives the same ids several times faster. Everything else, the
NeoX-20B tokenizer included (NFC normalizer, added whitespace tokens), runs through `tokenizers`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import tiktoken
import tokenizers

from neox.tokenizer.base import TokenizerError, check_threads
from neox.tokenizer.bpe_files import BPEFiles
from neox.tokenizer.bytelevel import tiktoken_encoding

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
# Files transformers' save_pretrained writes next to a tokenizer.json: which tokens are bos/eos/pad, the chat
# template, and so on. They do not change the ids; they travel with the tokenizer.
HF_SIDECAR_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


def _is_plain_bytelevel_bpe(config: dict[str, Any]) -> bool:
    model = config.get("model") or {}
    pre_tokenizer = config.get("pre_tokenizer") or {}
    post_processor = config.get("post_processor")
    adds_nothing = post_processor is None or post_processor.get("type") == "ByteLevel" or (
        post_processor.get("type") == "TemplateProcessing"
        and post_processor.get("single") == [{"Sequence": {"id": "A", "type_id": 0}}]
    )
    return (
        config.get("normalizer") is None
        and config.get("truncation") is None
        and config.get("padding") is None
        and adds_nothing
        and pre_tokenizer.get("type") == "ByteLevel"
        and pre_tokenizer.get("add_prefix_space") is False
        and pre_tokenizer.get("use_regex", True) is True
        and model.get("type") == "BPE"
        and model.get("dropout") is None
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and not model.get("byte_fallback", False)
        and not model.get("ignore_merges", False)
        and isinstance(model.get("vocab"), dict)
        and isinstance(model.get("merges"), list)
        and all(
            token.get("special") and not (token.get("lstrip") or token.get("rstrip") or token.get("single_word"))
            for token in config.get("added_tokens") or []
        )
    )


def plain_bytelevel_encoding(path: Path, config: dict[str, Any]) -> tiktoken.Encoding | None:
    """The tiktoken equivalent of a tokenizer.json, or None when it is not provably the same."""
    if not _is_plain_bytelevel_bpe(config):
        return None
    model = config["model"]
    merges: list[tuple[str, str]] = []
    for merge in model["merges"]:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if len(parts) != 2:
            return None
        merges.append((parts[0], parts[1]))
    vocab: dict[str, int] = model["vocab"]
    if any(left + right not in vocab for left, right in merges):
        return None
    specials = {token["content"]: token["id"] for token in config.get("added_tokens") or []}
    return tiktoken_encoding(f"HFTokenizer:{path}", BPEFiles(vocab, merges, path, path), specials)


@dataclass
class HFTokenizer:
    """ids from `Tokenizer.encode(text).ids` (special tokens in text become their ids); vocab_size
    counts added tokens, as gpt-neox's `get_vocab_size()` does; decode skips special tokens as
    gpt-neox's does. Batches on more than one thread go through `encode_batch_fast`, which
    `tokenizers` parallelises over its own Rayon pool (size from RAYON_NUM_THREADS, default all
    cores; off under TOKENIZERS_PARALLELISM=false or in a child forked after it was used)."""

    path: Path
    name: str = "HFTokenizer"
    vocab_size: int = field(init=False)
    eod: int = field(init=False)
    pad: int | None = field(init=False)
    backend: str = field(init=False)
    _tokenizer: tokenizers.Tokenizer = field(init=False, repr=False)
    _encoding: tiktoken.Encoding | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
            config = json.loads(text)
            self._tokenizer = tokenizers.Tokenizer.from_str(text)
        except Exception as err:  # the Rust side raises a bare Exception for every parse error
            raise TokenizerError(
                f"HFTokenizer: vocab_file '{self.path}' is not a valid HF tokenizer.json: {err}"
            ) from err
        eod = self._tokenizer.token_to_id(EOD_TOKEN)
        if eod is None:
            raise TokenizerError(
                f"HFTokenizer: '{self.path}' has no {EOD_TOKEN!r} token, which gpt-neox uses as the "
                f"end-of-document id; train it with that special token (tools/train_tokenizer.py does)"
            )
        self.eod = eod
        self.pad = self._tokenizer.token_to_id(PAD_TOKEN)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._encoding = plain_bytelevel_encoding(self.path, config) if isinstance(config, dict) else None
        self.backend = "tokenizers" if self._encoding is None else "tiktoken"

    def encode(self, text: str) -> list[int]:
        if self._encoding is not None:
            return self._encoding.encode(text, allowed_special="all")
        return self._tokenizer.encode(text).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        num_threads = check_threads(num_threads)
        texts = list(texts)
        if num_threads == 1 or len(texts) < 2:
            return [self.encode(text) for text in texts]
        if self._encoding is not None:
            return self._encoding.encode_batch(texts, num_threads=num_threads, allowed_special="all")
        return [encoding.ids for encoding in self._tokenizer.encode_batch_fast(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        # gpt-neox calls decode() with its default skip_special_tokens=True; so do we
        return self._tokenizer.decode([int(token_id) for token_id in ids])

    def files(self) -> list[Path]:
        """tokenizer.json, plus the transformers files saved beside it (special-token names, chat template), so
        checkpoints carry them and a Hugging Face export can restore them."""
        if self.path.name != "tokenizer.json":
            return [self.path]
        return [self.path] + [self.path.with_name(n) for n in HF_SIDECAR_FILES if self.path.with_name(n).is_file()]
