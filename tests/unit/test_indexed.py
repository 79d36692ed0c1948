"""neox.data.indexed against the Megatron/gpt-neox mmap format, built by hand from the spec."""
from __future__ import annotations

import gc
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from neox.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    best_dtype,
    data_file_path,
    index_file_path,
)

MAGIC = b"MMIDIDX\x00\x00"
SPEC_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}

# (items of one document..., ) per document; an empty item and a two-item document included.
DOCUMENTS: list[list[list[int]]] = [
    [[5, 6, 7]],
    [[1], [], [2, 3]],
    [[40000, 0, 65000, 9]],
    [[8, 8]],
]


def spec_files(dtype: np.dtype, items: list[list[int]], doc_idx: list[int]) -> tuple[bytes, bytes]:
    """The .bin and .idx bytes the format spec prescribes, derived without our writer."""
    dtype = np.dtype(dtype)
    data = b"".join(np.array(item, dtype=dtype).tobytes() for item in items)
    pointers, address = [], 0
    for item in items:
        pointers.append(address)
        address += len(item) * dtype.itemsize
    index = MAGIC + struct.pack("<Q", 1) + struct.pack("<B", SPEC_CODES[dtype])
    index += struct.pack("<Q", len(items)) + struct.pack("<Q", len(doc_idx))
    index += struct.pack(f"<{len(items)}i", *(len(item) for item in items))
    index += struct.pack(f"<{len(items)}q", *pointers)
    index += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    return data, index


def flatten(documents: list[list[list[int]]]) -> tuple[list[list[int]], list[int]]:
    items, doc_idx = [], [0]
    for document in documents:
        items.extend(document)
        doc_idx.append(len(items))
    return items, doc_idx


def write_pair(prefix: Path, data: bytes, index: bytes) -> None:
    data_file_path(prefix).write_bytes(data)
    index_file_path(prefix).write_bytes(index)


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(params=[np.uint16, np.int32], ids=["uint16", "int32"])
def dtype(request: pytest.FixtureRequest) -> np.dtype:
    return np.dtype(request.param)


# -- format -------------------------------------------------------------------------------------
def test_writer_bytes_match_spec(tmp_path: Path, dtype: np.dtype) -> None:
    items, doc_idx = flatten(DOCUMENTS)
    expected_bin, expected_idx = spec_files(dtype, items, doc_idx)
    prefix = tmp_path / "ds"
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for document in DOCUMENTS:
            for item in document:
                writer.add_item(item)
            writer.end_document()
    assert data_file_path(prefix).read_bytes() == expected_bin
    assert index_file_path(prefix).read_bytes() == expected_idx
    assert writer.num_tokens == sum(len(i) for i in items) and writer.num_documents == len(DOCUMENTS)


def test_header_layout_is_34_bytes_then_arrays(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        writer.add_document([1, 2, 3])
        writer.add_document([4])
    raw = index_file_path(prefix).read_bytes()
    assert raw[:9] == MAGIC
    assert struct.unpack_from("<QBQQ", raw, 9) == (1, 4, 2, 3)
    assert np.frombuffer(raw, "<i4", 2, 34).tolist() == [3, 1]
    assert np.frombuffer(raw, "<i8", 2, 42).tolist() == [0, 12]
    assert np.frombuffer(raw, "<i8", 3, 58).tolist() == [0, 1, 2]
    assert len(raw) == 82


def test_reader_reads_hand_built_files(tmp_path: Path, dtype: np.dtype) -> None:
    items, doc_idx = flatten(DOCUMENTS)
    prefix = tmp_path / "hand"
    write_pair(prefix, *spec_files(dtype, items, doc_idx))
    ds = IndexedDataset(prefix)
    assert ds.dtype == dtype
    assert len(ds) == len(items) and ds.num_documents == len(DOCUMENTS)
    assert [ds[i].tolist() for i in range(len(ds))] == items
    assert ds.sizes.tolist() == [len(i) for i in items]
    assert ds.doc_idx.tolist() == doc_idx
    assert ds.pointers.tolist()[1] == 3 * dtype.itemsize
    assert ds.num_tokens == sum(len(i) for i in items)
    assert ds[-1].tolist() == items[-1]
    assert [a.tolist() for a in ds[1:4]] == items[1:4]
    assert ds.get(4, 2).tolist() == [65000, 9]
    assert ds.get(4, 1, 2).tolist() == [0, 65000]
    assert ds.get_document(1).tolist() == [1, 2, 3]
    assert ds.get_document(-1).tolist() == [8, 8]
    assert ds[0].dtype == dtype


def test_round_trip_random(tmp_path: Path, dtype: np.dtype) -> None:
    rng = np.random.default_rng(0)
    high = np.iinfo(dtype).max
    documents = [rng.integers(0, high, size=rng.integers(0, 50), dtype=np.int64) for _ in range(300)]
    prefix = tmp_path / "rt"
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for document in documents:
            writer.add_document(document)
    ds = IndexedDataset(prefix)
    assert len(ds) == 300 and ds.num_documents == 300
    for document, stored in zip(documents, (ds[i] for i in range(len(ds)))):
        np.testing.assert_array_equal(stored, document)
    restored = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(restored[123], documents[123])


def test_empty_dataset_round_trip(tmp_path: Path) -> None:
    prefix = tmp_path / "empty"
    IndexedDatasetWriter(prefix, np.uint16).finalize()
    assert data_file_path(prefix).stat().st_size == 0
    assert index_file_path(prefix).read_bytes() == spec_files(np.uint16, [], [0])[1]
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0 and ds[0:0] == []


def test_add_documents_matches_repeated_add_document(tmp_path: Path, dtype: np.dtype) -> None:
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 20, size=64)
    flat = rng.integers(0, 60000, size=int(lengths.sum()), dtype=np.int64)
    with IndexedDatasetWriter(tmp_path / "one", dtype) as writer:
        for piece in np.split(flat, np.cumsum(lengths)[:-1]):
            writer.add_document(piece)
    with IndexedDatasetWriter(tmp_path / "many", dtype) as writer:
        writer.add_documents(flat[:0], lengths[:0])
        cut = 10
        writer.add_documents(flat[: lengths[:cut].sum()], lengths[:cut])
        writer.add_documents(flat[lengths[:cut].sum() :], lengths[cut:])
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"many{suffix}").read_bytes()


def test_add_documents_rejects_bad_lengths(tmp_path: Path) -> None:
    writer = IndexedDatasetWriter(tmp_path / "bad", np.uint16)
    with pytest.raises(IndexedDatasetError, match="sum to 5"):
        writer.add_documents(np.arange(4), np.array([2, 3]))
    with pytest.raises(IndexedDatasetError, match="0.."):
        writer.add_documents(np.arange(4), np.array([5, -1]))
    writer.abort()


def test_append_dataset_concatenates_and_shifts_doc_idx(tmp_path: Path) -> None:
    items, doc_idx = flatten(DOCUMENTS)
    write_pair(tmp_path / "a", *spec_files(np.uint16, items, doc_idx))
    with IndexedDatasetWriter(tmp_path / "b", np.uint16) as writer:
        writer.add_document([11, 12])
        writer.append_dataset(tmp_path / "a")
        writer.add_document([13])
    merged = IndexedDataset(tmp_path / "b")
    assert [merged[i].tolist() for i in range(len(merged))] == [[11, 12], *items, [13]]
    assert merged.doc_idx.tolist() == [0, 1] + [1 + d for d in doc_idx[1:]] + [len(items) + 2]
    assert writer.num_tokens == merged.num_tokens == 3 + sum(len(i) for i in items)


def test_append_dataset_rejects_other_dtype(tmp_path: Path) -> None:
    with IndexedDatasetWriter(tmp_path / "a", np.int32) as writer:
        writer.add_document([1])
    with pytest.raises(IndexedDatasetError, match="int32"):
        with IndexedDatasetWriter(tmp_path / "b", np.uint16) as writer:
            writer.append_dataset(tmp_path / "a")
    assert files_in(tmp_path) == ["a.bin", "a.idx"]


# -- write errors and atomicity ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "tokens", "bad"),
    [(np.uint16, [1, 65536], "65536"), (np.uint16, [-1, 3], "-1"), (np.int32, [2**31], str(2**31))],
)
def test_token_overflow_raises(tmp_path: Path, dtype: type, tokens: list[int], bad: str) -> None:
    writer = IndexedDatasetWriter(tmp_path / "o", dtype)
    with pytest.raises(IndexedDatasetError, match=f"token id {bad} does not fit"):
        writer.add_item(np.array(tokens, dtype=np.int64))
    with pytest.raises(IndexedDatasetError, match="does not fit"):
        writer.add_documents(np.array(tokens, dtype=np.int64), np.array([len(tokens)]))
    writer.add_document([0, 65535] if dtype is np.uint16 else [-5, 2**31 - 1])
    writer.finalize()
    assert IndexedDataset(tmp_path / "o").num_tokens == 2


def test_non_integer_tokens_and_dtypes_rejected(tmp_path: Path) -> None:
    with pytest.raises(IndexedDatasetError, match="cannot be written"):
        IndexedDatasetWriter(tmp_path / "f", np.float32)
    writer = IndexedDatasetWriter(tmp_path / "f", np.uint16)
    with pytest.raises(IndexedDatasetError, match="integers"):
        writer.add_item([1.5, 2.0])
    with pytest.raises(IndexedDatasetError, match="1-D"):
        writer.add_item([[1, 2]])
    writer.abort()
    assert files_in(tmp_path) == []


def test_exception_inside_with_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(tmp_path / "x", np.uint16) as writer:
            writer.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert files_in(tmp_path) == []


def test_writer_never_finalized_leaves_nothing(tmp_path: Path) -> None:
    writer = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    writer.add_document(list(range(1000)))
    assert not IndexedDataset.exists(tmp_path / "x")
    assert all(name.endswith(".tmp") for name in files_in(tmp_path))
    del writer
    gc.collect()
    assert files_in(tmp_path) == []


def test_existing_output_replaced_only_at_finalize(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([1, 2])
    old = (data_file_path(prefix).read_bytes(), index_file_path(prefix).read_bytes())

    writer = IndexedDatasetWriter(prefix, np.uint16)
    writer.add_document([7, 8, 9])
    assert (data_file_path(prefix).read_bytes(), index_file_path(prefix).read_bytes()) == old
    writer.abort()
    assert (data_file_path(prefix).read_bytes(), index_file_path(prefix).read_bytes()) == old
    assert files_in(tmp_path) == ["ds.bin", "ds.idx"]

    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([7, 8, 9])
        assert IndexedDataset(prefix)[0].tolist() == [1, 2]
    assert IndexedDataset(prefix)[0].tolist() == [7, 8, 9]
    assert files_in(tmp_path) == ["ds.bin", "ds.idx"]


def test_finalize_never_exposes_a_mismatched_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = tmp_path / "ds"
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([1, 2])
    real_replace = os.replace
    seen: list[tuple[str, bool]] = []

    def spy(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        # Before each rename: is there a valid-looking pair that mixes old and new files?
        seen.append((Path(dst).name, index_file_path(prefix).exists()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([3, 4, 5])
    assert seen == [("ds.bin", False), ("ds.idx", False)]
    assert IndexedDataset(prefix)[0].tolist() == [3, 4, 5]


def test_finalize_twice_or_write_after_finalize_raises(tmp_path: Path) -> None:
    writer = IndexedDatasetWriter(tmp_path / "d", np.uint16)
    writer.finalize()
    with pytest.raises(IndexedDatasetError, match="already finalized"):
        writer.add_item([1])
    with pytest.raises(IndexedDatasetError, match="already finalized"):
        writer.finalize()


# -- read errors ---------------------------------------------------------------------------------
@pytest.fixture
def good_pair(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    items, doc_idx = flatten(DOCUMENTS)
    data, index = spec_files(np.uint16, items, doc_idx)
    return tmp_path / "ds", data, index


@pytest.mark.parametrize("missing", [".bin", ".idx"])
def test_missing_file(good_pair: tuple[Path, bytes, bytes], missing: str) -> None:
    prefix, data, index = good_pair
    write_pair(prefix, data, index)
    Path(f"{prefix}{missing}").unlink()
    assert not IndexedDataset.exists(prefix)
    with pytest.raises(IndexedDatasetError, match=rf"ds\{missing} not found"):
        IndexedDataset(prefix)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda idx: b"TNTIDX\x00\x00" + idx[8:], "not an mmap indexed dataset"),
        (lambda idx: idx[:9] + struct.pack("<Q", 2) + idx[17:], "version 2"),
        (lambda idx: idx[:17] + b"\x09" + idx[18:], "unknown dtype code 9"),
        (lambda idx: idx[:20], "truncated"),
        (lambda idx: idx[:-1], "truncated"),
        (lambda idx: idx + b"\x00", "bytes after the document index"),
        (lambda idx: idx[:-8] + struct.pack("<q", 99), "corrupt document index"),
        (lambda idx: idx[:-40] + struct.pack("<q", 1) + idx[-32:], "corrupt document index"),
    ],
    ids=["magic", "version", "dtype-code", "short-header", "short-arrays", "trailing", "doc-idx-end", "doc-idx-start"],
)
def test_corrupt_index(good_pair: tuple[Path, bytes, bytes], corrupt, message: str) -> None:
    prefix, data, index = good_pair
    write_pair(prefix, data, corrupt(index))
    with pytest.raises(IndexedDatasetError, match=message) as info:
        IndexedDataset(prefix)
    assert "ds.idx" in str(info.value)


@pytest.mark.parametrize("delta", [-2, 2])
def test_bin_size_disagrees_with_index(good_pair: tuple[Path, bytes, bytes], delta: int) -> None:
    prefix, data, index = good_pair
    write_pair(prefix, data[:delta] if delta < 0 else data + b"\x00" * delta, index)
    with pytest.raises(IndexedDatasetError, match="ds.bin holds") as info:
        IndexedDataset(prefix)
    assert "mismatched" in str(info.value)


def test_out_of_range_access(good_pair: tuple[Path, bytes, bytes]) -> None:
    prefix, data, index = good_pair
    write_pair(prefix, data, index)
    ds = IndexedDataset(prefix)
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds.get(0, 2, 5)
    with pytest.raises(IndexError):
        ds.get_document(len(DOCUMENTS))
    with pytest.raises(IndexError, match="contiguous"):
        ds[0:4:2]


def test_best_dtype_follows_gpt_neox_rule() -> None:
    assert best_dtype(50257) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(128256) == np.int32


def test_paths_append_suffix_without_touching_dots(tmp_path: Path) -> None:
    assert data_file_path(tmp_path / "pile.v1_text_document") == tmp_path / "pile.v1_text_document.bin"
    assert index_file_path("a/b") == Path("a/b.idx")
