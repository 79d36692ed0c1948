"""tools/merge_datasets.py and tools/inspect_dataset.py run as a user runs them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neox.data.indexed import IndexedDataset, IndexedDatasetWriter
from conftest import GPT2_MERGES, GPT2_VOCAB, REPO_ROOT

# The interpreter running the tests is the project's .venv python under `make test`.
PYTHON = sys.executable
TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,\n"
    "must be in want of a wife.",
    "Naïve café déjà vu — “quotes”, tabs\tand emoji 🚀 survive byte-level BPE.",
    "  leading spaces and trailing newline\n",
]


def run_tool(script: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [PYTHON, str(REPO_ROOT / "tools" / script), *map(str, args)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def build_shard(prefix: Path, documents: list[list[list[int]]], dtype: type = np.uint16) -> None:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for document in documents:
            for item in document:
                writer.add_item(item)
            writer.end_document()


def random_documents(seed: int, count: int) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [
        [rng.integers(0, 50257, size=rng.integers(0, 30)).tolist() for _ in range(rng.integers(1, 4))]
        for _ in range(count)
    ]


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, dict[str, list[list[list[int]]]]]:
    directory = tmp_path / "shards"
    contents = {name: random_documents(seed, count) for seed, (name, count) in enumerate([("b", 7), ("a", 5), ("c", 9)])}
    for name, documents in contents.items():
        build_shard(directory / name, documents)
    return directory, contents


def expected_merge(parts: list[list[list[list[int]]]]) -> tuple[list[list[int]], list[int]]:
    items, doc_idx = [], [0]
    for documents in parts:
        for document in documents:
            items.extend(document)
            doc_idx.append(len(items))
    return items, doc_idx


def test_merge_directory_in_name_order(tmp_path: Path, shards) -> None:
    directory, contents = shards
    result = run_tool("merge_datasets.py", "--input", directory, "--output-prefix", tmp_path / "out" / "merged")
    assert result.returncode == 0, result.stderr
    items, doc_idx = expected_merge([contents["a"], contents["b"], contents["c"]])
    merged = IndexedDataset(tmp_path / "out" / "merged")
    assert [merged[i].tolist() for i in range(len(merged))] == items
    assert merged.doc_idx.tolist() == doc_idx
    assert merged.num_documents == 21 and merged.dtype == np.uint16
    concatenated = b"".join((directory / f"{name}.bin").read_bytes() for name in "abc")
    assert (tmp_path / "out" / "merged.bin").read_bytes() == concatenated
    assert f"21 documents, {len(items)} sequences" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["merged.bin", "merged.idx"]


def test_merge_prefixes_in_given_order(tmp_path: Path, shards) -> None:
    directory, contents = shards
    result = run_tool(
        "merge_datasets.py", "--input", directory / "c", directory / "a.idx", "--output-prefix", tmp_path / "ca"
    )
    assert result.returncode == 0, result.stderr
    items, doc_idx = expected_merge([contents["c"], contents["a"]])
    merged = IndexedDataset(tmp_path / "ca")
    assert [merged[i].tolist() for i in range(len(merged))] == items
    assert merged.doc_idx.tolist() == doc_idx
    first_of_a = doc_idx[len(contents["c"])]
    assert merged.get_document(len(contents["c"])).tolist() == sum(contents["a"][0], [])
    assert merged[first_of_a].tolist() == contents["a"][0][0]


def test_merge_rejects_mixed_dtypes_without_writing(tmp_path: Path, shards) -> None:
    directory, _ = shards
    build_shard(directory / "d", [[[70000, 1]]], np.int32)
    result = run_tool("merge_datasets.py", "--input", directory, "--output-prefix", tmp_path / "bad")
    assert_clean_failure(result, "different token dtypes")
    assert "int32" in result.stderr and "uint16" in result.stderr
    assert not any(tmp_path.glob("bad*")) and not any(tmp_path.glob(".bad*"))


def test_merge_rejects_lone_half_and_missing_input(tmp_path: Path, shards) -> None:
    directory, _ = shards
    (directory / "c.idx").unlink()
    assert_clean_failure(
        run_tool("merge_datasets.py", "--input", directory, "--output-prefix", tmp_path / "x"), "no matching c.idx"
    )
    assert_clean_failure(
        run_tool("merge_datasets.py", "--input", tmp_path / "nope", "--output-prefix", tmp_path / "x"),
        "neither a directory nor a dataset prefix",
    )


def test_inspect_json_summary(tmp_path: Path) -> None:
    documents = random_documents(7, 40)
    build_shard(tmp_path / "ds", documents)
    result = run_tool("inspect_dataset.py", "--prefix", tmp_path / "ds", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    doc_lengths = np.array([sum(len(item) for item in document) for document in documents])
    seq_lengths = np.array([len(item) for document in documents for item in document])
    assert summary["dtype"] == "uint16"
    assert summary["num_documents"] == 40
    assert summary["num_sequences"] == len(seq_lengths)
    assert summary["num_tokens"] == int(seq_lengths.sum())
    assert summary["bin_bytes"] == 2 * int(seq_lengths.sum()) == (tmp_path / "ds.bin").stat().st_size
    assert summary["idx_bytes"] == 34 + 12 * len(seq_lengths) + 8 * 41
    assert summary["document_length"] == {
        "min": int(doc_lengths.min()), "mean": pytest.approx(float(doc_lengths.mean())), "max": int(doc_lengths.max())
    }
    assert summary["sequence_length"]["max"] == int(seq_lengths.max())
    histogram = summary["document_length_histogram"]
    assert sum(bucket["count"] for bucket in histogram) == 40
    for bucket in histogram:
        in_bucket = (doc_lengths >= bucket["low"]) & (doc_lengths < bucket["high"])
        assert bucket["count"] == int(in_bucket.sum())
    assert histogram[-1]["high"] > doc_lengths.max()


def test_inspect_text_report(tmp_path: Path) -> None:
    build_shard(tmp_path / "ds", [[[1, 2, 3]], [[4] * 10], [[5] * 10, [6]]])
    result = run_tool("inspect_dataset.py", "--prefix", tmp_path / "ds", "--sample", "0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "documents  3" in lines and "sequences  4" in lines and "tokens     24" in lines
    assert "document length (tokens): min 3  mean 8.0  max 11" in lines
    assert any(line.split("|")[0].strip() == "8-15" and line.split("|")[1].split()[0] == "2" for line in lines)
    assert lines[-2:] == ["--- sequence 0 (3 tokens) ---", "1 2 3"]


def gpt2_reference_encoder():
    """GPT-2 byte-level BPE straight from the `tokenizers` library, independent of neox.tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE.from_file(str(GPT2_VOCAB), str(GPT2_MERGES)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def test_inspect_decodes_samples_with_gpt2(tmp_path: Path) -> None:
    encoder = gpt2_reference_encoder()
    ids = [encoder.encode(text).ids for text in TEXTS]
    # Document 1 is split into two items to check that --document joins them.
    cut = len(ids[1]) // 2
    build_shard(tmp_path / "ds", [[ids[0]], [ids[1][:cut], ids[1][cut:]], [ids[2]]])
    result = run_tool(
        "inspect_dataset.py", "--prefix", tmp_path / "ds", "--json",
        "--sample", "0", "--sample", "3", "--document", "1",
        "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", GPT2_VOCAB, "--merge-file", GPT2_MERGES,
    )
    assert result.returncode == 0, result.stderr
    samples = json.loads(result.stdout)["samples"]
    assert [(s["kind"], s["index"]) for s in samples] == [("sequence", 0), ("sequence", 3), ("document", 1)]
    assert [s["text"] for s in samples] == [TEXTS[0], TEXTS[2], TEXTS[1]]
    assert samples[2]["tokens"] == ids[1]


def test_inspect_bad_input_exits_2(tmp_path: Path) -> None:
    build_shard(tmp_path / "ds", [[[1, 2]]])
    assert_clean_failure(run_tool("inspect_dataset.py", "--prefix", tmp_path / "ds", "--document", "5"), "--document 5")
    assert_clean_failure(run_tool("inspect_dataset.py", "--prefix", tmp_path / "missing"), "missing.idx not found")
    (tmp_path / "ds.bin").write_bytes(b"\x00")
    assert_clean_failure(run_tool("inspect_dataset.py", "--prefix", tmp_path / "ds"), "mismatched")
    assert_clean_failure(
        run_tool("inspect_dataset.py", "--prefix", tmp_path / "ds", "--vocab-file", GPT2_VOCAB), "--tokenizer-type"
    )
