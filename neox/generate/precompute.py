"""text_gen_type: precompute: the `load` model's per-token log-probs of every data document, written next to the data
for a dpo run to read instead of running a live reference model (precompute_model_name).

gpt-neox's format (megatron/text_generation_utils.py precompute_logits): for each data prefix P (train/valid/test
data paths, or the pos/neg ones of pairwise data) a float32 indexed dataset P_{precompute_model_name}, document k
holding seq_length values: document k of P cut to seq_length + 1 tokens and padded with token 0, value t the fp32
log p(token t + 1 | tokens 0..t). The reader pads them back to seq_length + 1 and drops the last, so value t lines
up with the label at t (neox/data/loader.py "ref_token_logps"); the dpo objective sums them over the trained labels.
Where gpt-neox differs: it rounds the document count up to a multiple of 8 (extra documents that wrap around, never
read); here the file holds exactly one document per data document. Like gpt-neox, an existing output is kept.

Every rank holds the whole model (generate loads it so) and takes every world_size-th document of each batch
round; rank 0 gathers them in order and writes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neox.config.neox_config import NeoXConfig
from neox.data.formats import open_indexed
from neox.data.indexed import IndexedDatasetWriter, IndexedDataset
from neox.parallel.runtime import Runtime

# The data keys whose datasets get reference log-probs, in gpt-neox's order.
DATA_KEYS = ("data_path", "train_data_paths", "test_data_paths", "valid_data_paths", "pos_train_data_paths",
             "neg_train_data_paths", "pos_valid_data_paths", "neg_valid_data_paths", "pos_test_data_paths",
             "neg_test_data_paths")


def data_prefixes(cfg: NeoXConfig) -> list[tuple[str, str]]:
    """(key, prefix) of every data prefix of the config, each once."""
    out: dict[str, str] = {}
    for key in DATA_KEYS:
        value = getattr(cfg.data, key)
        for i, prefix in enumerate([value] if isinstance(value, str) else value or []):
            out.setdefault(str(prefix), f"{key}[{i}]" if not isinstance(value, str) else key)
    return [(key, prefix) for prefix, key in out.items()]


def token_log_probs(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """[b, seq_length] fp32 log p(rows[:, t + 1] | rows[:, :t + 1]) of [b, seq_length + 1] token rows."""
    tokens, labels = rows[:, :-1], rows[:, 1:]
    logits = model(tokens, position_ids=torch.arange(tokens.shape[1]).expand_as(tokens))
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, labels.unsqueeze(2)).squeeze(2)


def _rows(documents, first: int, count: int, width: int) -> torch.Tensor:
    rows = np.zeros((count, width), dtype=np.int64)  # pad token 0, as gpt-neox
    for r in range(count):
        doc = documents.get(first + r, 0, min(int(documents.sizes[first + r]), width))
        rows[r, :len(doc)] = doc
    return torch.from_numpy(rows)


def _gather(mine: np.ndarray, world_size: int) -> list[np.ndarray]:
    if world_size == 1:
        return [mine]
    parts: list[np.ndarray | None] = [None] * world_size
    torch.distributed.all_gather_object(parts, mine)
    return parts


def _from_rank0(value: bool, world_size: int) -> bool:
    if world_size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def write_one(model: torch.nn.Module, documents, out: Path, seq_length: int, batch: int, runtime: Runtime) -> None:
    n, rank, world = len(documents), runtime.rank, runtime.world_size
    writer = IndexedDatasetWriter(out, np.float32, values=True) if rank == 0 else None
    try:
        for first in range(0, n, batch * world):
            # This round's documents [first, first + batch x world): rank r takes the r-th block of `batch`.
            start = min(first + rank * batch, n)
            count = min(batch, n - start)
            mine = (token_log_probs(model, _rows(documents, start, count, seq_length + 1).to(runtime.device))
                    .cpu().numpy() if count > 0 else np.zeros((0, seq_length), np.float32))
            parts = _gather(mine, world)
            if writer is not None:
                for part in parts:
                    for values in part:
                        writer.add_document(values)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.finalize()


@torch.no_grad()
def precompute(model: torch.nn.Module, cfg: NeoXConfig, runtime: Runtime) -> list[Path]:
    """Write {prefix}_{precompute_model_name} for every data prefix that has none yet; the prefixes written."""
    name = cfg.post_training.precompute_model_name
    seq_length = cfg.model.seq_length
    written = []
    for key, prefix in data_prefixes(cfg):
        out = Path(f"{prefix}_{name}")
        if _from_rank0(IndexedDataset.exists(out), runtime.world_size):  # every rank decides alike
            if runtime.rank == 0:
                print(f"neox.generate: {out} exists, kept", flush=True)
            continue
        documents = open_indexed(prefix, cfg.data.data_impl, key=key)
        write_one(model, documents, out, seq_length, cfg.generate.generate_batch_size, runtime)
        written.append(out)
        if runtime.rank == 0:
            print(f"neox.generate: reference log-probs of {len(documents)} documents of {prefix} written to {out}",
                  flush=True)
    return written
