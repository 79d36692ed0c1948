"""Train/valid/test datasets from the data keys of the config (gpt-neox semantics).

Either ``data_path``: one prefix cut into document ranges by ``split`` ("969,30,1", normalised);
or ``train/valid/test_data_paths``: prefix lists blended by their weights, or with
``weight_by_num_documents`` by their document counts (gpt-neox's weights_by_num_docs). Each
``*_label_data_paths`` list gives the label dataset of the data path at the same position, each
``*_reward_data_paths`` list its per-document rewards. With ``dataset_impl: pairwise``, the
``pos_*``/``neg_*_data_paths`` lists give chosen/rejected pairs instead (neox.data.pairwise_dataset).
``data_impl`` picks the on-disk format, ``pack_impl``/``allow_chopped`` how samples are cut; with
``precompute_model_name`` each data prefix's reference log-probs are read from ``{prefix}_{name}``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from neox.data.blend import BlendedDataset, normalized_weights, weights_by_num_docs
from neox.data.errors import DataError
from neox.data.formats import AnyIndexed, open_indexed
from neox.data.gpt_dataset import GPTDataset
from neox.data.pairwise_dataset import PairwiseDataset

if TYPE_CHECKING:
    from neox.config.data import DataConfig

__all__ = ["DatasetOptions", "build_pairwise_train_valid_test", "build_train_valid_test", "datasets_from_config",
           "is_index_builder", "parse_split", "split_document_ranges", "split_num_samples"]

SPLIT_NAMES = ("train", "valid", "test")
# gpt-neox sizes each blend member 0.5% above its share so rounding never starves the blend.
BLEND_MEMBER_MARGIN = 1.005

Dataset = GPTDataset | BlendedDataset


def parse_split(split: str) -> list[float]:
    """"969,30,1" or "969/30/1" -> normalised [train, valid, test]; missing parts count as 0."""
    separator = "," if "," in split else "/"
    try:
        parts = [float(p) for p in split.split(separator)]
    except ValueError as err:
        raise DataError(f"split {split!r} must be up to 3 numbers separated by ',' or '/'") from err
    if len(parts) > 3 or any(not math.isfinite(p) or p < 0 for p in parts) or sum(parts) <= 0:
        raise DataError(f"split {split!r} must be up to 3 non-negative numbers, not all zero")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def split_document_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Document ranges [start, end) for train, valid, test, rounded as gpt-neox rounds them
    (each share rounded, then every boundary moved by the total's rounding excess)."""
    bounds = [0]
    for share in parse_split(split):
        bounds.append(bounds[-1] + int(round(share * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [min(max(b - excess, 0), num_documents) for b in bounds[1:]]
    return [(bounds[i], max(bounds[i], bounds[i + 1])) for i in range(3)]


def split_num_samples(train_iters: int, eval_interval: int, eval_iters: int, global_batch_size: int) -> tuple[int, int, int]:
    """Samples each split must hold for a run (gpt-neox): every evaluation, plus the final one,
    reads eval_iters fresh global batches; the test set is read once."""
    if eval_interval < 1:
        raise DataError(f"eval_interval must be >= 1, got {eval_interval}")
    return (
        train_iters * global_batch_size,
        (train_iters // eval_interval + 1) * eval_iters * global_batch_size,
        eval_iters * global_batch_size,
    )


@dataclass(frozen=True)
class DatasetOptions:
    """How every dataset of a build is read and cut (gpt-neox's keys of the same names)."""

    data_impl: str = "infer"
    mmap_warmup: bool = False
    pack_impl: str = "packed"
    allow_chopped: bool = True
    weight_by_num_documents: bool = False
    weighted_sampler_alpha: float = 1.0
    # precompute_model_name: per-token reference log-probs read from {data prefix}_{name} next to each data prefix.
    precompute_model_name: str | None = None


class _Opener:
    """Opens each prefix once per build and turns file problems into errors naming the key."""

    def __init__(self, options: DatasetOptions) -> None:
        self.options = options
        self.opened: dict[str, AnyIndexed] = {}

    def open(self, prefix: str, key: str) -> AnyIndexed:
        prefix = os.fspath(prefix)
        if prefix not in self.opened:
            self.opened[prefix] = open_indexed(prefix, self.options.data_impl, key=key,
                                               warmup=self.options.mmap_warmup)
        return self.opened[prefix]

    def reference(self, data_prefix: str, key: str) -> AnyIndexed | None:
        """The reference log-probs of a data prefix ({prefix}_{precompute_model_name}), if the run reads them."""
        name = self.options.precompute_model_name
        if name is None:
            return None
        return self.open(f"{os.fspath(data_prefix)}_{name}", f"{key} with precompute_model_name {name!r}")


def build_train_valid_test(
    *,
    data_path: str | None,
    train_data_paths: Sequence[str] | None,
    valid_data_paths: Sequence[str] | None,
    test_data_paths: Sequence[str] | None,
    train_data_weights: Sequence[float] | None,
    valid_data_weights: Sequence[float] | None,
    test_data_weights: Sequence[float] | None,
    train_label_data_paths: Sequence[str] | None = None,
    valid_label_data_paths: Sequence[str] | None = None,
    test_label_data_paths: Sequence[str] | None = None,
    train_reward_data_paths: Sequence[str] | None = None,
    valid_reward_data_paths: Sequence[str] | None = None,
    test_reward_data_paths: Sequence[str] | None = None,
    split: str = "969,30,1",
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    cache_dir: str | os.PathLike[str] | None = None,
    options: DatasetOptions = DatasetOptions(),
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """The three datasets (None where a split has no data or needs no samples)."""
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise DataError(f"num_samples must be 3 non-negative counts (train, valid, test), got {num_samples}")
    opener = _Opener(options)
    if data_path and train_data_paths:
        raise DataError("set either data_path (one dataset, cut by `split`) or train_data_paths, not both")
    lists = (train_data_paths, valid_data_paths, test_data_paths)
    label_lists = (train_label_data_paths, valid_label_data_paths, test_label_data_paths)
    for name, paths, labels in zip(SPLIT_NAMES, lists, label_lists):
        if labels and (not paths or len(labels) > len(paths)):
            raise DataError(f"{name}_label_data_paths has {len(labels)} entries but {name}_data_paths has "
                            f"{len(paths or [])}; the i-th label prefix goes with the i-th data prefix (labels go "
                            f"with {name}_data_paths, not with data_path)")
    if data_path:
        return _from_split(opener, data_path, split, seq_length, seed, num_samples, cache_dir)
    if not train_data_paths:
        raise DataError("no training data: set data_path or train_data_paths")
    weights = (train_data_weights, valid_data_weights, test_data_weights)
    reward_lists = (train_reward_data_paths, valid_reward_data_paths, test_reward_data_paths)
    for name, paths, rewards in zip(SPLIT_NAMES, lists, reward_lists):
        if rewards and (not paths or len(rewards) > len(paths)):
            raise DataError(f"{name}_reward_data_paths has {len(rewards)} entries but {name}_data_paths has "
                            f"{len(paths or [])}; the i-th reward prefix goes with the i-th data prefix")
    return tuple(  # type: ignore[return-value]
        _gpt_blend(opener, name, paths or [], labels or [], rewards or [], w, n, seq_length, seed, cache_dir)
        for name, paths, labels, rewards, w, n in zip(SPLIT_NAMES, lists, label_lists, reward_lists, weights,
                                                      num_samples)
    )


def build_pairwise_train_valid_test(
    *,
    pairs: dict[str, dict[str, Sequence[str] | None]],
    weights: dict[str, Sequence[float] | None],
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    cache_dir: str | os.PathLike[str] | None = None,
    options: DatasetOptions = DatasetOptions(pack_impl="unpacked"),
) -> tuple[Any, Any, Any]:
    """dataset_impl pairwise: pairs[split] = {"pos", "neg", "pos_label", "neg_label"} prefix lists of that split
    (gpt-neox's pos_/neg_{split}_[label_]data_paths), weights[split] its *_data_weights."""
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise DataError(f"num_samples must be 3 non-negative counts (train, valid, test), got {num_samples}")
    if not (pairs.get("train") or {}).get("pos"):
        raise DataError("no training pairs: set pos_train_data_paths and neg_train_data_paths")
    opener = _Opener(options)
    return tuple(  # type: ignore[return-value]
        _pairwise_blend(opener, name, {kind: (pairs.get(name) or {}).get(kind) or []
                                       for kind in ("pos", "neg", "pos_label", "neg_label")},
                        weights.get(name), n, seq_length, seed, cache_dir)
        for name, n in zip(SPLIT_NAMES, num_samples)
    )


def is_index_builder(rank: int, local_rank: int, use_shared_fs: bool) -> bool:
    """Whether this rank builds the index caches before the others load them (gpt-neox's use_shared_fs): global
    rank 0 when every node sees the same files, else local rank 0 of every node, each into its own file system."""
    return rank == 0 if use_shared_fs else local_rank == 0


def datasets_from_config(data: DataConfig, *, seq_length: int, seed: int, num_samples: tuple[int, int, int],
                         precompute_model_name: str | None = None) -> tuple[Any, Any, Any]:
    """build_train_valid_test (or, with dataset_impl pairwise, build_pairwise_train_valid_test) with every data key
    of the config."""
    options = DatasetOptions(
        data_impl=data.data_impl, mmap_warmup=data.mmap_warmup, pack_impl=data.pack_impl,
        allow_chopped=data.allow_chopped, weight_by_num_documents=data.weight_by_num_documents,
        weighted_sampler_alpha=data.weighted_sampler_alpha, precompute_model_name=precompute_model_name)
    if data.dataset_impl == "pairwise":
        return build_pairwise_train_valid_test(
            pairs={split: {kind: getattr(data, f"{kind.split('_')[0]}_{split}_{'label_' if '_' in kind else ''}"
                                               "data_paths")
                           for kind in ("pos", "neg", "pos_label", "neg_label")} for split in SPLIT_NAMES},
            weights={split: getattr(data, f"{split}_data_weights") for split in SPLIT_NAMES},
            seq_length=seq_length, seed=seed, num_samples=num_samples, cache_dir=data.data_cache_dir, options=options)
    return build_train_valid_test(
        data_path=data.data_path, train_data_paths=data.train_data_paths, valid_data_paths=data.valid_data_paths,
        test_data_paths=data.test_data_paths, train_data_weights=data.train_data_weights,
        valid_data_weights=data.valid_data_weights, test_data_weights=data.test_data_weights,
        train_label_data_paths=data.train_label_data_paths, valid_label_data_paths=data.valid_label_data_paths,
        test_label_data_paths=data.test_label_data_paths, train_reward_data_paths=data.train_reward_data_paths,
        valid_reward_data_paths=data.valid_reward_data_paths, test_reward_data_paths=data.test_reward_data_paths,
        split=data.split, seq_length=seq_length, seed=seed,
        num_samples=num_samples, cache_dir=data.data_cache_dir, options=options)


def _from_split(
    opener: _Opener,
    data_path: str,
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[GPTDataset | None, GPTDataset | None, GPTDataset | None]:
    indexed = opener.open(data_path, "data_path")
    ranges = split_document_ranges(split, len(indexed.sizes))
    datasets: list[GPTDataset | None] = []
    for name, (start, end), wanted in zip(SPLIT_NAMES, ranges, num_samples):
        if wanted == 0:
            datasets.append(None)
            continue
        if end <= start:
            raise DataError(
                f"split {split!r} leaves the {name} split of {data_path} empty ({len(indexed.sizes)} "
                f"documents in all) but {wanted} {name} samples are needed; give {name} a larger "
                f"share or set its iterations to 0"
            )
        documents = np.arange(start, end, dtype=np.int64)
        options = opener.options
        datasets.append(
            GPTDataset(
                name, indexed, documents, wanted, seq_length, seed, cache_dir=cache_dir,
                pack_impl=options.pack_impl, allow_chopped=options.allow_chopped,
                ref_dataset=opener.reference(data_path, "data_path"),
            )
        )
    return datasets[0], datasets[1], datasets[2]


def _blend(
    split_name: str,
    key: str,
    doc_counts: Sequence[int],
    build_member: Callable[[int, int], Any],
    weights: Sequence[float] | None,
    wanted: int,
    options: DatasetOptions,
    cache_dir: str | os.PathLike[str] | None,
) -> Any:
    """A blend of len(doc_counts) member datasets (build_member(i, samples) builds member i), weighted by `weights`
    or with weight_by_num_documents by their document counts; a single member is returned as it is."""
    if not doc_counts or wanted == 0:
        return None
    if options.weight_by_num_documents:
        # gpt-neox counts the sequences of each .idx (one per document, as preprocess_data writes them).
        weights = list(weights_by_num_docs(doc_counts, options.weighted_sampler_alpha))
    if weights is None or len(weights) == 0:
        weights = [1.0] * len(doc_counts)
    if len(weights) != len(doc_counts):
        raise DataError(
            f"{split_name}_data_weights has {len(weights)} entries but {key} has {len(doc_counts)} paths; "
            f"give one weight per path"
        )
    shares = normalized_weights(weights, f"{split_name}_data_weights")
    members = [build_member(i, wanted if len(doc_counts) == 1 else math.ceil(wanted * share * BLEND_MEMBER_MARGIN))
               for i, share in enumerate(shares)]
    if len(members) == 1:
        return members[0]
    return BlendedDataset(members, shares, wanted, cache_dir=cache_dir)


def _gpt_blend(
    opener: _Opener,
    split_name: str,
    paths: Sequence[str],
    label_paths: Sequence[str],
    reward_paths: Sequence[str],
    weights: Sequence[float] | None,
    wanted: int,
    seq_length: int,
    seed: int,
    cache_dir: str | os.PathLike[str] | None,
) -> Dataset | None:
    if not paths or wanted == 0:
        return None
    key = f"{split_name}_data_paths"
    options = opener.options
    indexed_sets = [opener.open(path, f"{key}[{i}]") for i, path in enumerate(paths)]

    def member(i: int, samples: int) -> GPTDataset:
        # Paired by position, as gpt-neox's zip_longest pairs them: paths past the last label have none.
        label = opener.open(label_paths[i], f"{split_name}_label_data_paths[{i}]") if i < len(label_paths) else None
        reward = (opener.open(reward_paths[i], f"{split_name}_reward_data_paths[{i}]") if i < len(reward_paths)
                  else None)
        return GPTDataset(
            f"{split_name}_{i}", indexed_sets[i], np.arange(len(indexed_sets[i].sizes), dtype=np.int64), samples,
            seq_length, seed, cache_dir=cache_dir, label_dataset=label, reward_dataset=reward,
            ref_dataset=opener.reference(paths[i], f"{key}[{i}]"), pack_impl=options.pack_impl,
            allow_chopped=options.allow_chopped,
        )

    return _blend(split_name, key, [len(d.sizes) for d in indexed_sets], member, weights, wanted, options, cache_dir)


def _pairwise_blend(
    opener: _Opener,
    split_name: str,
    lists: dict[str, Sequence[str]],
    weights: Sequence[float] | None,
    wanted: int,
    seq_length: int,
    seed: int,
    cache_dir: str | os.PathLike[str] | None,
) -> PairwiseDataset | BlendedDataset | None:
    """lists: "pos", "neg", "pos_label", "neg_label" -> the prefixes of this split (labels may be empty)."""
    if not lists["pos"] or wanted == 0:
        return None
    if len(lists["pos"]) != len(lists["neg"]):
        raise DataError(f"pos_{split_name}_data_paths has {len(lists['pos'])} entries but neg_{split_name}_data_paths "
                        f"has {len(lists['neg'])}; they pair up one to one")
    keys = {kind: f"{kind.split('_')[0]}_{split_name}_{'label_' if 'label' in kind else ''}data_paths"
            for kind in lists}
    opened = {kind: [opener.open(p, f"{keys[kind]}[{i}]") for i, p in enumerate(paths)]
              for kind, paths in lists.items()}

    def member(i: int, samples: int) -> PairwiseDataset:
        extra = {kind: opened[kind][i] for kind in ("pos_label", "neg_label") if opened[kind]}
        refs = {f"{side}_ref": opener.reference(lists[side][i], f"{keys[side]}[{i}]") for side in ("pos", "neg")}
        return PairwiseDataset(f"{split_name}_{i}", opened["pos"][i], opened["neg"][i], samples, seq_length, seed,
                               allow_chopped=opener.options.allow_chopped, cache_dir=cache_dir, **extra, **refs)

    return _blend(split_name, keys["pos"], [len(d.sizes) for d in opened["pos"]], member, weights, wanted,
                  opener.options, cache_dir)
