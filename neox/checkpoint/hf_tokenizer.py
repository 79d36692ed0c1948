"""Tokenizers across the Hugging Face boundary: which of our tokenizer types an HF model directory's files make,
and the files AutoTokenizer loads for one of ours.

Import prefers tokenizer.json (HFTokenizer), then vocab.json + merges.txt (GPT2BPETokenizer: exactly the HF
vocabulary, no added pad token), then a SentencePiece tokenizer.model (SPMTokenizer); a GGUF file's tokenizer is
rebuilt by transformers and saved as tokenizer.json.
An imported HF tokenizer keeps transformers' files beside its tokenizer.json (tokenizer_config.json, chat template:
HFTokenizer.files() lists them), so checkpoints carry them and export hands them back to transformers unchanged.
Every other tokenizer type is rebuilt as a `tokenizers` backend giving our ids (hf_tokenizer_backends) and saved
through PreTrainedTokenizerFast; a SentencePiece export also carries tokenizer.model. Each export is reloaded with
AutoTokenizer and checked against our ids before it is accepted.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from neox.checkpoint.hf_tokenizer_backends import (Backend, TokenizerConversionError, bytelevel_backend,
                                                   char_level_backend, spm_backend, tiktoken_backend)
from neox.tokenizer import Tokenizer, TokenizerError, build_tokenizer
from neox.tokenizer.bytelevel import ByteLevelBPETokenizer
from neox.tokenizer.char_level import CharLevelTokenizer
from neox.tokenizer.hf_json import HFTokenizer
from neox.tokenizer.spm import SPMTokenizer
from neox.tokenizer.tiktoken_named import TiktokenTokenizer

__all__ = ["ImportedTokenizer", "TokenizerConversionError", "export_tokenizer", "import_tokenizer"]


@dataclass(frozen=True)
class ImportedTokenizer:
    """Our tokenizer for an HF model, with the config keys that name it (file names relative to tokenizer/)."""
    tokenizer: Tokenizer
    tokenizer_type: str
    vocab_name: str | None
    merge_name: str | None

    @property
    def files(self) -> list[Path]:
        return self.tokenizer.files()


def import_tokenizer(hf_dir: Path, work_dir: Path, gguf_file: str | None = None) -> ImportedTokenizer:
    """Our tokenizer for the HF model in hf_dir; work_dir receives files that have to be written first."""
    if gguf_file is not None:
        from transformers import AutoTokenizer

        out = work_dir / "gguf-tokenizer"
        AutoTokenizer.from_pretrained(str(hf_dir), gguf_file=gguf_file).save_pretrained(str(out))
        hf_dir = out
    candidates = []
    if (hf_dir / "tokenizer.json").is_file():
        candidates.append(("HFTokenizer", hf_dir / "tokenizer.json", None))
    if (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        candidates.append(("GPT2BPETokenizer", hf_dir / "vocab.json", hf_dir / "merges.txt"))
    if (hf_dir / "tokenizer.model").is_file():
        candidates.append(("SPMTokenizer", hf_dir / "tokenizer.model", None))
    if not candidates:
        raise TokenizerConversionError(
            f"{hf_dir} has no tokenizer files (tokenizer.json, vocab.json + merges.txt, or tokenizer.model); "
            "save the model's tokenizer there with tokenizer.save_pretrained(dir)")
    problems = []
    for kind, vocab, merges in candidates:
        try:
            tokenizer = build_tokenizer(kind, vocab, merges)
        except TokenizerError as err:
            problems.append(str(err))
            continue
        return ImportedTokenizer(tokenizer, kind, vocab.name, merges.name if merges else None)
    raise TokenizerConversionError(f"none of the tokenizer files in {hf_dir} make a neox tokenizer: "
                                   + " | ".join(problems))


def export_tokenizer(tokenizer: Tokenizer, out_dir: Path):
    """Write the Hugging Face tokenizer files for `tokenizer` into out_dir and return the HF tokenizer, reloaded
    from out_dir by AutoTokenizer and checked to give our ids on a few probe texts."""
    from transformers import AutoTokenizer

    if isinstance(tokenizer, HFTokenizer) and len(tokenizer.files()) > 1:
        # An imported HF tokenizer kept transformers' own files (special-token names, chat template): let
        # transformers read and write them itself so nothing is lost.
        AutoTokenizer.from_pretrained(str(tokenizer.path.parent), local_files_only=True).save_pretrained(str(out_dir))
    else:
        _save_backend(_backend(tokenizer), out_dir)
    hf_tokenizer = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    _check_same_ids(tokenizer, hf_tokenizer)
    return hf_tokenizer


def _backend(tokenizer: Tokenizer) -> Backend:
    import tokenizers

    if isinstance(tokenizer, HFTokenizer):
        backend = tokenizers.Tokenizer.from_file(str(tokenizer.path))
    elif isinstance(tokenizer, ByteLevelBPETokenizer):
        backend = bytelevel_backend(tokenizer)
    elif isinstance(tokenizer, SPMTokenizer):
        return spm_backend(tokenizer)
    elif isinstance(tokenizer, TiktokenTokenizer):
        return tiktoken_backend(tokenizer)
    elif isinstance(tokenizer, CharLevelTokenizer):
        return char_level_backend(tokenizer)
    else:
        raise TokenizerConversionError(f"tokenizer_type {tokenizer.name} ({type(tokenizer).__name__}) has no Hugging "
                                       "Face tokenizer export")
    specials = {"eos_token": backend.id_to_token(tokenizer.eod)}
    if tokenizer.pad is not None:
        specials["pad_token"] = backend.id_to_token(tokenizer.pad)
    return Backend(backend, specials)


def _save_backend(backend: Backend, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend.tokenizer, **backend.special_tokens,
                                           split_special_tokens=backend.split_special_tokens)
    hf_tokenizer.save_pretrained(str(out_dir))
    for path in backend.extra_files:
        shutil.copy2(path, out_dir / _EXTRA_FILE_NAMES.get(path.suffix, path.name))


# SentencePiece users look for the model under transformers' name for it.
_EXTRA_FILE_NAMES = {".model": "tokenizer.model"}
_PROBES = ("Hello world", "In the beginning God created the heaven and the earth.\n\nAnd the earth was void.",
           "  two  spaces, tabs\tand 1234567 digits", "naïve café Ångström", "I'm you're they'll")


def _check_same_ids(tokenizer: Tokenizer, hf_tokenizer) -> None:
    """Refuse an export whose tokenizer would give other ids than ours (a model would read garbage)."""
    for text in _PROBES:
        ours, theirs = tokenizer.encode(text), hf_tokenizer(text)["input_ids"]
        if ours != theirs:
            raise TokenizerConversionError(
                f"the exported Hugging Face tokenizer encodes {text!r} as {theirs[:12]} but {tokenizer.name} gives "
                f"{ours[:12]}; the export was stopped rather than pair the model with a different tokenizer")
