"""GPT dataset indices, their cache, splits, blends and the train/valid/test builder, checked
against token streams rebuilt by hand from tiny datasets whose every token names its place."""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from neox.data import blend as blend_module
from neox.data import gpt_dataset as gpt_module
from neox.data import index_cache
from neox.data.blend import BlendedDataset, blending_indices
from neox.data.build import build_train_valid_test, parse_split, split_document_ranges, split_num_samples
from neox.data.errors import DataError
from neox.data.gpt_dataset import GPTDataset
from neox.data.indexed import IndexedDataset, IndexedDatasetWriter


def doc_tokens(doc: int, length: int) -> np.ndarray:
    """Token j of document d is 100*d + j: any token tells where it came from."""
    return 100 * doc + np.arange(length)


def write_dataset(prefix: Path, lengths: list[int], label_every: int | None = None) -> IndexedDataset:
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc, length in enumerate(lengths):
            writer.add_document(doc_tokens(doc, length))
    if label_every is not None:
        # Labels: the text, with every label_every-th token masked (-100).
        with IndexedDatasetWriter(f"{prefix}_label", np.int32) as writer:
            for doc, length in enumerate(lengths):
                tokens = doc_tokens(doc, length)
                tokens[::label_every] = -100
                writer.add_document(tokens)
    return IndexedDataset(prefix)


LENGTHS = [5, 0, 9, 3, 12, 1, 7, 4, 8, 6]  # 55 tokens, an empty and a one-token document
SEQ = 6


def expected_stream(ds: GPTDataset, documents: np.ndarray, lengths: list[int]) -> np.ndarray:
    """The concatenation of the documents in ds.doc_idx order, after checking that order is a
    fresh permutation of `documents` in each pass."""
    doc_idx = np.asarray(ds.doc_idx)
    passes = doc_idx.reshape(-1, len(documents))
    for order in passes:
        assert sorted(order.tolist()) == sorted(documents.tolist())
    return np.concatenate([doc_tokens(int(d), lengths[int(d)]) for d in doc_idx])


def test_every_sample_is_the_expected_slice_of_the_shuffled_stream(tmp_path: Path) -> None:
    indexed = write_dataset(tmp_path / "d", LENGTHS)
    documents = np.arange(len(LENGTHS))
    ds = GPTDataset("train", indexed, documents, 20, SEQ, seed=7)
    stream = expected_stream(ds, documents, LENGTHS)
    tokens_per_epoch = sum(LENGTHS)
    assert ds.num_epochs == 3  # 20 samples of 6 tokens need 120 tokens: 3 passes over 55
    assert len(ds) == -(-3 * tokens_per_epoch // SEQ)  # every sample starting in those passes
    for i in range(len(ds)):
        start = int(ds.shuffle_idx[i]) * SEQ
        sample = ds[i]
        assert sample.keys() == {"text"}
        assert sample["text"].dtype == np.int64 and sample["text"].shape == (SEQ + 1,)
        np.testing.assert_array_equal(sample["text"], stream[start : start + SEQ + 1])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_one_epoch_covers_every_token_and_epochs_are_served_in_order(tmp_path: Path) -> None:
    indexed = write_dataset(tmp_path / "d", LENGTHS)
    documents = np.arange(len(LENGTHS))
    tokens_per_epoch = sum(LENGTHS)
    # sample i starts at token 6i; epoch e holds the samples starting in tokens [55e, 55(e+1))
    bounds = [-(-e * tokens_per_epoch // SEQ) for e in range(4)]
    assert bounds == [0, 10, 19, 28]
    ds = GPTDataset("train", indexed, documents, 28, SEQ, seed=3)
    assert ds.num_epochs == 3 and len(ds) == 28
    all_tokens = set(np.concatenate([doc_tokens(d, n) for d, n in enumerate(LENGTHS)]).tolist())
    for epoch in range(3):
        served = range(bounds[epoch], bounds[epoch + 1])
        # the samples served in an epoch are a permutation of that epoch's samples...
        assert sorted(int(ds.shuffle_idx[i]) for i in served) == list(served)
        # ...and together hold every token of the data, except the first few tokens of the pass
        # that the previous epoch's last sample ran into (sample index bounds[epoch] - 1)
        seen = set(np.concatenate([ds[i]["text"] for i in served]).tolist())
        if epoch > 0:
            tail = int(np.flatnonzero(np.asarray(ds.shuffle_idx) == bounds[epoch] - 1)[0])
            assert not all_tokens <= seen
            seen |= set(ds[tail]["text"].tolist())
        assert all_tokens <= seen
    # each epoch has its own document order
    orders = np.asarray(ds.doc_idx).reshape(-1, len(documents))
    assert len({tuple(o) for o in orders}) == len(orders)


def test_more_samples_keep_the_order_of_earlier_epochs(tmp_path: Path) -> None:
    indexed = write_dataset(tmp_path / "d", LENGTHS)
    documents = np.arange(len(LENGTHS))
    short = GPTDataset("train", indexed, documents, 25, SEQ, seed=11)  # 3 epochs
    long = GPTDataset("train", indexed, documents, 95, SEQ, seed=11)  # 11 epochs
    assert (short.num_epochs, len(short), long.num_epochs) == (3, 28, 11)
    for i in range(len(short)):  # all 3 epochs of the short run, the tail of its last sample too
        np.testing.assert_array_equal(short[i]["text"], long[i]["text"])
    np.testing.assert_array_equal(short.doc_idx, long.doc_idx[: len(short.doc_idx)])
    other_seed = GPTDataset("train", indexed, documents, 25, SEQ, seed=12)
    assert any(not np.array_equal(short[i]["text"], other_seed[i]["text"]) for i in range(10))


def test_indices_are_cached_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    indexed = write_dataset(tmp_path / "d", LENGTHS)
    documents = np.arange(2, 9)
    first = GPTDataset("valid", indexed, documents, 12, SEQ, seed=5)
    assert first.build_seconds is not None
    cached = sorted(p.name for p in tmp_path.glob("d_valid_indexmap_*.npy"))
    assert len(cached) == 3

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("indices rebuilt although cached")

    monkeypatch.setattr(gpt_module, "build_index_mappings", no_rebuild)
    second = GPTDataset("valid", indexed, documents, 12, SEQ, seed=5)
    assert second.build_seconds is None and second.cache_dir == tmp_path.resolve()
    for name in ("doc_idx", "sample_idx", "shuffle_idx"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    # another document set is another cache entry
    with pytest.raises(AssertionError, match="rebuilt"):
        GPTDataset("valid", indexed, np.arange(1, 9), 12, SEQ, seed=5)
    assert not list(tmp_path.glob(".*.tmp"))


def _build_in_child(prefix: str, log: str) -> None:
    real_build = gpt_module.build_index_mappings

    def logged_build(*args: object, **kwargs: object) -> object:
        with open(log, "a") as stream:
            stream.write(f"{os.getpid()}\n")
        import time

        time.sleep(0.3)  # hold the lock long enough for the other process to queue on it
        return real_build(*args, **kwargs)

    gpt_module.build_index_mappings = logged_build
    ds = GPTDataset("train", IndexedDataset(prefix), np.arange(len(LENGTHS)), 30, SEQ, seed=9)
    np.save(f"{log}.{os.getpid()}.npy", np.stack([ds[i]["text"] for i in range(len(ds))]))


def test_concurrent_builds_from_two_processes_agree(tmp_path: Path) -> None:
    write_dataset(tmp_path / "d", LENGTHS)
    log = str(tmp_path / "builds.log")
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_build_in_child, args=(str(tmp_path / "d"), log)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert len(Path(log).read_text().split()) == 1  # one builder, the other waited and loaded
    first, second = (np.load(f"{log}.{child.pid}.npy") for child in children)
    np.testing.assert_array_equal(first, second)
    assert len(list(tmp_path.glob("d_train_indexmap_*.npy"))) == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_read_only_data_dir_falls_back_to_a_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    indexed = write_dataset(data_dir / "d", LENGTHS)
    real_open = index_cache._open_lock

    def read_only_data_dir(directory: Path, stem: str) -> int:
        if Path(directory).resolve() == data_dir.resolve():
            raise PermissionError(13, "Read-only file system")
        return real_open(directory, stem)

    monkeypatch.setattr(index_cache, "_open_lock", read_only_data_dir)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ds = GPTDataset("train", indexed, np.arange(len(LENGTHS)), 10, SEQ, seed=1)
    assert ds.cache_dir == tmp_path / "xdg" / "neox" / "index-cache"
    explicit = GPTDataset("train", indexed, np.arange(len(LENGTHS)), 11, SEQ, seed=1, cache_dir=tmp_path / "mine")
    assert explicit.cache_dir == tmp_path / "mine"
    assert not list(data_dir.glob("*.npy"))


def test_pickled_dataset_remaps_its_cache(tmp_path: Path) -> None:
    import pickle

    ds = GPTDataset("train", write_dataset(tmp_path / "d", LENGTHS), np.arange(10), 10, SEQ, seed=1)
    copy = pickle.loads(pickle.dumps(ds))
    assert isinstance(copy.shuffle_idx, np.memmap)
    for i in range(len(ds)):
        np.testing.assert_array_equal(copy[i]["text"], ds[i]["text"])


def test_label_dataset_follows_the_text(tmp_path: Path) -> None:
    indexed = write_dataset(tmp_path / "d", LENGTHS, label_every=3)
    label = IndexedDataset(f"{tmp_path / 'd'}_label")
    ds = GPTDataset("train", indexed, np.arange(len(LENGTHS)), 10, SEQ, seed=2, label_dataset=label)
    for i in range(len(ds)):
        item = ds[i]
        keep = item["label"] >= 0
        np.testing.assert_array_equal(item["label"][keep], item["text"][keep])
        assert np.all(item["label"][~keep] == -100)
        # masked exactly where the token is the 0th, 3rd, 6th... of its document
        np.testing.assert_array_equal(~keep, (item["text"] % 100) % 3 == 0)


def test_dataset_errors_name_the_problem(tmp_path: Path) -> None:
    indexed = write_dataset(tmp_path / "d", LENGTHS)
    with pytest.raises(DataError, match=r"has 4 tokens in 2 documents, too few .* seq_length \+ 1 = 7"):
        GPTDataset("valid", indexed, np.array([3, 5]), 1, SEQ, seed=0)
    with pytest.raises(DataError, match="document indices must lie in 0..9"):
        GPTDataset("train", indexed, np.array([0, 10]), 1, SEQ, seed=0)
    other = write_dataset(tmp_path / "other", LENGTHS[::-1])
    with pytest.raises(DataError, match="same sequence sizes"):
        GPTDataset("train", indexed, np.arange(10), 1, SEQ, seed=0, label_dataset=other)


# -- splits ---------------------------------------------------------------------------------------
def test_split_ranges_round_like_gpt_neox() -> None:
    assert parse_split("969, 30, 1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("8/2") == pytest.approx([0.8, 0.2, 0.0])
    assert split_document_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    # 3.33 rounds to 3 three times; the missing document moves every boundary up by one
    assert split_document_ranges("1,1,1", 10) == [(0, 4), (4, 7), (7, 10)]
    assert split_document_ranges("100,0,0", 7) == [(0, 7), (7, 7), (7, 7)]
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2"):
        with pytest.raises(DataError, match="split"):
            parse_split(bad)
    assert split_num_samples(100, 10, 5, 8) == (800, 11 * 5 * 8, 40)


def test_build_from_one_prefix_uses_disjoint_document_ranges(tmp_path: Path) -> None:
    lengths = [20 + d % 7 for d in range(30)]
    write_dataset(tmp_path / "d", lengths)
    train, valid, test = build_train_valid_test(
        data_path=str(tmp_path / "d"), train_data_paths=None, valid_data_paths=None, test_data_paths=None,
        train_data_weights=None, valid_data_weights=None, test_data_weights=None,
        split="20,6,4", seq_length=SEQ, seed=1, num_samples=(50, 10, 5),
    )
    for ds, (start, end) in zip((train, valid, test), [(0, 20), (20, 26), (26, 30)]):
        assert isinstance(ds, GPTDataset) and len(ds) >= ds.num_samples
        docs = {int(t) // 100 for i in range(len(ds)) for t in ds[i]["text"]}
        assert docs <= set(range(start, end)) and len(docs) >= 2
    none_needed = build_train_valid_test(
        data_path=str(tmp_path / "d"), train_data_paths=None, valid_data_paths=None, test_data_paths=None,
        train_data_weights=None, valid_data_weights=None, test_data_weights=None,
        split="100,0,0", seq_length=SEQ, seed=1, num_samples=(5, 0, 0),
    )
    assert none_needed[1] is None and none_needed[2] is None
    with pytest.raises(DataError, match=r"split '100,0,0' leaves the valid split of .* empty"):
        build_train_valid_test(
            data_path=str(tmp_path / "d"), train_data_paths=None, valid_data_paths=None, test_data_paths=None,
            train_data_weights=None, valid_data_weights=None, test_data_weights=None,
            split="100,0,0", seq_length=SEQ, seed=1, num_samples=(5, 3, 0),
        )


def test_build_from_path_lists_blends_and_reports_bad_keys(tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "a", [30] * 10)
    write_dataset(tmp_path / "b", [25] * 12, label_every=4)
    common = dict(
        data_path=None, test_data_paths=None, test_data_weights=None, seq_length=SEQ, seed=3,
        num_samples=(200, 40, 0),
    )
    # labels pair with data paths by position (gpt-neox's zip_longest): "a", second and past the list, has none
    train, valid, test = build_train_valid_test(
        train_data_paths=[str(tmp_path / "b"), str(tmp_path / "a")], train_data_weights=[1, 3],
        valid_data_paths=[str(tmp_path / "b")], valid_data_weights=None,
        train_label_data_paths=[f"{tmp_path / 'b'}_label"], valid_label_data_paths=[f"{tmp_path / 'b'}_label"],
        **common,
    )
    assert isinstance(train, BlendedDataset) and len(train) == 200 and test is None
    assert [ds.num_samples for ds in train.datasets] == [51, 151]  # ceil(200 * share * 1.005)
    assert train.datasets[1].indexed.prefix == a.prefix
    from_b = [n for n in range(200) if train.dataset_index[n] == 0]
    assert len(from_b) == 50 and all("label" in train[n] for n in from_b)
    assert all("label" not in train[n] for n in range(200) if n not in from_b)
    assert isinstance(valid, GPTDataset) and valid.num_samples == 40 and "label" in valid[0]

    def build(**overrides: object) -> None:
        kwargs = dict(
            common, train_data_paths=[str(tmp_path / "a")], train_data_weights=None,
            valid_data_paths=None, valid_data_weights=None,
        )
        kwargs.update(overrides)
        build_train_valid_test(**kwargs)  # type: ignore[arg-type]

    with pytest.raises(DataError, match=r"train_data_paths\[1\]: no dataset at prefix .*missing"):
        build(train_data_paths=[str(tmp_path / "a"), str(tmp_path / "missing")])
    with pytest.raises(DataError, match="train_data_weights has 1 entries but train_data_paths has 2"):
        build(train_data_paths=[str(tmp_path / "a"), str(tmp_path / "b")], train_data_weights=[1.0])
    with pytest.raises(DataError, match="not both"):
        build(data_path=str(tmp_path / "a"))
    with pytest.raises(DataError, match="train_label_data_paths has 2 entries but train_data_paths has 1"):
        build(train_label_data_paths=[f"{tmp_path / 'b'}_label"] * 2)
    with pytest.raises(DataError, match=r"data_path: no dataset at prefix"):
        build(data_path=str(tmp_path / "nope"), train_data_paths=None)


# -- blending -------------------------------------------------------------------------------------
# The last set defeats the naive "largest lag first" rule (it drifts 1.07 samples behind).
@pytest.mark.parametrize(
    "weights", [[0.5, 0.3, 0.2], [0.9, 0.1], [1, 1, 1, 1, 1, 50, 0.5], [2, 0, 1], [0.021, 0.001, 0.001, 0.539, 0.761]]
)
def test_blend_prefixes_match_the_weights_within_one_sample(weights: list[float]) -> None:
    w = np.asarray(weights, dtype=float) / sum(weights)
    dataset_index, sample_index = blending_indices(w, 3000)
    chosen = np.zeros((3000, len(w)))
    chosen[np.arange(3000), dataset_index] = 1
    counts = chosen.cumsum(axis=0)
    ideal = np.outer(np.arange(1, 3001), w)
    assert np.abs(counts - ideal).max() < 1.0
    # each dataset's samples are taken in order 0, 1, 2...
    for i in range(len(w)):
        np.testing.assert_array_equal(sample_index[dataset_index == i], np.arange((dataset_index == i).sum()))


def test_blended_dataset_serves_member_samples_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    members = [
        GPTDataset(f"train_{i}", write_dataset(tmp_path / f"m{i}", [10 + i] * 8), np.arange(8), 60, SEQ, seed=4)
        for i in range(3)
    ]
    blend = BlendedDataset(members, [5, 3, 2], 100)
    assert blend.build_seconds is not None
    taken = [0, 0, 0]
    for n in range(100):
        member = int(blend.dataset_index[n])
        np.testing.assert_array_equal(blend[n]["text"], members[member][taken[member]]["text"])
        taken[member] += 1
    assert taken == [50, 30, 20]

    def no_rebuild(*args: object) -> None:
        raise AssertionError("blend rebuilt although cached")

    monkeypatch.setattr(blend_module, "blending_indices", no_rebuild)
    again = BlendedDataset(members, [0.5, 0.3, 0.2], 100)
    np.testing.assert_array_equal(again.dataset_index, blend.dataset_index)
    monkeypatch.undo()
    with pytest.raises(DataError, match=r"blend member 0 .* has \d+ samples but the blend of 400 samples takes"):
        BlendedDataset(members, [5, 3, 2], 400)
    with pytest.raises(DataError, match="3 datasets got 2 weights"):
        BlendedDataset(members, [1, 1], 10)
