"""Token-level perplexity of the model on the valid/test split of the config's data and on text files.

Method (the same for both sources): the text is one token stream, read as training reads it, cut into
windows of seq_length + 1 tokens that overlap by one token; the model reads each window's first seq_length
tokens and predicts the next token at every position. Every token of the stream except the first is thus
predicted exactly once, with the context available inside its own window (from 1 to seq_length tokens;
windows do not slide). loss = mean negative log-likelihood (nats) over the predicted tokens, perplexity =
exp(loss); loss-masked tokens (label datasets, eod_mask_loss) are left out as training leaves them out.

- Dataset splits: the split's GPTDataset (neox/data/build.py) with one epoch of samples, batched with the
  training collate (neox/data/loader.py); the document order is the dataset's shuffled one, and the last
  sample's tokens that wrap into the next epoch are not counted. The loss therefore equals the training
  run's validation loss taken over the whole split.
- Files (jsonl 'text' field, txt, parquet ...; neox/data/sources.py): documents are encoded, each followed by
  the end-of-document token (preprocess_data --append-eod), and concatenated in file order; the last window
  may be shorter.

With `char_level_ppl`, each result also has gpt-neox's character-level perplexity exp(loss x tokens / characters),
tokens and characters counted over the scored windows' text as gpt-neox's CharCounter counts evaluation samples
(neox/data/char_count.py).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neox.config.neox_config import NeoXConfig
from neox.data.build import DatasetOptions, build_train_valid_test
from neox.data.char_count import char_level_ppl, count_tokens_and_chars
from neox.data.errors import DataError
from neox.data.formats import open_indexed
from neox.data.gpt_dataset import GPTDataset
from neox.data.indexed import IndexedDataset
from neox.data.loader import collate_samples
from neox.data.sources import InputError, iter_texts
from neox.eval.errors import EvalError
from neox.eval.runner import Runner
from neox.eval.sharding import run_sharded
from neox.tokenizer import Tokenizer

PERPLEXITY_TASK = "perplexity"


@dataclass(frozen=True)
class Perplexity:
    source: str  # "valid", "test" or "file"
    path: str  # data prefix or file
    windows: int
    tokens: int
    loss: float
    perplexity: float
    # char_level_ppl only: tokens and characters of the scored windows' text, and exp(loss x tokens / characters)
    text_tokens: int | None = None
    characters: int | None = None
    char_level_perplexity: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


Batch = dict[str, torch.Tensor]  # tokens, labels, loss_mask: [b, s]


def nll_per_row(runner: Runner, batch: Batch) -> list[tuple[float, float]]:
    """(sum of -log p(label), number of counted tokens) for each row of the batch."""
    logits = runner.logits(batch["tokens"])
    labels = batch["labels"].to(logits.device)
    mask = batch["loss_mask"].to(logits.device, torch.float32)
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(mask)
    # float64 sums: a split has millions of tokens
    return [(float(n), float(c)) for n, c in zip((nll * mask).double().sum(1).tolist(), mask.double().sum(1).tolist())]


Counter = Callable[[list[int]], tuple[int, int]]  # window indices -> (text tokens, characters)


def _score_windows(
    runner: Runner, count: int, make_batch: Callable[[list[int]], Batch], batch_size: int,
    count_text: Counter | None = None,
) -> tuple[float, float, tuple[int, int] | None]:
    """Sums over `count` windows (built by make_batch from window indices), divided over the dp ranks:
    nll, counted tokens, and (with count_text) the windows' text tokens and characters."""

    def work(indices: list[int]) -> list[tuple[float, float, int, int]]:
        out: list[tuple[float, float, int, int]] = []
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            text = [count_text([i]) for i in chunk] if count_text is not None else [(0, 0)] * len(chunk)
            out += [(n, c, t, ch) for (n, c), (t, ch) in zip(nll_per_row(runner, make_batch(chunk)), text)]
        return out

    per_window = run_sharded(list(range(count)), [1] * count, work,
                             dp_rank=runner.dp_rank, dp_size=runner.dp_size, group=runner.dp_group)
    text_counts = None
    if count_text is not None:
        text_counts = (sum(w[2] for w in per_window), sum(w[3] for w in per_window))
    return math.fsum(w[0] for w in per_window), math.fsum(w[1] for w in per_window), text_counts


def _result(source: str, path: str, windows: int, nll: float, tokens: float,
            text_counts: tuple[int, int] | None = None) -> Perplexity:
    if tokens <= 0:
        raise EvalError(f"perplexity of {source} {path}: no token was counted (every label is masked)")
    loss = nll / tokens
    if text_counts is None:
        return Perplexity(source, path, windows, int(tokens), loss, math.exp(loss))
    text_tokens, chars = text_counts
    return Perplexity(source, path, windows, int(tokens), loss, math.exp(loss), text_tokens, chars,
                      char_level_ppl(loss, text_tokens, chars))


# --------------------------------------------------------------------------------------------- dataset splits

def split_datasets(cfg: NeoXConfig, seq_length: int, splits: Sequence[str]
                   ) -> tuple[list[tuple[str, str, GPTDataset]], list[str]]:
    """(split, prefix, one-epoch dataset) for each requested split the config's data has, and a note for
    each requested split that is empty or shorter than one window (skipped)."""
    data = cfg.data
    found: list[tuple[str, str, GPTDataset]] = []
    notes: list[str] = []
    if data.data_path is not None:
        candidates = [(name, data.data_path) for name in ("valid", "test") if name in splits]
    else:
        candidates = [(name, prefix) for name in ("valid", "test") if name in splits
                      for prefix in getattr(data, f"{name}_data_paths") or []]
    for name, prefix in candidates:
        key = "data_path" if data.data_path is not None else f"{name}_data_paths"
        if not IndexedDataset.exists(prefix):
            raise EvalError(f"perplexity: '{key}' names {prefix!r}, which has no .bin/.idx files")
        try:
            if data.data_path is not None:
                wanted = (0, int(name == "valid"), int(name == "test"))
                datasets = build_train_valid_test(
                    data_path=prefix, train_data_paths=None, valid_data_paths=None, test_data_paths=None,
                    train_data_weights=None, valid_data_weights=None, test_data_weights=None, split=data.split,
                    seq_length=seq_length, seed=cfg.train.seed, num_samples=wanted, cache_dir=data.data_cache_dir,
                    options=DatasetOptions(data_impl=data.data_impl))
                dataset = datasets[1] if name == "valid" else datasets[2]
            else:
                indexed = open_indexed(prefix, data.data_impl, key=key)
                dataset = GPTDataset(f"perplexity_{name}", indexed, np.arange(len(indexed.sizes), dtype=np.int64),
                                     1, seq_length, cfg.train.seed, cache_dir=data.data_cache_dir)
        except DataError as err:
            notes.append(f"{name} split of {prefix} skipped: {err}")
            continue
        found.append((name, prefix, dataset))  # type: ignore[arg-type]
    return found, notes


def dataset_perplexity(runner: Runner, split: str, prefix: str, dataset: GPTDataset, *, eod: int,
                       eod_mask_loss: bool, batch_size: int, limit: int | None = None,
                       decode: Callable[[list[int]], str] | None = None) -> Perplexity:
    if dataset.num_epochs != 1:
        raise EvalError(f"perplexity: the {split} dataset of {prefix} spans {dataset.num_epochs} epochs, expected 1")
    seq = dataset.seq_length
    epoch_tokens = dataset.tokens_per_epoch
    # Sample positions in reading order: position p holds stream tokens [p*seq, p*seq + seq].
    positions = np.argsort(np.asarray(dataset.shuffle_idx), kind="stable")
    count = len(positions) if limit is None else min(limit, len(positions))

    def make_batch(indices: list[int]) -> Batch:
        batch = collate_samples([dataset[int(positions[p])] for p in indices], eod, eod_mask_loss)
        # Labels past the epoch's last token come from the next epoch's shuffle: not part of the split.
        label_index = torch.tensor([p * seq for p in indices])[:, None] + torch.arange(1, seq + 1)[None, :]
        batch["loss_mask"] = batch["loss_mask"] * (label_index < epoch_tokens)
        return batch

    def count_text(indices: list[int]) -> tuple[int, int]:
        # The window's text up to the end of the split's epoch (the tail past it is not scored).
        rows = [dataset[int(positions[p])]["text"][: max(epoch_tokens - p * seq, 0)] for p in indices]
        return count_tokens_and_chars(rows, decode)

    nll, tokens, text = _score_windows(runner, count, make_batch, batch_size, count_text if decode else None)
    return _result(split, prefix, count, nll, tokens, text)


# --------------------------------------------------------------------------------------------- files

def file_stream(path: str | Path, tokenizer: Tokenizer) -> list[int]:
    stream: list[int] = []
    try:
        for text in iter_texts([path]):
            stream += tokenizer.encode(text)
            stream.append(tokenizer.eod)
    except InputError as err:
        raise EvalError(f"'eval_perplexity_files': {err}") from None
    if len(stream) < 2:
        raise EvalError(f"'eval_perplexity_files': {path} holds no text to score")
    return stream


def file_perplexity(runner: Runner, path: str | Path, tokenizer: Tokenizer, *, eod_mask_loss: bool,
                    batch_size: int, limit: int | None = None, char_level: bool = False) -> Perplexity:
    stream = torch.tensor(file_stream(path, tokenizer), dtype=torch.long)
    seq = runner.max_length
    starts = list(range(0, len(stream) - 1, seq))
    count = len(starts) if limit is None else min(limit, len(starts))

    def make_batch(indices: list[int]) -> Batch:
        windows = [stream[starts[i] : starts[i] + seq + 1] for i in indices]
        width = max(len(w) for w in windows) - 1
        batch = {name: torch.zeros(len(windows), width, dtype=torch.long) for name in ("tokens", "labels")}
        batch["loss_mask"] = torch.zeros(len(windows), width)
        for row, window in enumerate(windows):
            n = len(window) - 1
            batch["tokens"][row, :n] = window[:-1]
            batch["labels"][row, :n] = window[1:]
            batch["loss_mask"][row, :n] = 1.0
        if eod_mask_loss:
            batch["loss_mask"][batch["tokens"] == tokenizer.eod] = 0.0
        return batch

    def count_text(indices: list[int]) -> tuple[int, int]:
        return count_tokens_and_chars((stream[starts[i] : starts[i] + seq + 1].tolist() for i in indices),
                                      tokenizer.decode)

    nll, tokens, text = _score_windows(runner, count, make_batch, batch_size, count_text if char_level else None)
    return _result("file", str(path), count, nll, tokens, text)


def run_perplexity(runner: Runner, cfg: NeoXConfig, tokenizer: Tokenizer) -> tuple[list[Perplexity], list[str]]:
    """Perplexity of every source the config names, and notes on the splits skipped."""
    settings = cfg.eval
    results = []
    datasets, notes = split_datasets(cfg, runner.max_length, settings.eval_perplexity_splits)
    for split, prefix, dataset in datasets:
        results.append(dataset_perplexity(runner, split, prefix, dataset, eod=tokenizer.eod,
                                          eod_mask_loss=cfg.data.eod_mask_loss, batch_size=settings.eval_batch_size,
                                          limit=settings.eval_limit,
                                          decode=tokenizer.decode if cfg.data.char_level_ppl else None))
    for path in settings.eval_perplexity_files or []:
        results.append(file_perplexity(runner, path, tokenizer, eod_mask_loss=cfg.data.eod_mask_loss,
                                       batch_size=settings.eval_batch_size, limit=settings.eval_limit,
                                       char_level=cfg.data.char_level_ppl))
    if not results:
        why = f" ({'; '.join(notes)})" if notes else ""
        raise EvalError(
            "the 'perplexity' task found nothing to score: the config has no data_path / valid_data_paths / "
            f"test_data_paths with a usable valid or test split{why}, and 'eval_perplexity_files' is unset; "
            "pass --eval_perplexity_files FILE.jsonl or the data keys of the training config"
        )
    return results, notes
