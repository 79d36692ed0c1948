"""The Hugging Face tokenizer files written on export, for every tokenizer type: AutoTokenizer.from_pretrained(dir)
encodes a whole bundled corpus to exactly our ids and decodes them back as we do; a Llama-style model with a
SentencePiece tokenizer goes HF -> neox -> HF and generates through transformers.pipeline."""
from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import pytest
import sentencepiece
import torch

from neox.checkpoint import load_model
from neox.checkpoint.hf_export import export_to_hf
from neox.checkpoint.hf_import import convert_hf_to_neox
from neox.checkpoint.hf_tokenizer import TokenizerConversionError, export_tokenizer
from neox.data.sources import iter_texts
from neox.tokenizer import build_tokenizer
from neox.tokenizer.bpe_files import byte_alphabet, read_bpe_files
from tests.conftest import CORPORA, GPT2_MERGES, GPT2_VOCAB

TRICKY = ["", " ", "  two  spaces  ", "\n\nx\n", "tab\tand\r\nline", "naïve café Ångström 日本語 🎉 👍🏽",
          "I'M you'LL 1234567 3.14", "   \n    \n  ", "ｆｕｌｌ width", "a" * 300]


def corpus_texts(name: str) -> list[str]:
    return list(iter_texts([CORPORA / name]))


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory) -> dict[str, Path]:
    """A Llama-style SentencePiece BPE (byte fallback, no normalization) and a default unigram (NFKC, extra
    whitespace removed), both with "<|endoftext|>" as a user-defined piece, trained on a slice of the corpus."""
    folder = tmp_path_factory.mktemp("spm")
    sample = folder / "sample.txt"
    sample.write_text("\n".join(corpus_texts("austen.jsonl.zst")[:15]), encoding="utf-8")
    settings = {
        "llama": dict(model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                      remove_extra_whitespaces=False, split_digits=True, vocab_size=1500),
        "unigram": dict(model_type="unigram", vocab_size=1000),
    }
    models = {}
    for name, extra in settings.items():
        buffer = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(input=str(sample), model_writer=buffer, character_coverage=1.0,
                                                 user_defined_symbols=["<|endoftext|>"], minloglevel=2, **extra)
        models[name] = folder / f"{name}.model"
        models[name].write_bytes(buffer.getvalue())
    return models


def tiktoken_file(folder: Path, encoding_name: str) -> Path:
    """GPT-2's ranks written as a .tiktoken file (r50k_base has exactly these ranks). Named cl100k_base it takes
    that encoding's split rule and special tokens, whose ids leave gaps after the ranks."""
    to_byte = {char: byte for byte, char in byte_alphabet().items()}
    bpe = read_bpe_files(GPT2_VOCAB, GPT2_MERGES)
    lines = [f"{base64.b64encode(bytes(to_byte[c] for c in token)).decode()} {token_id}"
             for token, token_id in sorted(bpe.vocab.items(), key=lambda item: item[1]) if token != "<|endoftext|>"]
    path = folder / f"{encoding_name}.tiktoken"
    path.write_text("\n".join(lines) + "\n")
    return path


# (id, corpus, whether decode(encode(text)) gives the text back (not through NFKC and whitespace folding),
#  special-token texts our encode turns into their ids)
CASES = [
    ("spm-llama", "kjv.jsonl.zst", True, ["<|endoftext|>"]),
    ("spm-unigram", "austen.jsonl.zst", False, ["<|endoftext|>"]),
    ("char-level", "shakespeare.jsonl.zst", True, []),
    ("tiktoken-r50k", "kjv.jsonl.zst", True, ["<|endoftext|>"]),
    ("tiktoken-cl100k-rules", "austen.jsonl.zst", True, ["<|endoftext|>", "<|fim_prefix|>", "<|endofprompt|>"]),
]  # GPT-2 BPE and tokenizer.json exports: tests/e2e/test_hf_convert.py


def make_tokenizer(case: str, spm_models: dict[str, Path], folder: Path):
    if case.startswith("spm-"):
        return build_tokenizer("SPMTokenizer", spm_models[case.removeprefix("spm-")])
    if case == "char-level":
        return build_tokenizer("CharLevelTokenizer")
    if case.startswith("tiktoken-"):
        name = "r50k_base" if case == "tiktoken-r50k" else "cl100k_base"
        return build_tokenizer("TiktokenTokenizer", tiktoken_file(folder, name))
    raise ValueError(case)


@pytest.mark.slow
@pytest.mark.parametrize("case,corpus,lossless,specials", CASES, ids=[c[0] for c in CASES])
def test_exported_tokenizer_gives_our_ids_on_a_whole_corpus(tmp_path, spm_models, case, corpus, lossless, specials):
    from transformers import AutoTokenizer

    tokenizer = make_tokenizer(case, spm_models, tmp_path)
    export_tokenizer(tokenizer, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    texts = TRICKY + corpus_texts(corpus) + [f"x {s} y{s}" for s in specials]
    ours = tokenizer.encode_batch(texts, num_threads=2)
    theirs = hf(texts)["input_ids"]
    wrong = [texts[i][:60] for i in range(len(texts)) if ours[i] != theirs[i]]
    assert not wrong, f"{len(wrong)} texts encode differently, e.g. {wrong[:3]}"
    for text, ids, decoded in zip(texts, ours, hf.batch_decode(ours)):
        assert decoded == tokenizer.decode(ids), text[:60]
        if lossless and not any(s in text for s in specials):  # special-token texts: compared with ours only
            assert decoded == text, text[:60]
    assert hf.eos_token_id == tokenizer.eod
    assert hf.pad_token_id == tokenizer.pad
    if case.startswith("spm-"):
        assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == spm_models[case[4:]].read_bytes()
    if case == "spm-llama":
        # SentencePiece reads its control pieces as text; so does the export. (A unigram model whose alphabet lacks
        # "<" is the exception: `tokenizers` has no unknown-character path where a longer piece starts.)
        assert hf("a</s>b<s>")["input_ids"] == tokenizer.encode("a</s>b<s>")
    if case == "char-level":
        assert len(hf) == 512 and hf("\x00\x01Ā")["input_ids"] == tokenizer.encode("\x00\x01Ā") == [0, 1, 196, 128]


def test_an_export_that_would_change_the_ids_is_refused(tmp_path, monkeypatch):
    import neox.checkpoint.hf_tokenizer as hf_tokenizer

    tokenizer = build_tokenizer("CharLevelTokenizer")
    real = hf_tokenizer.char_level_backend

    def shifted(tok):  # a backend that reads "world" as one new token
        backend = real(tok)
        backend.tokenizer.add_tokens(["world"])
        return backend

    monkeypatch.setattr(hf_tokenizer, "char_level_backend", shifted)
    with pytest.raises(TokenizerConversionError, match=r"'Hello world' as \[72, 101, 108, 108, 111, 32, 512\]"):
        export_tokenizer(tokenizer, tmp_path / "hf")


def test_llama_with_sentencepiece_round_trips_and_generates(tmp_path, spm_models):
    import transformers

    model_file = spm_models["llama"]
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=processor.get_piece_size(), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                      max_position_embeddings=64, tie_word_embeddings=False,
                                      bos_token_id=processor.bos_id(), eos_token_id=processor.eos_id())
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(str(tmp_path / "hf"))
    shutil.copy(model_file, tmp_path / "hf" / "tokenizer.model")  # the only tokenizer file: imported as SPM

    neox_dir = convert_hf_to_neox(tmp_path / "hf", tmp_path / "neox", progress=False)
    _, cfg, tokenizer = load_model(neox_dir)
    assert cfg.data.tokenizer_type == "SPMTokenizer"
    exported = export_to_hf(neox_dir, tmp_path / "exported", progress=False)
    assert (exported / "tokenizer.model").is_file() and (exported / "tokenizer.json").is_file()

    text = "In the beginning God created the heaven and the earth."
    generate = transformers.pipeline("text-generation", model=str(exported), device="cpu")
    assert generate.tokenizer(text)["input_ids"] == processor.encode(text) == tokenizer.encode(text)
    tokens = torch.tensor([processor.encode(text)])
    with torch.no_grad():
        reference = hf_model(tokens).logits
        ours = generate.model(tokens).logits
    assert (ours - reference).abs().max() < 1e-4
    greedy = generate(text, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    expected = hf_model.generate(tokens, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                 attention_mask=torch.ones_like(tokens))[0, tokens.shape[1]:]
    # our end of document (the "<|endoftext|>" piece, as gpt-neox's SPMTokenizer) is the exported eos
    assert generate.model.generation_config.eos_token_id == tokenizer.eod == processor.piece_to_id("<|endoftext|>")
    assert generate.tokenizer.eos_token == "<|endoftext|>" and generate.tokenizer.bos_token == "<s>"
    # the continuation the original model picks, decoded as SentencePiece decodes it (unless it stopped at eos)
    if tokenizer.eod not in expected.tolist():
        assert greedy == processor.decode(expected.tolist())
