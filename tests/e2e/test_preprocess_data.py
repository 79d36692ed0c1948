"""tools/preprocess_data.py run as a user runs it, its output checked byte by byte against a
dataset built by hand from a reference tokenizer (HF `tokenizers`, independent of neox.tokenizer)."""
from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import zstandard
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from conftest import CORPORA, GPT2_MERGES, GPT2_VOCAB, NEOX20B_TOKENIZER, REPO_ROOT
from neox.data.sources import iter_texts

PYTHON = sys.executable
TOOL = REPO_ROOT / "tools" / "preprocess_data.py"
GPT2_ARGS = ["--tokenizer-type", "HFGPT2Tokenizer", "--vocab-file", str(GPT2_VOCAB), "--merge-file", str(GPT2_MERGES)]
NEOX_ARGS = ["--tokenizer-type", "HFTokenizer", "--vocab-file", str(NEOX20B_TOKENIZER)]
GPT2_EOD = 50256
DOCS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,\n"
    "must be in want of a wife.",
    "Naïve café déjà vu — “quotes”, tabs\tand emoji 🚀 survive byte-level BPE.",
    "  leading spaces and trailing newline\n",
    "def f(x):\n    return x ** 2  # code\n",
]


def run_tool(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([PYTHON, str(TOOL), *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_ok(*args: str | Path) -> subprocess.CompletedProcess[str]:
    result = run_tool(*args)
    assert result.returncode == 0, result.stderr
    return result


def assert_clean_failure(result: subprocess.CompletedProcess[str], *fragments: str, code: int = 2) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], result.stderr


def outputs_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".bin" in p.name or ".idx" in p.name)


# -- the reference ---------------------------------------------------------------------------


def gpt2_reference() -> tokenizers.Tokenizer:
    """GPT-2 as transformers' GPT2TokenizerFast builds it, plus gpt-neox's <|padding|> special token."""
    reference = tokenizers.Tokenizer(models.BPE.from_file(str(GPT2_VOCAB), str(GPT2_MERGES)))
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    reference.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|padding|>")])
    return reference


def reference_documents(texts: list[str], reference: tokenizers.Tokenizer, eod: int | None) -> list[list[int]]:
    documents = []
    for encoding in reference.encode_batch(texts, add_special_tokens=False):
        if encoding.ids:
            documents.append(list(encoding.ids) + ([eod] if eod is not None else []))
    return documents


def expected_files(documents: list[list[int]], dtype: np.dtype) -> tuple[bytes, bytes]:
    """The .bin and .idx gpt-neox writes for one-item documents, assembled field by field."""
    dtype_code = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}[np.dtype(dtype)]
    sizes = np.array([len(d) for d in documents], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(sizes.astype(np.int64) * np.dtype(dtype).itemsize)[:-1]]).astype(np.int64)
    doc_idx = np.arange(len(documents) + 1, dtype=np.int64)
    index = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", dtype_code)
             + struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
             + sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes())
    data = b"".join(np.asarray(d, dtype=dtype).tobytes() for d in documents)
    return data, index


def assert_dataset(prefix: Path, documents: list[list[int]], dtype: type = np.uint16) -> None:
    data, index = expected_files(documents, np.dtype(dtype))
    actual_data = Path(f"{prefix}.bin").read_bytes()
    if actual_data != data:  # find the first differing document for a readable failure
        tokens = np.frombuffer(actual_data, dtype=dtype)
        offset = 0
        for number, document in enumerate(documents):
            got = tokens[offset: offset + len(document)].tolist()
            assert got == document, f"document {number} differs"
            offset += len(document)
        assert len(tokens) == offset, "extra tokens at the end of the .bin"
    assert Path(f"{prefix}.idx").read_bytes() == index


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    elif path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def gpt2() -> tokenizers.Tokenizer:
    return gpt2_reference()


# -- identity with the reference ------------------------------------------------------------


def test_bundled_corpus_gpt2_is_byte_identical_to_reference(tmp_path: Path, gpt2: tokenizers.Tokenizer) -> None:
    corpus = CORPORA / "kjv.jsonl.zst"
    result = run_ok("--input", corpus, "--output-prefix", tmp_path / "kjv", *GPT2_ARGS, "--append-eod")
    documents = reference_documents(list(iter_texts([corpus])), gpt2, GPT2_EOD)
    assert len(documents) == 1188
    assert_dataset(tmp_path / "kjv_text_document", documents)
    tokens = sum(map(len, documents))
    assert f"done: 1188 documents, {tokens} tokens" in result.stdout
    assert "0 bad lines skipped" in result.stdout and "tokens/s" in result.stdout
    assert "tok/s" in result.stderr and "MB/s" in result.stderr  # the progress bar


def test_neox20b_tokenizer_json_on_bundled_corpus(tmp_path: Path) -> None:
    corpus = CORPORA / "shakespeare.jsonl.zst"
    run_ok("--input", corpus, "--output-prefix", tmp_path / "sh", *NEOX_ARGS, "--append-eod")
    reference = tokenizers.Tokenizer.from_file(str(NEOX20B_TOKENIZER))
    eod = reference.token_to_id("<|endoftext|>")
    assert eod == 0
    assert_dataset(tmp_path / "sh_text_document", reference_documents(list(iter_texts([corpus])), reference, eod))


def test_gpt2bpe_without_eod_and_with_ftfy(tmp_path: Path, gpt2: tokenizers.Tokenizer) -> None:
    import ftfy

    texts = DOCS + ["mojibake: cafÃ© â€œquotedâ€\x9d"]
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    run_ok("--input", source, "--output-prefix", tmp_path / "plain", "--tokenizer-type", "GPT2BPETokenizer",
           "--vocab-file", GPT2_VOCAB, "--merge-file", GPT2_MERGES)
    assert_dataset(tmp_path / "plain_text_document", reference_documents(texts, gpt2, None))
    run_ok("--input", source, "--output-prefix", tmp_path / "fixed", *GPT2_ARGS, "--ftfy", "--append-eod")
    fixed = [ftfy.fix_text(t) for t in texts]
    assert fixed[-1] != texts[-1]
    assert_dataset(tmp_path / "fixed_text_document", reference_documents(fixed, gpt2, GPT2_EOD))


def test_worker_counts_and_kinds_give_identical_output(tmp_path: Path) -> None:
    spec = str(CORPORA / "*.jsonl.zst")
    prefixes = {}
    for name, extra in {"one": ["--workers", "1"], "threads": ["--workers", "2", "--worker-kind", "thread",
                                                              "--batch-size", "7"],
                        "procs": ["--workers", "2"], "proc": ["--workers", "1", "--worker-kind", "process"]}.items():
        result = run_ok("--input", spec, "--output-prefix", tmp_path / name, *GPT2_ARGS, "--append-eod", *extra)
        assert "done: 1537 documents" in result.stdout  # 184 + 1188 + 165
        prefixes[name] = tmp_path / f"{name}_text_document"
    for ext in (".bin", ".idx"):
        first = Path(f"{prefixes['one']}{ext}").read_bytes()
        assert all(Path(f"{p}{ext}").read_bytes() == first for p in prefixes.values())


def test_char_level_and_sentencepiece_tokenizers(tmp_path: Path) -> None:
    import sentencepiece

    texts = list(iter_texts([CORPORA / "austen.jsonl.zst"]))[:40]
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    run_ok("--input", source, "--output-prefix", tmp_path / "chars", "--tokenizer-type", "CharLevelTokenizer",
           "--append-eod", "--workers", "2", "--worker-kind", "process")
    assert_dataset(tmp_path / "chars_text_document", [list(t.encode("utf-8")) + [0] for t in texts])

    (tmp_path / "train.txt").write_text("\n".join(texts), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "spm"), vocab_size=400, model_type="bpe",
        user_defined_symbols=["<|endoftext|>"], minloglevel=2, num_threads=1,
    )
    model = tmp_path / "spm.model"
    run_ok("--input", source, "--output-prefix", tmp_path / "sp", "--tokenizer-type", "SPMTokenizer",
           "--vocab-file", model, "--append-eod")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
    eod = processor.piece_to_id("<|endoftext|>")
    assert_dataset(tmp_path / "sp_text_document", [processor.encode(t) + [eod] for t in texts])


def test_list_and_array_encoding_paths_agree() -> None:
    """Tokenizers may offer encode_numpy (GIL-free threads); both paths must write the same tokens."""
    from types import SimpleNamespace

    from neox.tokenizer import TokenizerError, build_tokenizer
    from tools.preprocess_data import BatchEncoder

    real = build_tokenizer("HFGPT2Tokenizer", GPT2_VOCAB, GPT2_MERGES)
    as_arrays = SimpleNamespace(name=real.name, vocab_size=real.vocab_size, eod=real.eod,
                                encode_numpy=lambda text: np.asarray(real.encode(text), dtype=np.uint32))
    texts = DOCS + ["", " "]
    for append_eod in (False, True):
        from_lists = BatchEncoder(real, np.dtype(np.uint16), append_eod, ftfy=False).encode_column(texts)
        from_arrays = BatchEncoder(as_arrays, np.dtype(np.uint16), append_eod, ftfy=False).encode_column(texts)
        assert from_lists.flat.dtype == from_arrays.flat.dtype == np.uint16
        assert from_lists.flat.tolist() == from_arrays.flat.tolist()
        assert from_lists.lengths.tolist() == from_arrays.lengths.tolist()
        assert len(from_lists.lengths) == len(DOCS) + 1  # "" dropped, " " kept (one space token)
        assert from_lists.lengths.sum() == from_lists.flat.size
    too_big = SimpleNamespace(name="Broken", vocab_size=10, eod=3,
                              encode_batch=lambda texts, num_threads=1: [[70_000] for _ in texts],
                              encode_numpy=None)
    with pytest.raises(TokenizerError, match="does not fit the output dtype uint16"):
        BatchEncoder(too_big, np.dtype(np.uint16), True, ftfy=False).encode_column(["x"])
    too_big.encode_numpy = lambda text: np.array([70_000], dtype=np.int64)
    with pytest.raises(TokenizerError, match=r"does not fit the output dtype uint16 .*ids span 3\.\.70000"):
        BatchEncoder(too_big, np.dtype(np.uint16), True, ftfy=False).encode_column(["x"])


# -- input kinds and keys -------------------------------------------------------------------


def make_input(kind: str, directory: Path, texts: list[str]) -> Path:
    rows = [{"text": t, "id": i} for i, t in enumerate(texts)]
    if kind in ("jsonl", "jsonl.zst", "jsonl.gz", "json.gz"):
        return write_jsonl(directory / f"in.{kind}", rows)
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = directory / "in.parquet"
        pq.write_table(pa.table({"text": texts}), path, row_group_size=2)
        return path
    if kind == "hf-dataset":
        import datasets

        path = directory / "hf"
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(path))
        return path
    if kind == "txt-files":
        for i, text in enumerate(texts):
            (directory / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
        return directory / "doc*.txt"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.zst", "jsonl.gz", "json.gz", "parquet", "hf-dataset", "txt-files"])
def test_every_input_kind(tmp_path: Path, kind: str, gpt2: tokenizers.Tokenizer) -> None:
    # gpt-neox drops empty documents only: whitespace-only text is a document of whitespace tokens
    texts = DOCS + ["", "   \n"]
    kept = DOCS + ["   \n"]
    source = make_input(kind, tmp_path, texts)
    result = run_ok("--input", source, "--output-prefix", tmp_path / "out", *GPT2_ARGS, "--append-eod",
                    "--num-docs", str(len(texts)))
    assert_dataset(tmp_path / "out_text_document", reference_documents(kept, gpt2, GPT2_EOD))
    assert f"{len(kept)}/{len(texts)}" in result.stderr  # --num-docs gives the bar its total
    assert f"done: {len(kept)} documents" in result.stdout and "1 empty documents dropped" in result.stdout


def test_txt_paragraph_mode(tmp_path: Path, gpt2: tokenizers.Tokenizer) -> None:
    source = tmp_path / "book.txt"
    source.write_text("First paragraph,\ntwo lines.\n\n\nSecond one.\n\nThird.\n", encoding="utf-8")
    run_ok("--input", source, "--output-prefix", tmp_path / "p", *GPT2_ARGS, "--append-eod", "--txt-mode", "paragraph")
    paragraphs = ["First paragraph,\ntwo lines.", "Second one.", "Third."]
    assert_dataset(tmp_path / "p_text_document", reference_documents(paragraphs, gpt2, GPT2_EOD))


def test_several_jsonl_keys_write_one_dataset_each(tmp_path: Path, gpt2: tokenizers.Tokenizer) -> None:
    rows = [{"title": f"Title {i}", "body": t} for i, t in enumerate(DOCS)] + [{"title": "only a title", "body": ""}]
    source = write_jsonl(tmp_path / "in.jsonl.zst", rows)
    result = run_ok("--input", source, "--output-prefix", tmp_path / "multi", *GPT2_ARGS, "--append-eod",
                    "--jsonl-keys", "title", "body", "--workers", "2", "--batch-size", "2")
    assert outputs_in(tmp_path) == ["multi_body_document.bin", "multi_body_document.idx",
                                    "multi_title_document.bin", "multi_title_document.idx"]
    titles = [r["title"] for r in rows]
    assert_dataset(tmp_path / "multi_title_document", reference_documents(titles, gpt2, GPT2_EOD))
    assert_dataset(tmp_path / "multi_body_document", reference_documents(DOCS, gpt2, GPT2_EOD))
    assert "multi_title_document: 5 docs" in result.stdout and "multi_body_document: 4 docs" in result.stdout


def test_int32_tokens_for_a_large_vocabulary(tmp_path: Path) -> None:
    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000, "<|endoftext|>": 70_001}
    word_level = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer_json = tmp_path / "tokenizer.json"
    word_level.save(str(tokenizer_json))
    texts = ["w1 w69999 w65535", "w65536 unknown w0"]
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    run_ok("--input", source, "--output-prefix", tmp_path / "big", "--tokenizer-type", "HFTokenizer",
           "--vocab-file", tokenizer_json, "--append-eod")
    documents = [[1, 69999, 65535, 70001], [65536, 70000, 0, 70001]]
    assert reference_documents(texts, word_level, 70001) == documents
    assert_dataset(tmp_path / "big_text_document", documents, dtype=np.int32)


# -- errors ---------------------------------------------------------------------------------


def test_bad_line_stops_the_run_and_leaves_no_output(tmp_path: Path) -> None:
    rows = [{"text": f"document number {i} " * 20} for i in range(3000)]
    source = write_jsonl(tmp_path / "in.jsonl.zst", rows)
    data = zstandard.ZstdDecompressor().decompress(source.read_bytes()) + b'{"text": "cut\n'
    source.write_bytes(zstandard.ZstdCompressor().compress(data))
    out = tmp_path / "out"
    out.mkdir()
    result = run_tool("--input", source, "--output-prefix", out / "x", *GPT2_ARGS, "--batch-size", "16")
    assert_clean_failure(result, f"{source}:3001: malformed JSON line", "--skip-bad-lines")
    assert outputs_in(out) == []  # not even a temporary file

    result = run_ok("--input", source, "--output-prefix", out / "x", *GPT2_ARGS, "--skip-bad-lines")
    assert "done: 3000 documents" in result.stdout and "1 bad lines skipped" in result.stdout
    assert f"skipped: {source}:3001: malformed JSON line" in result.stderr
    assert outputs_in(out) == ["x_text_document.bin", "x_text_document.idx"]


@pytest.mark.parametrize(
    ("setup", "extra", "fragments"),
    [
        ("missing-key", ["--jsonl-keys", "body"], ["in.jsonl:1: key 'body' not found; keys present: 'text'"]),
        ("non-string", [], ["in.jsonl:2: value of key 'text' is int, expected a string"]),
        ("no-match", [], ["matches no file"]),
        ("unsupported", [], ["in.csv: unsupported input kind"]),
        ("missing-vocab", [], ["vocab_file", "does not exist"]),
        ("bad-workers", ["--workers", "0"], ["--workers must be >= 1"]),
    ],
)
def test_error_cases_exit_2_with_one_paragraph(tmp_path: Path, setup: str, extra: list[str],
                                               fragments: list[str]) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, {"text": 5 if setup == "non-string" else "ok"}])
    tokenizer_args = list(GPT2_ARGS)
    if setup == "no-match":
        source = tmp_path / "nothing-*.jsonl"
    elif setup == "unsupported":
        source = tmp_path / "in.csv"
        source.write_text("text\nhello\n")
    elif setup == "missing-vocab":
        tokenizer_args[tokenizer_args.index(str(GPT2_VOCAB))] = str(tmp_path / "absent.json")
    result = run_tool("--input", source, "--output-prefix", tmp_path / "out", *tokenizer_args, *extra)
    assert_clean_failure(result, *fragments)
    assert outputs_in(tmp_path) == []


def test_flags_gpt_neox_has_but_we_do_not_write_are_refused(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    result = run_tool("--input", source, "--output-prefix", tmp_path / "o", *GPT2_ARGS, "--dataset-impl", "lazy")
    assert result.returncode == 2 and "invalid choice: 'lazy'" in result.stderr
    result = run_tool("--input", source, "--output-prefix", tmp_path / "o", *GPT2_ARGS, "--dataset-impl", "mmap")
    assert result.returncode == 0, result.stderr


# -- interruption ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~40 MB of text: the bundled corpora three times, long enough to interrupt mid-run."""
    path = tmp_path_factory.mktemp("large") / "large.jsonl.zst"
    texts = list(iter_texts(sorted(CORPORA.glob("*.jsonl.zst"))))
    with open(path, "wb") as raw, zstandard.ZstdCompressor(level=1).stream_writer(raw) as out:
        for copy in range(3):
            for text in texts:
                out.write((json.dumps({"text": f"[{copy}] {text}"}) + "\n").encode("utf-8"))
    return path


@pytest.mark.parametrize(("sig", "workers"), [(signal.SIGINT, 1), (signal.SIGINT, 2), (signal.SIGTERM, 1),
                                              (signal.SIGKILL, 1)])
def test_interrupted_run_leaves_no_dataset(tmp_path: Path, large_input: Path, sig: signal.Signals,
                                           workers: int) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # HFTokenizer one thread: the slowest path, so the run is surely still going when signalled.
    process = subprocess.Popen([PYTHON, str(TOOL), "--input", str(large_input), "--output-prefix", str(out / "big"),
                                *NEOX_ARGS, "--append-eod", "--workers", str(workers)], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        # wait until tokens are being written (the temporary .bin exists and has grown)
        while not any(p.stat().st_size > 1 << 20 for p in out.iterdir()):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never started writing"
            time.sleep(0.05)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not Path(f"{out / 'big_text_document'}.bin").exists()
    assert not Path(f"{out / 'big_text_document'}.idx").exists()
    if sig == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL  # no cleanup possible: only temporaries may remain
    else:
        assert process.returncode == 130, stderr
        assert "interrupted: no output written" in stderr and "Traceback" not in stderr
        assert outputs_in(out) == []  # temporaries removed too


# -- the benchmark corpus -------------------------------------------------------------------


@pytest.mark.slow
def test_bench_corpus_matches_upstream_figures_and_reference(tmp_path: Path, bench_corpus: Path,
                                                             gpt2: tokenizers.Tokenizer) -> None:
    result = run_tool("--input", bench_corpus, "--output-prefix", tmp_path / "bench", *GPT2_ARGS, "--append-eod",
                      "--workers", "2", timeout=600)
    assert result.returncode == 0, result.stderr
    prefix = tmp_path / "bench_text_document"
    # gpt-neox's tools/datasets/preprocess_data.py on the same corpus and flags wrote exactly these
    assert Path(f"{prefix}.bin").stat().st_size == 34_749_876
    assert Path(f"{prefix}.idx").stat().st_size == 402_442
    assert "done: 20120 documents, 17374938 tokens" in result.stdout
    documents = reference_documents(list(iter_texts([bench_corpus])), gpt2, GPT2_EOD)
    assert len(documents) == 20_120 and sum(map(len, documents)) == 17_374_938
    assert_dataset(prefix, documents)
