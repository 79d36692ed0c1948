"""neox.data.sources: every input kind streams the right documents, and every bad input is named."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from conftest import CORPORA
from neox.data.sources import (
    InputError,
    ReadStats,
    expand_inputs,
    is_hf_dataset_dir,
    iter_records,
    iter_texts,
)

DOCS = [
    {"text": "first document", "title": "one"},
    {"text": "second\n\ndocument with ünïcode ✓", "title": "two"},
    {"text": "third", "title": "three"},
]


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write(path: Path, rows: list[dict]) -> Path:
    data = jsonl_bytes(rows)
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    elif path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.zst", "a.jsonl.gz", "a.json.gz"])
def test_json_lines_formats_yield_every_text_in_order(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, DOCS)
    stats = ReadStats()
    assert list(iter_texts([path], stats=stats)) == [d["text"] for d in DOCS]
    assert stats.documents == 3 and stats.files == 1
    assert stats.bytes_read == len(jsonl_bytes(DOCS))  # uncompressed bytes, whatever the container


def test_other_key_and_several_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", DOCS)
    assert list(iter_texts([path], key="title")) == ["one", "two", "three"]
    assert list(iter_records([path], ("title", "text"))) == [(d["title"], d["text"]) for d in DOCS]


def test_stream_is_lazy_and_reports_the_bad_line_late_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "late.jsonl.zst"
    good = jsonl_bytes([{"text": f"doc {i}"} for i in range(1000)])
    path.write_bytes(zstandard.ZstdCompressor().compress(good + b'{"text": "broken\n'))
    texts = iter_texts([path])
    assert next(texts) == "doc 0"  # yielded before the reader ever saw the bad line
    with pytest.raises(InputError, match=rf"^{path}:1001: malformed JSON line") as err:
        list(texts)
    assert "--skip-bad-lines" in str(err.value)


def test_skip_bad_lines_counts_and_names_them(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "a"}\nnot json\n{"text": "b"}\n[1, 2]\n{"other": "x"}\n{"text": 5}\n\xff\xfe\n\n{"text": "c"}\n'
    )
    stats = ReadStats()
    assert list(iter_texts([path], skip_bad_lines=True, stats=stats)) == ["a", "b", "c"]
    assert stats.bad_lines_skipped == 5
    assert stats.documents == 3
    assert [m.split(": ")[0] for m in stats.bad_line_examples] == [f"{path}:{n}" for n in (2, 4, 5, 6, 7)]


def test_every_line_bad_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    path = write(tmp_path / "wrongkey.jsonl", DOCS)
    with pytest.raises(InputError, match=r"all 3 records were skipped.*key 'content' not found"):
        list(iter_texts([path], key="content", skip_bad_lines=True))


def test_missing_key_names_the_key_and_the_keys_present(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", DOCS)
    with pytest.raises(InputError, match=rf"^{path}:1: key 'content' not found; keys present: 'text', 'title'"):
        list(iter_texts([path], key="content"))


@pytest.mark.parametrize(("value", "kind"), [(None, "NoneType"), (["a", "b"], "list"), (3, "int")])
def test_non_string_value_is_an_error(tmp_path: Path, value: object, kind: str) -> None:
    path = write(tmp_path / "a.jsonl", [{"text": "ok"}, {"text": value}])
    with pytest.raises(InputError, match=rf"^{path}:2: value of key 'text' is {kind}, expected a string"):
        list(iter_texts([path]))


def test_non_object_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('"just a string"\n')
    with pytest.raises(InputError, match=rf"^{path}:1: expected a JSON object, got str"):
        list(iter_texts([path]))


def test_empty_documents_are_skipped_and_counted_whitespace_kept(tmp_path: Path) -> None:
    # gpt-neox drops only empty texts; a whitespace-only text is a document (and tokenizes to tokens)
    path = write(tmp_path / "a.jsonl", [{"text": ""}, {"text": "x"}, {"text": " \n\t "}, {"text": "y"}])
    stats = ReadStats()
    assert list(iter_texts([path], stats=stats)) == ["x", " \n\t ", "y"]
    assert stats.empty_skipped == 1 and stats.documents == 3


def test_records_keep_a_blank_value_while_another_key_has_text(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", [{"a": "", "b": "x"}, {"a": "", "b": ""}, {"a": " ", "b": ""}])
    stats = ReadStats()
    assert list(iter_records([path], ("a", "b"), stats=stats)) == [("", "x"), (" ", "")]
    assert stats.empty_skipped == 1


def test_truncated_zstd_stream_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl.zst"
    whole = zstandard.ZstdCompressor().compress(jsonl_bytes([{"text": "x" * 100 + str(i)} for i in range(5000)]))
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=rf"^{path}: corrupt or truncated compressed stream after line \d+"):
        list(iter_texts([path]))


def test_zstd_with_several_frames_and_a_last_line_without_newline(tmp_path: Path) -> None:
    compressor = zstandard.ZstdCompressor()
    path = tmp_path / "frames.jsonl.zst"
    long_text = "long " * 500_000  # one line spanning many read chunks
    frames = [
        compressor.compress(jsonl_bytes([{"text": "a"}, {"text": long_text}])),
        compressor.compress(b'{"text": "b"}\n{"text": '),  # a line split across two frames
        compressor.compress(b'"c"}\n{"text": "d"}'),
    ]
    path.write_bytes(b"".join(frames))
    assert list(iter_texts([path])) == ["a", long_text, "b", "c", "d"]


def test_bad_gzip_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "fake.jsonl.gz"
    path.write_bytes(b"this is not gzip data at all\n")
    with pytest.raises(InputError, match=rf"^{path}: cannot read after line 0: Not a gzipped file"):
        list(iter_texts([path]))


def test_truncated_gzip_stream_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress(jsonl_bytes([{"text": "y" * 100 + str(i)} for i in range(5000)]))
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=rf"^{path}: corrupt or truncated compressed stream"):
        list(iter_texts([path]))


def test_txt_file_mode_is_one_document_per_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("para one\nline two\n\npara two\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("  \n", encoding="utf-8")  # whitespace only: a document, as in gpt-neox
    (tmp_path / "c.txt").write_text("", encoding="utf-8")  # empty file: skipped
    stats = ReadStats()
    texts = list(iter_texts(expand_inputs(str(tmp_path / "*.txt")), stats=stats))
    assert texts == ["para one\nline two\n\npara two\n", "  \n"]
    assert stats.empty_skipped == 1


def test_txt_paragraph_mode_splits_on_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("\n\npara one\nline two\n\n \n\npara two\nend", encoding="utf-8")
    assert list(iter_texts([path], txt_mode="paragraph")) == ["para one\nline two", "para two\nend"]


def test_txt_invalid_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(InputError, match=rf"^{path}: not valid UTF-8 at byte 5"):
        list(iter_texts([path]))
    with pytest.raises(InputError, match=rf"^{path}:\d+: not valid UTF-8"):
        list(iter_texts([path], txt_mode="paragraph"))


def test_unknown_txt_mode(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="txt_mode must be one of"):
        list(iter_texts([write(tmp_path / "a.jsonl", DOCS)], txt_mode="line"))


def test_parquet_streams_by_batch(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i} " + "z" * (i % 7) for i in range(2500)]  # spans several 1024-row batches
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": texts, "n": list(range(2500))}), path, row_group_size=1000)
    stats = ReadStats()
    assert list(iter_texts([path], stats=stats)) == texts
    assert stats.documents == 2500


def test_parquet_errors(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"], "n": [1, 2, 3]}), path)
    with pytest.raises(InputError, match=rf"^{path}: parquet file has no column 'body'; columns present: 'text', 'n'"):
        list(iter_texts([path], key="body"))
    with pytest.raises(InputError, match=rf"^{path}: parquet file column 'n' has type int64, expected strings"):
        list(iter_texts([path], key="n"))
    with pytest.raises(InputError, match=rf"^{path}:2: value of column 'text' is null"):
        list(iter_texts([path]))
    stats = ReadStats()
    assert list(iter_texts([path], skip_bad_lines=True, stats=stats)) == ["a", "c"]
    assert stats.bad_lines_skipped == 1
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match=rf"^{broken}: not a readable parquet file"):
        list(iter_texts([broken]))


def test_hf_datasets_directory(tmp_path: Path) -> None:
    import datasets

    texts = [f"hf doc {i}" for i in range(1500)]
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": texts, "n": list(range(1500))}).save_to_disk(str(single))
    assert is_hf_dataset_dir(single)
    assert expand_inputs(str(single)) == [single]  # the directory itself, not its arrow files
    assert list(iter_texts(expand_inputs(str(single)))) == texts

    one_split = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:5]})}).save_to_disk(str(one_split))
    assert list(iter_texts([one_split])) == texts[:5]

    two_splits = tmp_path / "two"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a"]}),
        "test": datasets.Dataset.from_dict({"text": ["b"]}),
    }).save_to_disk(str(two_splits))
    with pytest.raises(InputError, match=r"DatasetDict with splits \['train', 'test'\]; pass one split's directory"):
        list(iter_texts([two_splits]))
    assert list(iter_texts([two_splits / "test"])) == ["b"]

    with pytest.raises(InputError, match=rf"^{single}: dataset has no column 'body'; columns present: 'text', 'n'"):
        list(iter_texts([single], key="body"))
    with pytest.raises(InputError, match=rf"^{single}: dataset column 'n' has type int64, expected strings"):
        list(iter_texts([single], key="n"))


def test_expand_inputs_globs_commas_dirs_and_dedup(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl.zst", "c.txt"):
        write(tmp_path / name, DOCS)
    (tmp_path / "notes.md").write_text("ignored in a directory listing")
    spec = f"{tmp_path}/*.jsonl*,{tmp_path / 'c.txt'},{tmp_path / 'b.jsonl'}"
    assert expand_inputs(spec) == [tmp_path / "a.jsonl.zst", tmp_path / "b.jsonl", tmp_path / "c.txt"]
    assert expand_inputs([str(tmp_path / "c.txt"), f" {tmp_path / 'b.jsonl'} "]) == [tmp_path / "c.txt",
                                                                                     tmp_path / "b.jsonl"]
    assert expand_inputs(str(tmp_path)) == [tmp_path / "a.jsonl.zst", tmp_path / "b.jsonl", tmp_path / "c.txt"]
    assert expand_inputs(str(CORPORA / "*.jsonl.zst")) == sorted(CORPORA.glob("*.jsonl.zst"))


def test_expand_inputs_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"input spec '.*/\*\.jsonl' matches no file"):
        expand_inputs(str(tmp_path / "*.jsonl"))
    with pytest.raises(InputError, match=r"missing\.jsonl does not exist"):
        expand_inputs(str(tmp_path / "missing.jsonl"))
    (tmp_path / "data.csv").write_text("text\nx\n")
    with pytest.raises(InputError, match=rf"^{tmp_path / 'data.csv'}: unsupported input kind; expected one of"):
        expand_inputs(str(tmp_path / "data.csv"))
    with pytest.raises(InputError, match="unsupported input kind"):
        expand_inputs(str(tmp_path / "*.csv"))  # a glob does not silently drop what it cannot read
    with pytest.raises(InputError, match="holds no .jsonl.zst"):
        expand_inputs(str(tmp_path))
    with pytest.raises(InputError, match="no input given"):
        expand_inputs(" , ")
    with pytest.raises(InputError, match="unsupported input kind"):
        list(iter_texts([tmp_path / "data.csv"]))


def test_bundled_corpora_read_completely() -> None:
    stats = ReadStats()
    counts = {p.name: sum(1 for _ in iter_texts([p], stats=stats)) for p in sorted(CORPORA.glob("*.jsonl.zst"))}
    # document counts from the shared data README
    assert counts == {"austen.jsonl.zst": 184, "kjv.jsonl.zst": 1188, "shakespeare.jsonl.zst": 165}
    assert stats.bad_lines_skipped == 0 and stats.empty_skipped == 0
