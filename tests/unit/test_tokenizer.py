"""neox.tokenizer: ids equal to gpt-neox's tokenizer classes (checked against reference libraries)."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import regex
import sentencepiece
import tokenizers
from conftest import CORPORA, GPT2_MERGES, GPT2_VOCAB, NEOX20B_TOKENIZER

from neox.tokenizer import TOKENIZER_TYPES, Tokenizer, TokenizerError, build_tokenizer
from neox.tokenizer.bpe_files import byte_alphabet, read_bpe_files
from neox.tokenizer.bytelevel import reference_hf_tokenizer

TRICKY = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "\t\t x",
    "Hello world",
    "hello   world  ",
    "trailing spaces   ",
    "  leading",
    "line1\nline2\r\nline3\r\n\r\n",
    "I'm you're we've they'll she'd it's HE'S DON'T 'll''s 'Sam 'Tis O'REILLY'S x'Sam",
    "naïve café résumé Ångström",
    "日本語のテキストです。中文也可以。",
    "emoji 🎉🎉 👨‍👩‍👧‍👦 flags 🇺🇸🇫🇷 skin 👍🏽",
    "numbers 1234567 3.14159 1,000,000 ٣٤٥",
    "<|endoftext|>",
    "a<|endoftext|>b",
    "x <|endoftext|> y <|endoftext|><|endoftext|>\n<|endoftext|>",
    "<|padding|> and <|endoftext",
    "mixed\u00a0nbsp\u2003em\u3000ideographic  \u2028sep",
    "\u0085next line \x1c\x1d\x1e\x1f separators",
    "zero\u200bwidth\ufeffbom e\u0301 combining",
    "Ελληνικά Русский العربية עברית हिन्दी",
    "def f(x):\n    return x**2  # comment\n\n\tpass\n",
    "tabs\tand\vvertical\ffeed",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math ∑∫√ and \U0001F9EC",
    "    \n    \n  ",
    "a" * 700 + " " + "ab" * 300 + "!" * 50,
]

# gpt-neox / Megatron's GPT-2 split rule, as published with GPT-2
MEGATRON_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


@pytest.fixture(scope="module")
def gpt2_files():
    return read_bpe_files(GPT2_VOCAB, GPT2_MERGES)


@pytest.fixture(scope="module")
def gpt2_bpe() -> Tokenizer:
    return build_tokenizer("GPT2BPETokenizer", GPT2_VOCAB, GPT2_MERGES)


@pytest.fixture(scope="module")
def hf_gpt2() -> Tokenizer:
    return build_tokenizer("HFGPT2Tokenizer", GPT2_VOCAB, GPT2_MERGES)


@pytest.fixture(scope="module")
def neox20b() -> Tokenizer:
    return build_tokenizer("HFTokenizer", NEOX20B_TOKENIZER)


def megatron_bpe_ids(text: str, vocab: dict[str, int], pair_ranks: dict[tuple[str, str], int]) -> list[int]:
    """The original GPT-2 algorithm: split, map bytes to the alphabet, then repeatedly merge every
    occurrence of the lowest-ranked adjacent pair; "<|endoftext|>" is ordinary text."""
    alphabet = byte_alphabet()
    ids: list[int] = []
    for piece in MEGATRON_SPLIT.findall(text):
        word = [alphabet[byte] for byte in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda pair: pair_ranks.get(pair, float("inf")))
            if best not in pair_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(vocab[token] for token in word)
    return ids


def test_types_and_protocol():
    assert TOKENIZER_TYPES == (
        "HFTokenizer", "HFGPT2Tokenizer", "GPT2BPETokenizer", "SPMTokenizer", "CharLevelTokenizer", "TiktokenTokenizer"
    )
    assert isinstance(build_tokenizer("CharLevelTokenizer"), Tokenizer)
    # gpt-neox matches type names case-insensitively
    assert build_tokenizer("charleveltokenizer").name == "CharLevelTokenizer"


def test_known_ids_and_sizes(gpt2_bpe, hf_gpt2, neox20b):
    assert neox20b.encode("Hello world") == [12092, 1533]
    assert (neox20b.vocab_size, neox20b.eod, neox20b.pad) == (50277, 0, 1)
    assert gpt2_bpe.encode("Hello world") == [15496, 995]
    assert (gpt2_bpe.vocab_size, gpt2_bpe.eod, gpt2_bpe.pad) == (50257, 50256, None)
    assert hf_gpt2.encode("Hello world") == [15496, 995]
    assert (hf_gpt2.vocab_size, hf_gpt2.eod, hf_gpt2.pad) == (50258, 50256, 50257)
    assert gpt2_bpe.backend == "tiktoken" and hf_gpt2.backend == "tiktoken"
    assert neox20b.backend == "tokenizers"  # NFC normalizer and added whitespace tokens: HF only
    assert gpt2_bpe.files() == [GPT2_VOCAB.resolve(), GPT2_MERGES.resolve()]
    assert neox20b.files() == [NEOX20B_TOKENIZER.resolve()]


def test_gpt2bpe_equals_megatron_algorithm_and_hf(gpt2_bpe, gpt2_files):
    pair_ranks = {pair: rank for rank, pair in enumerate(gpt2_files.merges)}
    reference = reference_hf_tokenizer(gpt2_files)
    for text in TRICKY:
        expected = megatron_bpe_ids(text, gpt2_files.vocab, pair_ranks)
        assert gpt2_bpe.encode(text) == expected, text
        assert reference.encode(text).ids == expected, text
    # Megatron's BPE reads the special token as characters: never the eod id
    assert gpt2_bpe.eod not in gpt2_bpe.encode("a<|endoftext|>b")


def test_hfgpt2_equals_transformers(hf_gpt2):
    from transformers import GPT2TokenizerFast

    reference = GPT2TokenizerFast(vocab=str(GPT2_VOCAB), merges=str(GPT2_MERGES))
    reference.add_special_tokens({"pad_token": "<|padding|>"})  # what gpt-neox's HFGPT2Tokenizer adds
    assert len(reference) == hf_gpt2.vocab_size
    assert (reference.eos_token_id, reference.pad_token_id) == (hf_gpt2.eod, hf_gpt2.pad)
    for text in TRICKY:
        assert hf_gpt2.encode(text) == reference.encode(text), text
    assert hf_gpt2.encode("a<|endoftext|>b<|padding|>") == [64, 50256, 65, 50257]


@pytest.mark.parametrize("fixture", ["gpt2_bpe", "hf_gpt2", "neox20b"])
def test_batch_equals_single_and_decode_round_trips(request, fixture):
    tokenizer = request.getfixturevalue(fixture)
    singles = [tokenizer.encode(text) for text in TRICKY]
    assert tokenizer.encode_batch(TRICKY) == singles
    assert tokenizer.encode_batch(TRICKY, num_threads=2) == singles
    assert tokenizer.encode_batch(TRICKY, num_threads=2) == singles  # deterministic across runs
    assert tokenizer.encode_batch([]) == []
    for text, ids in zip(TRICKY, singles):
        if "<|" in text and fixture == "neox20b":
            continue  # HF decode drops special tokens, as in gpt-neox
        if fixture == "neox20b":
            import unicodedata

            text = unicodedata.normalize("NFC", text)  # the NeoX-20B normalizer
        assert tokenizer.decode(ids) == text


def test_hfgpt2_takes_a_directory_like_gpt_neox(hf_gpt2):
    from_dir = build_tokenizer("HFGPT2Tokenizer", GPT2_VOCAB.parent)
    assert from_dir.files() == hf_gpt2.files()
    assert [from_dir.encode(t) for t in TRICKY] == [hf_gpt2.encode(t) for t in TRICKY]


def test_tokenizers_survive_pickling_for_worker_processes(gpt2_bpe, hf_gpt2, neox20b, trained_json, spm_models):
    import pickle

    built = [gpt2_bpe, hf_gpt2, neox20b, build_tokenizer("HFTokenizer", trained_json),
             build_tokenizer("SPMTokenizer", spm_models["with_eod"]), build_tokenizer("CharLevelTokenizer")]
    for tokenizer in built:
        copy = pickle.loads(pickle.dumps(tokenizer))
        assert (copy.name, copy.vocab_size, copy.eod, copy.pad) == (
            tokenizer.name, tokenizer.vocab_size, tokenizer.eod, tokenizer.pad)
        assert copy.encode_batch(TRICKY[6:12], num_threads=2) == tokenizer.encode_batch(TRICKY[6:12])


def _write_vocab(path: Path, vocab: dict[str, int]) -> Path:
    path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return path


def test_vocab_with_specials_first_still_uses_tiktoken(tmp_path, gpt2_files):
    # NeoX-style numbering: the special tokens take ids 0 and 1 and everything else moves up by 2
    shifted = {"<|endoftext|>": 0, "<|padding|>": 1}
    shifted.update({token: token_id + 2 for token, token_id in gpt2_files.vocab.items() if token != "<|endoftext|>"})
    vocab = _write_vocab(tmp_path / "vocab.json", shifted)
    tokenizer = build_tokenizer("HFGPT2Tokenizer", vocab, GPT2_MERGES)
    assert tokenizer.backend == "tiktoken"
    assert (tokenizer.eod, tokenizer.pad, tokenizer.vocab_size) == (0, 1, 50258)
    reference = reference_hf_tokenizer(read_bpe_files(vocab, GPT2_MERGES), ["<|endoftext|>", "<|padding|>"])
    for text in TRICKY:
        assert tokenizer.encode(text) == reference.encode(text).ids, text


def test_ids_out_of_merge_order_fall_back_to_hf_tokenizers(tmp_path, gpt2_files):
    # reversing the merged tokens' ids breaks "id order == merge order", which tiktoken needs
    merged_ids = sorted(token_id for token_id in gpt2_files.vocab.values() if 256 <= token_id < 50256)
    flipped = {tid: merged_ids[-1 - i] for i, tid in enumerate(merged_ids)}
    vocab = _write_vocab(tmp_path / "vocab.json", {t: flipped.get(i, i) for t, i in gpt2_files.vocab.items()})
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab, GPT2_MERGES)
    assert tokenizer.backend == "tokenizers"
    original = build_tokenizer("GPT2BPETokenizer", GPT2_VOCAB, GPT2_MERGES)
    for text in TRICKY:
        expected = [flipped.get(i, i) for i in original.encode(text)]
        assert tokenizer.encode(text) == expected, text
        assert tokenizer.encode_batch([text, text], num_threads=2) == [expected, expected]


@pytest.fixture(scope="module")
def trained_json(tmp_path_factory) -> Path:
    from tools.train_tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("trained")
    return train_tokenizer(str(CORPORA / "kjv.jsonl.zst"), str(folder) + "/", vocab_size=2000).output


def test_plain_bytelevel_tokenizer_json_uses_tiktoken(tmp_path, trained_json, gpt2_files, hf_gpt2):
    trained = build_tokenizer("HFTokenizer", trained_json)
    assert trained.backend == "tiktoken"
    assert (trained.vocab_size, trained.eod, trained.pad) == (2000, 0, 1)
    reference = tokenizers.Tokenizer.from_file(str(trained_json))
    for text in TRICKY:
        assert trained.encode(text) == reference.encode(text).ids, text
        assert trained.decode(trained.encode(text)) == reference.decode(reference.encode(text).ids)
    assert trained.encode_batch(TRICKY, num_threads=2) == [reference.encode(t).ids for t in TRICKY]
    # GPT-2 saved as a tokenizer.json gives the HFGPT2Tokenizer ids through the same fast path
    gpt2_json = tmp_path / "gpt2.json"
    reference_hf_tokenizer(gpt2_files, ["<|endoftext|>", "<|padding|>"]).save(str(gpt2_json))
    gpt2_hf = build_tokenizer("HFTokenizer", gpt2_json)
    assert gpt2_hf.backend == "tiktoken" and gpt2_hf.vocab_size == 50258
    assert [gpt2_hf.encode(t) for t in TRICKY] == [hf_gpt2.encode(t) for t in TRICKY]
    # anything tiktoken cannot mirror (here a normalizer) stays on HF tokenizers
    config = json.loads(trained_json.read_text())
    config["normalizer"] = {"type": "Lowercase"}
    lowered = tmp_path / "lowercase.json"
    lowered.write_text(json.dumps(config))
    lowercase = build_tokenizer("HFTokenizer", lowered)
    assert lowercase.backend == "tokenizers"
    assert lowercase.encode("HELLO") == trained.encode("hello")


def test_char_level():
    tokenizer = build_tokenizer("CharLevelTokenizer")
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (512, 0, 1)
    assert tokenizer.encode("Hi é") == [72, 105, 32, 0xC3, 0xA9]
    for text in TRICKY:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode_batch(["ab", "c"], num_threads=2) == [[97, 98], [99]]
    assert tokenizer.decode([104, 300, 105]) == "h\ufffdi"
    with pytest.raises(TokenizerError, match="outside"):
        tokenizer.decode([512])


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(TRICKY[6:] * 3 + ["In the beginning God created the heaven and the earth."] * 20))
    models = {}
    for name, extra in (("with_eod", {"user_defined_symbols": ["<|endoftext|>"]}), ("plain", {})):
        buffer = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus), model_writer=buffer, vocab_size=150, model_type="bpe",
            character_coverage=1.0, pad_id=3, minloglevel=2, **extra,
        )
        path = folder / f"{name}.model"
        path.write_bytes(buffer.getvalue())
        models[name] = path
    return models


def test_sentencepiece(spm_models):
    tokenizer = build_tokenizer("SPMTokenizer", spm_models["with_eod"])
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_models["with_eod"]))
    assert tokenizer.vocab_size == processor.get_piece_size() == 150
    assert tokenizer.eod == processor.piece_to_id("<|endoftext|>") and tokenizer.eod > 3
    assert tokenizer.pad == 3
    texts = TRICKY[6:12]
    assert [tokenizer.encode(t) for t in texts] == [processor.encode(t) for t in texts]
    assert tokenizer.encode_batch(texts, num_threads=2) == [processor.encode(t) for t in texts]
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"
    # without an "<|endoftext|>" piece gpt-neox would take the unknown id; we take EOS
    plain = build_tokenizer("SPMTokenizer", spm_models["plain"])
    assert plain.eod == sentencepiece.SentencePieceProcessor(model_file=str(spm_models["plain"])).eos_id() == 2


def test_tiktoken_from_local_rank_file(tmp_path, gpt2_files, hf_gpt2):
    # r50k_base has GPT-2's ranks, so a rank file written from GPT-2's vocab is a faithful r50k_base
    alphabet_inverse = {char: byte for byte, char in byte_alphabet().items()}
    lines = [
        f"{base64.b64encode(bytes(alphabet_inverse[c] for c in token)).decode()} {token_id}"
        for token, token_id in sorted(gpt2_files.vocab.items(), key=lambda item: item[1])
        if token != "<|endoftext|>"
    ]
    rank_file = tmp_path / "r50k_base.tiktoken"
    rank_file.write_text("\n".join(lines) + "\n")
    tokenizer = build_tokenizer("TiktokenTokenizer", rank_file)
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (50257, 50256, None)
    assert tokenizer.files() == [rank_file]
    for text in TRICKY:
        if "<|padding|>" not in text:  # a special token of HFGPT2Tokenizer only
            assert tokenizer.encode(text) == hf_gpt2.encode(text), text
    assert tokenizer.encode_batch(TRICKY, num_threads=2) == [tokenizer.encode(t) for t in TRICKY]
    assert tokenizer.decode(tokenizer.encode(TRICKY[14])) == TRICKY[14]
    wrong_name = tmp_path / "mine.tiktoken"
    wrong_name.write_text(lines[0] + "\n")
    with pytest.raises(TokenizerError, match="name the file"):
        build_tokenizer("TiktokenTokenizer", wrong_name)


def test_tiktoken_by_name_offline_or_cached():
    with pytest.raises(TokenizerError, match="did you mean cl100k_base"):
        build_tokenizer("TiktokenTokenizer", "cl100k")
    try:
        tokenizer = build_tokenizer("TiktokenTokenizer", "cl100k_base")
    except TokenizerError as err:  # no network and no cache: the message says what to pass instead
        assert "cl100k_base.tiktoken" in str(err) and "TIKTOKEN_CACHE_DIR" in str(err)
    else:
        assert (tokenizer.eod, tokenizer.vocab_size) == (100257, 100277)


def test_errors_name_the_file_and_what_to_pass(tmp_path):
    with pytest.raises(TokenizerError, match=r"did you mean GPT2BPETokenizer\?"):
        build_tokenizer("GPT2BPETokenizr", GPT2_VOCAB, GPT2_MERGES)
    with pytest.raises(TokenizerError, match="needs merge_file.*merges.txt"):
        build_tokenizer("GPT2BPETokenizer", GPT2_VOCAB)
    with pytest.raises(TokenizerError, match="needs vocab_file"):
        build_tokenizer("HFTokenizer")
    missing = tmp_path / "nope.json"
    with pytest.raises(TokenizerError, match=f"'{missing}' does not exist"):
        build_tokenizer("HFTokenizer", missing)
    with pytest.raises(TokenizerError, match="is not a file"):
        build_tokenizer("SPMTokenizer", tmp_path)
    with pytest.raises(TokenizerError, match="not a valid HF tokenizer.json"):
        build_tokenizer("HFTokenizer", GPT2_MERGES)
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        build_tokenizer("SPMTokenizer", GPT2_VOCAB)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(TokenizerError, match="broken.json.*not a readable JSON"):
        build_tokenizer("GPT2BPETokenizer", broken, GPT2_MERGES)
    small_vocab = _write_vocab(tmp_path / "small.json", {"a": 0, "b": 1})
    with pytest.raises(TokenizerError, match="missing from vocab file .*same tokenizer"):
        build_tokenizer("GPT2BPETokenizer", small_vocab, GPT2_MERGES)
    bad_merges = tmp_path / "merges.txt"
    bad_merges.write_text("#version: 0.2\nĠ t\nthree parts here\n")
    with pytest.raises(TokenizerError, match="merges.txt' line 3"):
        build_tokenizer("GPT2BPETokenizer", GPT2_VOCAB, bad_merges)
    with pytest.raises(TokenizerError, match="num_threads"):
        build_tokenizer("CharLevelTokenizer").encode_batch(["a"], num_threads=0)


def test_hf_tokenizer_without_eod_is_rejected(tmp_path):
    model = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    path = tmp_path / "tokenizer.json"
    model.save(str(path))
    with pytest.raises(TokenizerError, match="no '<\\|endoftext\\|>' token"):
        build_tokenizer("HFTokenizer", path)


def _bench_documents(path: Path):
    import zstandard

    with path.open("rb") as raw:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        for line in reader:
            yield json.loads(line)["text"]


def _chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@pytest.mark.slow
def test_tiktoken_path_equals_hf_on_whole_bench_corpus(bench_corpus, gpt2_bpe, hf_gpt2, gpt2_files):
    from transformers import GPT2TokenizerFast

    plain_reference = reference_hf_tokenizer(gpt2_files)
    transformers_reference = GPT2TokenizerFast(vocab=str(GPT2_VOCAB), merges=str(GPT2_MERGES))
    transformers_reference.add_special_tokens({"pad_token": "<|padding|>"})
    special_reference = transformers_reference.backend_tokenizer
    documents = tokens = 0
    for chunk in _chunks(_bench_documents(bench_corpus), 2000):
        expected_plain = [encoding.ids for encoding in plain_reference.encode_batch_fast(chunk)]
        got_plain = gpt2_bpe.encode_batch(chunk, num_threads=2)
        for index, (got, expected) in enumerate(zip(got_plain, expected_plain)):
            assert got == expected, f"GPT2BPETokenizer differs on bench document {documents + index}"
        expected_special = [encoding.ids for encoding in special_reference.encode_batch_fast(chunk)]
        got_special = hf_gpt2.encode_batch(chunk, num_threads=2)
        for index, (got, expected) in enumerate(zip(got_special, expected_special)):
            assert got == expected, f"HFGPT2Tokenizer differs on bench document {documents + index}"
        documents += len(chunk)
        tokens += sum(map(len, got_plain))
    assert documents == 20120
    assert tokens > 5_000_000


@pytest.mark.slow
def test_tokenizer_json_fast_path_equals_hf_on_whole_bench_corpus(bench_corpus, trained_json):
    # GPT-2 as a tokenizer.json takes the same tiktoken build checked by the test above
    fast = build_tokenizer("HFTokenizer", trained_json)
    assert fast.backend == "tiktoken"
    reference = tokenizers.Tokenizer.from_file(str(trained_json))
    documents = 0
    for chunk in _chunks(_bench_documents(bench_corpus), 2000):
        expected = [encoding.ids for encoding in reference.encode_batch_fast(chunk)]
        for index, (got, want) in enumerate(zip(fast.encode_batch(chunk, num_threads=2), expected)):
            assert got == want, f"trained tokenizer.json differs on bench document {documents + index}"
        documents += len(chunk)
    assert documents == 20120


@pytest.mark.parametrize("tokenizer_type", ["GPT2BPETokenizer", "HFGPT2Tokenizer"])
def test_encode_numpy_equals_encode(tokenizer_type):
    tok = build_tokenizer(tokenizer_type, GPT2_VOCAB, GPT2_MERGES)
    for text in ["Hello world", "a <|endoftext|> b <|padding|>", "  \n\t spaces  ", "", "naïve 🚀 café"]:
        arr = tok.encode_numpy(text)
        assert arr.dtype == np.uint32 and arr.tolist() == tok.encode(text), text
