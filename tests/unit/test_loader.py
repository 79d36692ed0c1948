"""The resumable loader: sample placement by global cursor, dp-layout invariance, resume, masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from neox.data.errors import DataError
from neox.data.gpt_dataset import GPTDataset
from neox.data.indexed import IndexedDataset, IndexedDatasetWriter
from neox.data.loader import MicroBatchSampler, build_loader, collate_samples, eval_consumed_samples

EOD = 0
SEQ = 8


def make_dataset(tmp_path: Path, num_samples: int = 64, labels: bool = False) -> GPTDataset:
    """Documents of distinct token ids, each ended by EOD (as preprocess_data --append-eod)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 15, size=25)
    with IndexedDatasetWriter(tmp_path / "text", np.uint16) as text, IndexedDatasetWriter(
        tmp_path / "label", np.int32
    ) as label:
        for doc, length in enumerate(lengths):
            tokens = np.append(1 + 100 * doc + np.arange(length - 1), EOD)
            text.add_document(tokens)
            masked = tokens.copy()
            masked[: (length - 1) // 2] = -100  # a "prompt" half trained on nothing
            label.add_document(masked)
    return GPTDataset(
        "train",
        IndexedDataset(tmp_path / "text"),
        np.arange(len(lengths)),
        num_samples,
        SEQ,
        seed=5,
        label_dataset=IndexedDataset(tmp_path / "label") if labels else None,
    )


def test_sampler_places_samples_by_global_cursor() -> None:
    # m=2, dp=2, G=8 -> 2 accumulation steps; rank 1, step 1 of batch 0 gets samples 6, 7
    rank1 = list(MicroBatchSampler(24, 0, 2, 8, dp_rank=1, dp_size=2))
    assert rank1 == [[2, 3], [6, 7], [10, 11], [14, 15], [18, 19], [22, 23]]
    resumed = list(MicroBatchSampler(24, 16, 2, 8, dp_rank=0, dp_size=2))
    assert resumed == [[16, 17], [20, 21]]
    assert len(MicroBatchSampler(30, 8, 2, 8, 0, 2)) == 4  # 22 samples left: 2 whole global batches
    for dp in (1, 2, 4):
        micro = 8 // (dp * 2)
        per_rank = [list(MicroBatchSampler(40, 0, micro, 8, r, dp)) for r in range(dp)]
        steps = len(per_rank[0]) // 5
        for k in range(5):
            union = sorted(i for r in range(dp) for batch in per_rank[r][k * steps : (k + 1) * steps] for i in batch)
            assert union == list(range(8 * k, 8 * (k + 1)))


@pytest.mark.parametrize(
    "args, message",
    [
        ((100, 0, 3, 8, 0, 2), r"global_batch_size 8 is not divisible by micro_batch_size 3 x dp_size 2"),
        ((100, 4, 2, 8, 0, 2), r"consumed_samples 4 is not a non-negative multiple of global_batch_size 8"),
        ((100, 104, 2, 8, 0, 2), r"consumed_samples 104 exceeds the 100 samples"),
        ((100, 0, 2, 8, 2, 2), r"dp_rank must lie in 0..1"),
        ((100, 0, 0, 8, 0, 2), r"micro_batch_size must be a positive integer"),
    ],
)
def test_sampler_rejects_inconsistent_batch_arithmetic(args: tuple[int, ...], message: str) -> None:
    with pytest.raises(DataError, match=message):
        MicroBatchSampler(*args)


def global_batches(dataset: GPTDataset, dp: int, micro: int, consumed: int = 0, count: int = 3) -> list[torch.Tensor]:
    """The first `count` global batches seen by all ranks of a dp layout, reassembled into
    dataset-sample order from where the contract puts each rank's micro-batch."""
    G = 8
    steps = G // (micro * dp)
    loaders = [
        build_loader(dataset, consumed_samples=consumed, micro_batch_size=micro, global_batch_size=G,
                     dp_rank=r, dp_size=dp, eod_token=EOD)
        for r in range(dp)
    ]
    batches = []
    for _ in range(count):
        rows = torch.empty(G, SEQ, dtype=torch.int64)
        for step in range(steps):
            for r, loader in enumerate(loaders):
                batch = next(loader)
                first = step * micro * dp + r * micro
                rows[first : first + micro] = batch["tokens"]
        batches.append(rows)
    return batches


def test_global_batches_do_not_depend_on_the_dp_layout(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path)
    reference = global_batches(dataset, dp=1, micro=4)
    for k, rows in enumerate(reference):
        expected = np.stack([dataset[i]["text"][:-1] for i in range(8 * k, 8 * (k + 1))])
        np.testing.assert_array_equal(rows.numpy(), expected)
    for dp, micro in ((2, 2), (4, 1), (2, 4)):
        for k, rows in enumerate(global_batches(dataset, dp=dp, micro=micro)):
            assert torch.equal(rows, reference[k]), (dp, micro, k)


def test_resume_with_another_dp_size_continues_where_the_run_stopped(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path)
    uninterrupted = global_batches(dataset, dp=1, micro=2, count=5)
    resumed = global_batches(dataset, dp=2, micro=2, consumed=2 * 8, count=3)
    for k in range(3):
        assert torch.equal(resumed[k], uninterrupted[2 + k])
    # the loader ends before a global batch that would run past the dataset
    tail = build_loader(dataset, consumed_samples=len(dataset) - len(dataset) % 8 - 8, micro_batch_size=4,
                        global_batch_size=8, dp_rank=0, dp_size=1, eod_token=EOD)
    assert len(list(tail)) == 2


def test_batch_fields_shift_and_mask_like_gpt_neox(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path)
    plain = next(build_loader(dataset, consumed_samples=0, micro_batch_size=4, global_batch_size=4,
                              dp_rank=0, dp_size=1, eod_token=EOD))
    masked = next(build_loader(dataset, consumed_samples=0, micro_batch_size=4, global_batch_size=4,
                               dp_rank=0, dp_size=1, eod_token=EOD, eod_mask_loss=True))
    text = torch.from_numpy(np.stack([dataset[i]["text"] for i in range(4)]))
    assert set(plain) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert plain["tokens"].dtype == torch.int64 and plain["loss_mask"].dtype == torch.float32
    assert torch.equal(plain["tokens"], text[:, :-1]) and torch.equal(plain["labels"], text[:, 1:])
    assert torch.equal(plain["position_ids"], torch.arange(SEQ).repeat(4, 1))
    assert torch.all(plain["loss_mask"] == 1)
    is_eod_input = text[:, :-1] == EOD
    assert is_eod_input.any()  # the fixture puts document ends inside samples
    assert torch.equal(masked["loss_mask"], (~is_eod_input).float())
    assert torch.equal(masked["labels"], plain["labels"])


def test_label_dataset_masks_the_loss_and_combines_with_eod_masking(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path, labels=True)
    batch = next(build_loader(dataset, consumed_samples=8, micro_batch_size=8, global_batch_size=8,
                              dp_rank=0, dp_size=1, eod_token=EOD, eod_mask_loss=True))
    samples = [dataset[i] for i in range(8, 16)]
    label = torch.from_numpy(np.stack([s["label"] for s in samples]))[:, 1:]
    text = torch.from_numpy(np.stack([s["text"] for s in samples]))
    trained = (label >= 0) & (text[:, :-1] != EOD)
    assert (~trained).any() and trained.any()
    assert torch.equal(batch["loss_mask"], trained.float())
    assert torch.equal(batch["labels"], torch.where(label >= 0, label, 0))
    assert torch.equal(batch["tokens"], text[:, :-1])
    # a blend may mix labelled and unlabelled samples: the text is then its own label
    mixed = collate_samples([samples[0], {"text": samples[1]["text"]}], EOD, eod_mask_loss=False)
    assert torch.equal(mixed["labels"][1], text[1, 1:]) and torch.all(mixed["loss_mask"][1] == 1)


def test_worker_processes_give_the_same_batches(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path)
    kwargs = dict(consumed_samples=8, micro_batch_size=2, global_batch_size=8, dp_rank=1, dp_size=2, eod_token=EOD)
    inline = [b["tokens"] for b in build_loader(dataset, **kwargs)]
    workers = [b["tokens"] for b in build_loader(dataset, num_workers=1, **kwargs)]
    assert len(inline) == len(workers) > 0
    assert all(torch.equal(a, b) for a, b in zip(inline, workers))


def test_eval_cursor_advances_by_whole_evaluations() -> None:
    assert eval_consumed_samples(0, 10, 16) == 0
    assert eval_consumed_samples(3, 10, 16) == 480
    with pytest.raises(DataError):
        eval_consumed_samples(-1, 10, 16)
