"""Tokenizers across the Hugging Face boundary: which of our tokenizer types an HF model directory's files make,
and the files AutoTokenizer loads for one of ours.

Import prefers tokenizer.json (HFTokenizer), then vocab.json + merges.txt (GPT2BPETokenizer: exactly the HF
vocabulary, no added pad token), then a SentencePiece tokenizer.model (SPMTokenizer); a GGUF file's tokenizer is
rebuilt by transformers and saved as tokenizer.json.
Export writes tokenizer.json + tokenizer_config.json through transformers' fast tokenizer class. GPT-2 vocab/merges
are turned into a `tokenizers` BPE directly: transformers 5's GPT2TokenizerFast(vocab_file=, merges_file=) silently
builds a one-token tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from neox.tokenizer import Tokenizer, TokenizerError, build_tokenizer
from neox.tokenizer.bytelevel import ByteLevelBPETokenizer
from neox.tokenizer.hf_json import HFTokenizer


class TokenizerConversionError(ValueError):
    """A tokenizer cannot cross the Hugging Face boundary as asked."""


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
    """Write tokenizer.json + tokenizer_config.json for `tokenizer` into out_dir; returns the HF tokenizer."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, HFTokenizer):
        backend = tokenizers.Tokenizer.from_file(str(tokenizer.path))
    elif isinstance(tokenizer, ByteLevelBPETokenizer):
        backend = _bytelevel_backend(tokenizer)
    else:
        raise TokenizerConversionError(
            f"tokenizer_type {tokenizer.name} has no Hugging Face tokenizer export; HFTokenizer (tokenizer.json), "
            "GPT2BPETokenizer and HFGPT2Tokenizer (vocab.json + merges.txt) can be exported")
    eos = backend.id_to_token(tokenizer.eod)
    pad = backend.id_to_token(tokenizer.pad) if tokenizer.pad is not None else None
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=pad)
    hf_tokenizer.save_pretrained(str(out_dir))
    return hf_tokenizer


def _bytelevel_backend(tokenizer: ByteLevelBPETokenizer):
    """A `tokenizers` byte-level BPE giving the ids of our GPT-2 style tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    bpe = tokenizer.bpe
    vocab = dict(bpe.vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in bpe.merges]))
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
