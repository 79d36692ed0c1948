"""gpt-neox's data keys beyond packed samples: weight_by_num_documents, pack_impl + allow_chopped, the
train/valid/test label lists, data_impl (the cached TNTIDX format), mmap_warmup, char_level_ppl counting and the
DataConfig rules, each checked against a hand computation on tiny datasets written here."""
from __future__ import annotations

import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from neox.config.data import DataConfig
from neox.config.errors import ConfigError
from neox.data import formats
from neox.data.blend import BlendedDataset, weights_by_num_docs
from neox.data.build import DatasetOptions, build_train_valid_test, is_index_builder
from neox.data.char_count import char_level_ppl, count_tokens_and_chars, eval_text_counts
from neox.data.errors import DataError
from neox.data.gpt_dataset import GPTDataset
from neox.data.indexed import IndexedDataset, IndexedDatasetWriter
from neox.data.legacy_indexed import CachedIndexedDataset
from neox.data.loader import collate_samples
from neox.data.token_range import check_token_ids

SEQ = 6


def doc_tokens(doc: int, length: int) -> np.ndarray:
    """Token j of document d is 100*d + j + 1 (never 0, the padding token): any token tells where it came from."""
    return 100 * doc + np.arange(length) + 1


def write(prefix: Path, lengths: list[int], labels: dict[int, list[int]] | None = None) -> IndexedDataset:
    """Documents of the given lengths; with labels, a label dataset whose document d is labels.get(d, the text)."""
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc, length in enumerate(lengths):
            writer.add_document(doc_tokens(doc, length))
    if labels is not None:
        with IndexedDatasetWriter(f"{prefix}_label", np.int32) as writer:
            for doc, length in enumerate(lengths):
                writer.add_document(np.asarray(labels.get(doc, doc_tokens(doc, length)), dtype=np.int32))
    return IndexedDataset(prefix)


# -- weight_by_num_documents ----------------------------------------------------------------------------------------
def hand_weights(counts: list[int], alpha: float) -> list[float]:
    """gpt-neox's weights_by_num_docs written out: p = n/N; q = p^a / sum p^a; w = q(1-p) / sum q(1-p)."""
    total = sum(counts)
    p = [n / total for n in counts]
    q = [x**alpha for x in p]
    q = [x / sum(q) for x in q]
    w = [a * (1 - b) for a, b in zip(q, p)]
    return [x / sum(w) for x in w]


def test_weights_by_num_docs_match_a_hand_computation() -> None:
    # 10, 40 and 150 documents, alpha 0.5: p = .05, .2, .75; sqrt(p) = .223607, .447214, .866025 (sum 1.536846);
    # q = .145497, .290994, .563509; q(1-p) = .138222, .232795, .140877 (sum .511895) -> w = .270020, .454772,
    # .275207: the largest set is pushed down by its 1 - p
    assert hand_weights([10, 40, 150], 0.5) == pytest.approx([0.270020, 0.454772, 0.275207], abs=2e-6)
    for counts, alpha in (([10, 40, 150], 0.5), ([3, 1], 1.0), ([7, 7, 7, 1], 0.3)):
        np.testing.assert_allclose(weights_by_num_docs(counts, alpha), hand_weights(counts, alpha), rtol=1e-12)
    assert weights_by_num_docs([123], 0.3).tolist() == [1.0]
    with pytest.raises(DataError, match="weight 0"):
        weights_by_num_docs([0, 5], 1.0)


def test_weight_by_num_documents_drives_the_train_valid_test_blends(tmp_path: Path) -> None:
    counts = [10, 40, 150]
    paths = [str(tmp_path / f"set{i}") for i in range(3)]
    for path, n in zip(paths, counts):
        write(Path(path), [8] * n)
    options = DatasetOptions(weight_by_num_documents=True, weighted_sampler_alpha=0.5)
    wanted = (400, 120, 60)
    train, valid, test = build_train_valid_test(
        data_path=None, train_data_paths=paths, valid_data_paths=paths, test_data_paths=paths[:2],
        # user weights are replaced, as gpt-neox replaces them
        train_data_weights=[1, 1, 1], valid_data_weights=None, test_data_weights=[5, 1],
        seq_length=SEQ, seed=2, num_samples=wanted, options=options)
    for blend, members, n in ((train, counts, wanted[0]), (valid, counts, wanted[1]), (test, counts[:2], wanted[2])):
        assert isinstance(blend, BlendedDataset)
        expected = hand_weights(members, 0.5)
        np.testing.assert_allclose(blend.weights, expected, rtol=1e-12)
        assert [d.num_samples for d in blend.datasets] == [math.ceil(n * w * 1.005) for w in expected]
        # every prefix of the blend follows the weights to within one sample
        taken = np.zeros(len(members))
        for k in range(n):
            taken[int(blend.dataset_index[k])] += 1
            assert np.abs(taken - (k + 1) * np.asarray(expected)).max() < 1.0
        # and the samples really come from the member the index names (document ids name the set's tokens)
        member = int(blend.dataset_index[7])
        assert blend[7]["text"].tolist() == blend.datasets[member][int(blend.dataset_sample_index[7])]["text"].tolist()


# -- pack_impl: unpacked / pack_until_overflow ----------------------------------------------------------------------
LENGTHS = [5, 0, 9, 3, 12, 1, 7, 4, 8, 6, 2]  # 9 and 12 are longer than SEQ + 1 = 7


def expected_item(stream_docs: list[int], lengths: list[int], label_of=None) -> tuple[list[int], list[int]]:
    """Text and label of a whole-document sample built by hand: the documents' tokens, then the first token of
    the next document, cut to SEQ + 1 or padded with 0 / -100."""
    *docs, following = stream_docs
    text = [int(t) for d in docs for t in doc_tokens(d, lengths[d])] + [int(doc_tokens(following, 1)[0])]
    label_of = label_of or (lambda d: [int(t) for t in doc_tokens(d, lengths[d])])
    label = [x for d in docs for x in label_of(d)] + [label_of(following)[0]]
    text, label = text[: SEQ + 1], label[: SEQ + 1]
    pad = SEQ + 1 - len(text)
    return text + [0] * pad, label + [-100] * pad


def test_unpacked_samples_are_single_documents_padded_and_masked(tmp_path: Path) -> None:
    indexed = write(tmp_path / "d", LENGTHS)
    ds = GPTDataset("train", indexed, np.arange(len(LENGTHS)), 25, SEQ, seed=4, pack_impl="unpacked")
    eligible = [d for d, n in enumerate(LENGTHS) if n > 0]  # the empty document never starts a sample
    assert len(ds) == 30 and ds.num_epochs == 3  # whole epochs of 10 documents
    doc_idx = np.asarray(ds.doc_idx).tolist()
    for epoch in range(4):  # the 4th pass supplies the token after the last sample
        assert sorted(doc_idx[epoch * 10 : (epoch + 1) * 10]) == eligible
    for i in range(len(ds)):
        text, label = expected_item(doc_idx[i : i + 2], LENGTHS)
        item = ds[i]
        assert item["text"].tolist() == text and item["label"].tolist() == label
    # the padding is out of the loss; every real position is in it
    batch = collate_samples([ds[i] for i in range(len(ds))], eod_token=10**6, eod_mask_loss=False)
    real = np.array([[t != 0 for t in expected_item(doc_idx[i : i + 2], LENGTHS)[0][1:]] for i in range(len(ds))])
    np.testing.assert_array_equal(batch["loss_mask"].numpy() == 1.0, real)
    # without chopping, the two long documents are left out
    strict = GPTDataset("train", indexed, np.arange(len(LENGTHS)), 25, SEQ, seed=4, pack_impl="unpacked",
                        allow_chopped=False)
    assert set(np.asarray(strict.doc_idx).tolist()) == {d for d in eligible if LENGTHS[d] <= SEQ + 1}
    assert strict.cache_stem != ds.cache_stem and "unpackedpi" in ds.cache_stem and "_ac_" in ds.cache_stem


def test_pack_until_overflow_packs_whole_documents_until_the_next_one_overflows(tmp_path: Path) -> None:
    # document 3's labels are all masked: gpt-neox never starts a sample with it, so it is never read
    labels = {3: [-100] * LENGTHS[3], 6: [-100, 7, -100, 9, -100, 11, -100]}
    indexed = write(tmp_path / "d", LENGTHS, labels)
    label_ds = IndexedDataset(f"{tmp_path / 'd'}_label")
    ds = GPTDataset("train", indexed, np.arange(len(LENGTHS)), 40, SEQ, seed=8, label_dataset=label_ds,
                    pack_impl="pack_until_overflow")
    assert len(ds) == 40
    doc_idx = np.asarray(ds.doc_idx).tolist()
    starts = np.asarray(ds.sample_idx)[:, 0].tolist()
    assert np.all(np.asarray(ds.sample_idx)[:, 1] == 0) and len(starts) == 41
    assert 3 not in doc_idx and 1 not in doc_idx
    # greedy packing, rebuilt by hand from the document stream
    running, hand_starts = 0, []
    for position, doc in enumerate(doc_idx[: starts[-1] + 1]):
        if not hand_starts or running + LENGTHS[doc] > SEQ + 1:
            hand_starts.append(position)
            running = LENGTHS[doc]
        else:
            running += LENGTHS[doc]
    assert hand_starts == starts

    def label_of(d: int) -> list[int]:
        return labels.get(d, [int(t) for t in doc_tokens(d, LENGTHS[d])])

    for i in range(len(ds)):
        docs = doc_idx[starts[i] : starts[i + 1]] + [doc_idx[starts[i + 1]]]
        text, label = expected_item(docs, LENGTHS, label_of)
        assert ds[i]["text"].tolist() == text and ds[i]["label"].tolist() == label
        real = min(sum(LENGTHS[d] for d in docs[:-1]) + 1, SEQ + 1)  # what char_level_ppl counts
        assert ds.text_tokens(i).tolist() == text[:real]
    # more samples keep every earlier one (the document stream only grows)
    longer = GPTDataset("train", indexed, np.arange(len(LENGTHS)), 90, SEQ, seed=8, label_dataset=label_ds,
                        pack_impl="pack_until_overflow")
    for i in range(len(ds)):
        assert longer[i]["text"].tolist() == ds[i]["text"].tolist()
    # a second build of the same dataset loads the cache
    again = GPTDataset("train", indexed, np.arange(len(LENGTHS)), 40, SEQ, seed=8, label_dataset=label_ds,
                       pack_impl="pack_until_overflow")
    assert again.build_seconds is None and again.num_epochs == ds.num_epochs


def test_whole_document_modes_read_only_the_given_documents_and_explain_empty_sets(tmp_path: Path) -> None:
    indexed = write(tmp_path / "d", LENGTHS)
    # a valid split of data_path is documents 6..10: gpt-neox's own code would read documents 0..4 here
    valid = GPTDataset("valid", indexed, np.arange(6, 11), 8, SEQ, seed=1, pack_impl="unpacked")
    assert set(np.asarray(valid.doc_idx).tolist()) == {6, 7, 8, 9, 10}
    with pytest.raises(DataError, match="pack_impl unpacked: no document can start a sample"):
        GPTDataset("valid", indexed, np.array([2, 4]), 3, SEQ, seed=1, pack_impl="unpacked", allow_chopped=False)
    with pytest.raises(DataError, match="pack_impl must be one of"):
        GPTDataset("valid", indexed, np.arange(3), 3, SEQ, seed=1, pack_impl="squeezed")


def test_label_lists_pair_with_the_data_paths_of_each_split(tmp_path: Path) -> None:
    write(tmp_path / "a", [9] * 6, labels={0: [-100] * 9})
    write(tmp_path / "b", [9] * 6)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train, valid, test = build_train_valid_test(
        data_path=None, train_data_paths=[a, b], valid_data_paths=[b], test_data_paths=[a],
        train_data_weights=None, valid_data_weights=None, test_data_weights=None,
        train_label_data_paths=[f"{a}_label"], test_label_data_paths=[f"{a}_label"],
        seq_length=SEQ, seed=1, num_samples=(20, 4, 4))
    assert train.datasets[0].label_dataset.prefix == Path(f"{a}_label") and train.datasets[1].label_dataset is None
    assert valid.label_dataset is None and test.label_dataset.prefix == Path(f"{a}_label")


# -- data_impl: the cached (TNTIDX) format, mmap_warmup --------------------------------------------------------------
def write_tntidx(prefix: Path, documents: list[list[int]]) -> None:
    """The layout of gpt-neox's IndexedDatasetBuilder (int32 items, one document per item), byte by byte."""
    tokens = np.concatenate([np.asarray(d, dtype="<i4") for d in documents])
    (prefix.parent / f"{prefix.name}.bin").write_bytes(tokens.tobytes())
    sizes = [len(d) for d in documents]
    index = b"TNTIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<QQ", 4, 4)
    index += struct.pack("<QQ", len(documents), len(sizes)) + struct.pack("<Q", len(documents) + 1)
    index += np.arange(len(documents) + 1, dtype="<i8").tobytes()                 # dim_offsets
    index += np.concatenate([[0], np.cumsum(sizes)]).astype("<i8").tobytes()      # data_offsets (elements)
    index += np.asarray(sizes, dtype="<i8").tobytes()                             # sizes
    index += np.arange(len(documents) + 1, dtype="<i8").tobytes()                 # doc_idx
    (prefix.parent / f"{prefix.name}.idx").write_bytes(index)


def test_cached_format_reads_like_the_mmap_format(tmp_path: Path) -> None:
    documents = [doc_tokens(d, n).tolist() for d, n in enumerate(LENGTHS)]
    write_tntidx(tmp_path / "old", documents)
    mmap = write(tmp_path / "new", LENGTHS)
    cached = formats.open_indexed(tmp_path / "old")  # data_impl infer
    assert isinstance(cached, CachedIndexedDataset) and formats.index_format(tmp_path / "new") == "mmap"
    assert cached.sizes.tolist() == LENGTHS and cached.num_documents == len(LENGTHS)
    for d, tokens in enumerate(documents):
        assert cached.get(d).tolist() == tokens
    assert cached.get(4, 3, 5).tolist() == documents[4][3:8]
    # the same documents give the same samples whatever the file format, also in DataLoader worker copies
    a = GPTDataset("train", cached, np.arange(len(LENGTHS)), 12, SEQ, seed=3, cache_dir=tmp_path / "c1",
                   pack_impl="unpacked")
    b = GPTDataset("train", mmap, np.arange(len(LENGTHS)), 12, SEQ, seed=3, cache_dir=tmp_path / "c2",
                   pack_impl="unpacked")
    worker_copy = pickle.loads(pickle.dumps(a))
    assert isinstance(worker_copy.indexed, CachedIndexedDataset) and worker_copy.num_epochs == a.num_epochs
    for i in range(len(a)):
        assert a[i]["text"].tolist() == b[i]["text"].tolist() == worker_copy[i]["text"].tolist()
        assert a[i]["label"].tolist() == b[i]["label"].tolist() == worker_copy[i]["label"].tolist()
    train, _, _ = build_train_valid_test(
        data_path=str(tmp_path / "old"), train_data_paths=None, valid_data_paths=None, test_data_paths=None,
        train_data_weights=None, valid_data_weights=None, test_data_weights=None, split="1", seq_length=SEQ,
        seed=3, num_samples=(5, 0, 0), options=DatasetOptions(data_impl="cached"))
    assert isinstance(train.indexed, CachedIndexedDataset)
    with pytest.raises(DataError, match=r"data_path: .*old.idx is in the cached format but data_impl is 'mmap'"):
        formats.open_indexed(tmp_path / "old", "mmap")
    with pytest.raises(DataError, match=r"new.idx is in the mmap format but data_impl is 'cached'"):
        formats.open_indexed(tmp_path / "new", "cached")
    with pytest.raises(DataError, match="holds token id 1002"):
        check_token_ids(tmp_path / "old", 1000, key="data_path", tokenizer="test", data_impl="cached")


def test_mmap_warmup_reads_both_files_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "d", LENGTHS)
    size = (tmp_path / "d.idx").stat().st_size + (tmp_path / "d.bin").stat().st_size
    assert formats.warm_up(tmp_path / "d") == size
    warmed: list[int] = []
    real = formats.warm_up
    monkeypatch.setattr(formats, "warm_up", lambda prefix: warmed.append(real(prefix)))
    common = dict(data_path=str(tmp_path / "d"), train_data_paths=None, valid_data_paths=None, test_data_paths=None,
                  train_data_weights=None, valid_data_weights=None, test_data_weights=None, split="1",
                  seq_length=SEQ, seed=3, num_samples=(5, 0, 0))
    build_train_valid_test(**common)
    assert warmed == []
    build_train_valid_test(**common, options=DatasetOptions(mmap_warmup=True))
    assert warmed == [size]


def test_index_caches_are_built_by_global_rank_0_or_each_nodes_local_rank_0() -> None:
    # (rank, local rank) of 2 nodes x 2 ranks
    ranks = [(0, 0), (1, 1), (2, 0), (3, 1)]
    assert [is_index_builder(r, lr, use_shared_fs=True) for r, lr in ranks] == [True, False, False, False]
    assert [is_index_builder(r, lr, use_shared_fs=False) for r, lr in ranks] == [True, False, True, False]


# -- char_level_ppl -------------------------------------------------------------------------------------------------
def test_char_level_ppl_counts_the_evaluated_text(tmp_path: Path) -> None:
    def decode(ids: list[int]) -> str:
        return "".join("ab" if t % 2 else "c" for t in ids)  # odd ids 2 characters, even ids 1

    assert count_tokens_and_chars([[1, 2, 3], [4]], decode) == (4, 6)
    ds = GPTDataset("valid", write(tmp_path / "d", LENGTHS), np.arange(len(LENGTHS)), 10, SEQ, seed=2)
    batches = [[0, 1], [4, 5]]
    rows = [ds[i]["text"] for batch in batches for i in batch]
    tokens = 4 * (SEQ + 1)
    chars = sum(2 if t % 2 else 1 for row in rows for t in row)
    assert eval_text_counts(ds, batches, decode) == (tokens, chars)
    assert char_level_ppl(2.5, tokens, chars) == pytest.approx(math.exp(2.5 * tokens / chars), rel=1e-15)
    # whole-document samples count their text, not their padding
    unpacked = GPTDataset("valid", write(tmp_path / "u", LENGTHS), np.arange(len(LENGTHS)), 10, SEQ, seed=2,
                          pack_impl="unpacked")
    lengths = [min(LENGTHS[int(unpacked.doc_idx[i])] + 1, SEQ + 1) for i in range(4)]
    assert eval_text_counts(unpacked, [[0, 1, 2, 3]], lambda ids: "x" * len(ids)) == (sum(lengths), sum(lengths))


class _TwoCharsPerToken:
    """CharLevelTokenizer whose decode gives every token two characters: tokens / characters is exactly 1/2."""

    def __init__(self) -> None:
        from neox.tokenizer import build_tokenizer

        self.inner = build_tokenizer("CharLevelTokenizer")
        self.eod, self.vocab_size = self.inner.eod, self.inner.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def decode(self, ids: list[int]) -> str:
        return "xy" * len(ids)


def test_perplexity_task_reports_char_level_ppl(tmp_path: Path) -> None:
    import json

    import torch
    import yaml

    from neox.config import load_config
    from neox.eval.perplexity import dataset_perplexity, file_perplexity
    from neox.eval.runner import LocalRunner
    from neox.model import GPTNeoX

    (tmp_path / "m.yml").write_text(yaml.safe_dump({
        "num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "seq_length": 16, "max_position_embeddings": 16,
        "tokenizer_type": "CharLevelTokenizer", "precision": "fp32"}))
    torch.manual_seed(0)
    runner = LocalRunner(GPTNeoX(load_config([tmp_path / "m.yml"], vocab_size=512).model), 512)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["hello there", "abc " * 20]))
    tokenizer = _TwoCharsPerToken()
    result = file_perplexity(runner, tmp_path / "t.jsonl", tokenizer, eod_mask_loss=False, batch_size=2,
                             char_level=True)
    stream = len("hello there") + 1 + len("abc " * 20) + 1
    windows = [min(17, stream - start) for start in range(0, stream - 1, 16)]  # seq_length + 1 tokens each
    assert (result.text_tokens, result.characters) == (sum(windows), 2 * sum(windows))
    assert result.char_level_perplexity == pytest.approx(math.exp(result.loss / 2), rel=1e-12)
    plain = file_perplexity(runner, tmp_path / "t.jsonl", tokenizer, eod_mask_loss=False, batch_size=2)
    assert plain.char_level_perplexity is None and plain.loss == pytest.approx(result.loss, rel=1e-12)
    # a data split: the windows' text up to the end of the split's epoch
    ds = GPTDataset("valid", write(tmp_path / "d", [20, 13, 9]), np.arange(3), 1, 16, seed=1)
    split = dataset_perplexity(runner, "valid", "d", ds, eod=0, eod_mask_loss=False, batch_size=2,
                               decode=tokenizer.decode)
    assert split.text_tokens == 17 + 17 + (42 - 32) and split.characters == 2 * split.text_tokens
    assert split.char_level_perplexity == pytest.approx(math.exp(split.loss / 2), rel=1e-12)


# -- DataConfig rules -----------------------------------------------------------------------------------------------
CURRICULUM = {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": 8, "max_difficulty": 64,
              "schedule_type": "fixed_linear", "schedule_config": {"total_curriculum_step": 10, "difficulty_step": 8}}


def test_data_config_defaults_and_label_alias() -> None:
    cfg = DataConfig()
    assert (cfg.weighted_sampler_alpha, cfg.data_impl, cfg.pack_impl, cfg.allow_chopped, cfg.mmap_warmup,
            cfg.use_shared_fs, cfg.short_seq_prob, cfg.curriculum_learning, cfg.curriculum_seqlen,
            cfg.char_level_ppl) == (1.0, "infer", "packed", True, False, True, 0.1, None, 0, False)
    old = DataConfig(train_data_paths=["a", "b"], label_data_paths=["a_label"])
    old.validate()
    assert old.train_label_data_paths == ["a_label"]
    same = DataConfig(train_data_paths=["a"], label_data_paths=["x"], train_label_data_paths=["x"])
    same.validate()
    bad = {
        "same list under two names": dict(train_data_paths=["a"], label_data_paths=["x"],
                                          train_label_data_paths=["y"]),
        "'valid_label_data_paths' gives the label dataset": dict(train_data_paths=["a"], valid_data_paths=["b"],
                                                                   valid_label_data_paths=["l1", "l2"]),
        "not with 'data_path'": dict(data_path="d", train_label_data_paths=["l"]),
        "nothing to weight": dict(data_path="d", weight_by_num_documents=True),
        "needs 'enabled: true'": dict(curriculum_learning={k: v for k, v in CURRICULUM.items() if k != "enabled"}),
        "curriculum_type' must be 'seqlen'": dict(curriculum_learning={**CURRICULUM, "curriculum_type": "vocab"}),
        "custom needs a Python": dict(curriculum_learning={**CURRICULUM, "schedule_type": "custom"}),
        "needs \\['root_degree'\\]": dict(curriculum_learning={**CURRICULUM, "schedule_type": "fixed_root"}),
        "one max_step fewer": dict(curriculum_learning={
            **CURRICULUM, "schedule_type": "fixed_discrete",
            "schedule_config": {"difficulty": [8, 16], "max_step": [2, 4]}}),
        "min_difficulty' \\(80\\) exceeds": dict(curriculum_learning={**CURRICULUM, "min_difficulty": 80}),
    }
    for message, kwargs in bad.items():
        with pytest.raises(ConfigError, match=message):
            DataConfig(**kwargs).validate()
    DataConfig(curriculum_learning={**CURRICULUM, "enabled": False, "curriculum_type": "anything"}).validate()
    DataConfig(curriculum_learning=CURRICULUM).validate()
