"""Training state that any layout can resume from: weights, Adam moments and step count per GPTNeoX parameter.

DeepSpeed's own files are tied to the layout that wrote them (tp files, pipeline layer files, ZeRO partitions over
dp). Next to them every checkpoint gets

    global_stepN/layout_free/rank{R}.safetensors   what rank R owns, written by every rank in parallel
    global_stepN/layout_free/index.json            which rectangle of which parameter is in which file

Each rank writes only the fp32 values and Adam moments it owns after ZeRO partitioning (its tp shard of its stage's
parameters, cut by ZeRO into its flat partition; at ZeRO 0 the dp ranks split the replica they share), each piece
addressed by its place in the single-device tensor (neox/checkpoint/regions.py), straight from the engine's memory.
A resume at another layout (any change of tp, pp, dp or ZeRO stage) computes the ranges its own engine holds and
reads exactly those bytes into the engine's tensors (neox/checkpoint/layout_sources.py): with ZeRO >= 1 every rank
reads ~1/N of the state, and 16-bit / module copies are refreshed by one all-gather over dp, as after a step. No
rank ever holds more than its own shard plus one bounded staging buffer (shard_files.BUFFER_BYTES), except an
asynchronous save (checkpoint_async), which copies its shard to host memory once and writes the copy in the
background. Checkpoints of the previous format (pp{S}-tp{T}.pt) still load. Saved with checkpoint_layout_free:
false, the copy is rebuilt offline from DeepSpeed's files (neox/checkpoint/layout_rebuild.py,
tools/reshard_checkpoint.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from neox.checkpoint.engine_state import write_text_atomic
from neox.checkpoint.layout_engine import (MOMENTS, WEIGHT, FlatRange, destinations, optimizer_step,
                                           owned_ranges)
from neox.checkpoint.layout_sources import (FORMAT, INDEX, LEGACY_FORMAT, STATE_DIR, LayoutStateError,
                                            has_layout_free_state, open_source, fill, tensor_key)
from neox.checkpoint.regions import Rect, flat_range_rects, grid_shape, tp_band
from neox.checkpoint.shard_files import Entry, IOStats, write_shard_file
from neox.parallel.sharding import tp_split_dim
from neox.parallel.topology import Topology

__all__ = ["FORMAT", "LEGACY_FORMAT", "MOMENTS", "STATE_DIR", "FullState", "LayoutStateError", "OfflineWriter",
           "StageShard", "consolidated_weights", "has_layout_free_state", "has_optimizer_state", "layout_of",
           "load_layout_free_state",
           "param_names_of", "read_layout_free_state", "save_layout_free_state"]

_TIED_HEAD, _EMBEDDING = "head.weight", "embedding.word_embeddings.weight"


@dataclass
class FullState:
    """Single-device training state: name -> tensor for the weights and each Adam moment."""
    step: float
    client_state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # moment -> name -> tensor


def _shard_name(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


# --------------------------------------------------------------------------------------------- saving

@dataclass
class ShardWrite:
    """One rank's part of a save: the file to write and what it holds. write() is what a background writer runs."""
    path: Path
    entries: list[Entry]
    metadata: dict[str, str]
    stats: IOStats = field(default_factory=IOStats)

    @property
    def nbytes(self) -> int:
        return sum(e.rows * e.cols * 4 for e in self.entries)

    def snapshot(self) -> "ShardWrite":
        """The same write from a host copy of its tensors (pinned when they are on a GPU): training may then change
        the originals. One allocation of the shard's size."""
        total = sum(e.source.numel() for e in self.entries)
        on_gpu = any(e.source.device.type == "cuda" for e in self.entries)
        host = torch.empty(total, dtype=torch.float32, pin_memory=on_gpu)
        copied, offset = [], 0
        for e in self.entries:
            n = e.source.numel()
            host[offset:offset + n].copy_(e.source.reshape(-1), non_blocking=on_gpu)
            copied.append(Entry(e.key, e.rows, e.cols, host[offset:offset + n]))
            offset += n
        if on_gpu:
            torch.cuda.synchronize()
        self.stats.staging_peak = max(self.stats.staging_peak, total * 4)
        return ShardWrite(self.path, copied, self.metadata, self.stats)

    def write(self) -> int:
        return write_shard_file(self.path, self.entries, self.metadata, self.stats)


def _pieces_of(ranges: list[FlatRange], kinds: tuple[str, ...]) -> tuple[list[Entry], dict[str, list[list[int]]]]:
    entries: list[Entry] = []
    rects: dict[str, list[list[int]]] = {}
    for fr in ranges:
        for rect, offset in flat_range_rects(fr.band, fr.start, fr.stop):
            rects.setdefault(fr.name, []).append(rect.as_list())
            for kind in kinds:
                source = fr.tensors[kind][offset:offset + rect.numel]
                entries.append(Entry(tensor_key(kind, fr.name, rect), rect.rows, rect.cols, source))
    return entries, rects


def _all_agree(flag: bool) -> bool:
    if not torch.distributed.is_initialized():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if torch.distributed.get_backend() == "nccl":
        value = value.cuda()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def _gather_to_rank0(obj: Any) -> list[Any] | None:
    if not torch.distributed.is_initialized():
        return [obj]
    rank = torch.distributed.get_rank()
    out = [None] * torch.distributed.get_world_size() if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def save_layout_free_state(ckpt_dir: Path, engine, param_names: dict[int, str], topo: Topology,
                           client_state: dict[str, Any], with_moments: bool = True,
                           submit: Callable[[ShardWrite], None] | None = None) -> ShardWrite:
    """Collective: every rank writes the file of what it owns; global rank 0 also writes index.json.
    with_moments False (no_save_optim) writes the weights alone. submit None writes now (from the engine's own
    memory, no copy); otherwise the shard is copied to host memory and handed to submit (a background writer),
    and the caller must make sure the write is done before the checkpoint counts as complete. Returns the write
    (its stats count the bytes once written)."""
    ranges, holds_moments = owned_ranges(engine, param_names, topo, with_moments)
    # Before the first step there is no Adam state anywhere: such a checkpoint has the weights only.
    moments = with_moments and _all_agree(holds_moments)
    kinds = (WEIGHT, *MOMENTS) if moments else (WEIGHT,)
    entries, rects = _pieces_of(ranges, kinds)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    folder = ckpt_dir / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    mine = {"file": _shard_name(rank), "rects": rects, "shapes": {fr.name: list(fr.full_shape) for fr in ranges}}
    gathered = _gather_to_rank0(mine)
    if gathered is not None:
        _write_index(folder, gathered, optimizer_step(engine), client_state, kinds,
                     {"tp": topo.tp_size, "pp": topo.pp_size, "dp": topo.dp_size})
    write = ShardWrite(folder / _shard_name(rank), entries, {"format": FORMAT, "rank": str(rank)})
    if submit is None:
        write.write()
    else:
        submit(write.snapshot())
    return write


def _write_index(folder: Path, per_rank: list[dict], step: float, client_state: dict[str, Any],
                 kinds: tuple[str, ...], written_at: dict[str, int]) -> None:
    """per_rank: each shard file's name, its rectangles by parameter and its parameters' full shapes."""
    files = [part["file"] for part in per_rank]
    pieces: dict[str, list[list[int]]] = {}
    shapes: dict[str, list[int]] = {}
    for index, part in enumerate(per_rank):
        shapes.update(part["shapes"])
        for name, rects in part["rects"].items():
            pieces.setdefault(name, []).extend([index, *rect] for rect in rects)
    index = {"format": FORMAT, "step": float(step), "client_state": client_state, "kinds": list(kinds),
             "written_at": {**written_at, "world": len(per_rank)}, "files": files, "params": shapes,
             "pieces": pieces}
    write_text_atomic(folder / INDEX, json.dumps(index, separators=(",", ":")) + "\n")


@dataclass(frozen=True)
class StageShard:
    """Which (pipeline stage, tp rank) of which layout a shard rebuilt offline holds."""
    pp_rank: int
    pp_size: int
    tp_rank: int
    tp_size: int


class OfflineWriter:
    """Writes the layout-free copy of a checkpoint one (stage, tp rank) at a time from whole tp shards (what
    tools/reshard_checkpoint.py reads out of DeepSpeed's files), then its index."""

    def __init__(self, ckpt_dir: Path):
        self.folder = ckpt_dir / STATE_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parts: list[dict] = []
        self.kinds: tuple[str, ...] | None = None
        self.step, self.client_state = 0.0, {}
        self.stats = IOStats()

    def add(self, shard: StageShard, step: float, client_state: dict[str, Any], weights: dict[str, torch.Tensor],
            moments: dict[str, dict[str, torch.Tensor]], split_dims: dict[str, int] | None = None) -> Path:
        kinds = (WEIGHT, *MOMENTS) if all(moments.get(k) for k in MOMENTS) else (WEIGHT,)
        self.kinds = kinds if self.kinds is None else tuple(k for k in self.kinds if k in kinds)
        if (shard.pp_rank, shard.tp_rank) == (0, 0):
            self.step, self.client_state = float(step), dict(client_state)
        ranges = []
        for name, weight in weights.items():
            dim = tp_split_dim(name, split_dims) if shard.tp_size > 1 else None
            if dim is None and shard.tp_rank != 0:
                continue  # tp-replicated: tp rank 0's copy is the one stored
            full = list(weight.shape)
            if dim is not None:
                full[dim] *= shard.tp_size
            band = tp_band(full, dim, shard.tp_rank, shard.tp_size)
            tensors = {WEIGHT: weight.reshape(-1)}
            tensors.update({k: moments[k][name].reshape(-1) for k in MOMENTS if k in kinds})
            ranges.append(FlatRange(name, tuple(full), band, 0, band.numel, tensors))
        entries, rects = _pieces_of(ranges, kinds)
        name = f"pp{shard.pp_rank:02d}-tp{shard.tp_rank:02d}.safetensors"
        write_shard_file(self.folder / name, entries, {"format": FORMAT}, self.stats)
        self.parts.append({"file": name, "rects": rects, "shapes": {fr.name: list(fr.full_shape) for fr in ranges}})
        return self.folder / name

    def finish(self, written_at: dict[str, int]) -> Path:
        _write_index(self.folder, self.parts, self.step, self.client_state, self.kinds or (WEIGHT,), written_at)
        return self.folder


# --------------------------------------------------------------------------------------------- loading

@dataclass
class LoadedState:
    """What a layout-free load returns besides the engine's new values."""
    step: float
    client_state: dict[str, Any]
    written_at: dict[str, int]
    stats: IOStats


def load_layout_free_state(engine, param_names: dict[int, str], topo: Topology, ckpt_dir: Path,
                           weights_only: bool = False, resizable_rows: frozenset[str] = frozenset()) -> LoadedState:
    """Read exactly this rank's ranges of the checkpoint into the engine: its fp32 weights and (unless weights_only,
    or the checkpoint has none) the Adam moments and step. Collective when the engine refreshes its 16-bit copies by
    an all-gather (ZeRO 1/2, bf16): every rank calls it. resizable_rows: parameters whose row count may differ
    (vocabulary re-padding, neox/checkpoint/vocab_padding.py)."""
    stats = IOStats()
    source = open_source(ckpt_dir, stats)
    try:
        with_moments = not weights_only and all(k in source.kinds for k in MOMENTS)
        plan = destinations(engine, param_names, topo, source.step, with_moments)
        with torch.no_grad():
            fill(source, plan.ranges, resizable_rows)
    finally:
        source.close()
    for finish in plan.finish:
        finish()
    return LoadedState(source.step, source.client_state, dict(source.written_at), stats)


def read_layout_free_state(ckpt_dir: Path, kinds: tuple[str, ...] | None = None) -> FullState:
    """The whole single-device state of a checkpoint (for export and inspection: the full model in memory)."""
    source = open_source(ckpt_dir)
    wanted = tuple(k for k in (kinds or source.kinds) if k in source.kinds)
    try:
        tensors: dict[str, dict[str, torch.Tensor]] = {k: {} for k in wanted}
        ranges = []
        for name, shape in source.shapes.items():
            views = {}
            for kind in wanted:
                tensors[kind][name] = torch.empty(shape, dtype=torch.float32)
                views[kind] = tensors[kind][name].reshape(-1)
            rows, cols = grid_shape(shape)
            ranges.append(FlatRange(name, tuple(shape), Rect(0, rows, 0, cols), 0, rows * cols, views))
        fill(source, ranges)
    finally:
        source.close()
    moments = {k: tensors[k] for k in MOMENTS if k in tensors}
    return FullState(step=source.step, client_state=source.client_state, weights=tensors.get(WEIGHT, {}),
                     moments=moments)


def consolidated_weights(ckpt_dir: Path, tied_head: bool) -> dict[str, torch.Tensor]:
    """The single-device state dict (GPTNeoX.state_dict() keys) of a checkpoint at any layout."""
    weights = dict(read_layout_free_state(ckpt_dir, kinds=(WEIGHT,)).weights)
    if tied_head:
        weights[_TIED_HEAD] = weights[_EMBEDDING]
    return weights


def layout_of(cfg) -> dict[str, int]:
    """What DeepSpeed's own checkpoint files depend on; a change in any of these resumes from layout-free state."""
    layout = {"model_parallel_size": cfg.parallel.model_parallel_size,
              "pipe_parallel_size": cfg.parallel.pipe_parallel_size,
              "data_parallel_size": cfg.derived.data_parallel_size,
              "zero_stage": cfg.optim.zero_stage}
    if cfg.parallel.moe_expert_parallel_size > 1:  # (absent in configs from before expert parallelism)
        layout["moe_expert_parallel_size"] = cfg.parallel.moe_expert_parallel_size
    return layout


def has_optimizer_state(ckpt_dir: Path) -> bool:
    """The layout-free copy holds Adam moments (not a no_save_optim checkpoint's weights alone, nor a checkpoint
    saved before the first optimizer step at ZeRO 0, whose optimizer had no state yet)."""
    if not has_layout_free_state(ckpt_dir):
        return False
    source = open_source(ckpt_dir)
    try:
        return all(k in source.kinds for k in MOMENTS)
    finally:
        source.close()


def param_names_of(train_engine) -> dict[int, str]:
    """id(parameter) -> single-device name; a parallel engine records them before wrapping the model."""
    names = getattr(train_engine, "param_names", None)
    if names is None:
        names = {id(p): n for n, p in train_engine.engine.module.named_parameters()}
    return names
