"""Reading a checkpoint's layout-free state a rectangle at a time, from either format it has been written in.

- neox-layout-free/2 (now): layout_free/index.json lists, per parameter, the rectangles of its grid
  (neox/checkpoint/regions.py) that each shard file holds; a shard file (rank{R}.safetensors, or pp{S}-tp{T}.safetensors
  when rebuilt offline) holds them as float32 tensors named "{kind}/{parameter}@{row},{col}". Only the byte ranges a
  reader asks for are read.
- neox-layout-free/1 (before): one torch file per (pipeline stage, tp rank), pp{S}-tp{T}.pt, with the full
  dp-gathered tp shard of each parameter. Opened memory-mapped, so these too are read only where needed.
fill() copies a source into flat views of an engine's tensors (neox/checkpoint/layout_engine.py), checking that the
stored rectangles cover every element asked for.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.layout_engine import MOMENTS, WEIGHT, FlatRange
from neox.checkpoint.regions import Rect, flat_range_rects, grid_shape, tp_band
from neox.checkpoint.shard_files import IOStats, ShardFile, ShardFileError
from neox.parallel.sharding import tp_split_dim

STATE_DIR = "layout_free"
INDEX = "index.json"
FORMAT = "neox-layout-free/2"
LEGACY_FORMAT = "neox-layout-free/1"
_REBUILD_HINT = "python tools/reshard_checkpoint.py --checkpoint {ckpt} --force"


class LayoutStateError(CheckpointError):
    pass


def tensor_key(kind: str, name: str, rect: Rect) -> str:
    return f"{kind}/{name}@{rect.r0},{rect.c0}"


@dataclass(frozen=True)
class StoredPiece:
    rect: Rect
    handle: Any  # the source's own locator


class IndexedSource:
    """neox-layout-free/2."""

    def __init__(self, ckpt_dir: Path, stats: IOStats | None = None):
        self.dir = ckpt_dir / STATE_DIR
        self.stats = stats or IOStats()
        try:
            text = (self.dir / INDEX).read_bytes()
            index = json.loads(text)
        except (OSError, ValueError) as err:
            raise LayoutStateError(f"{self.dir / INDEX} is unreadable ({err}): resume from another checkpoint") from None
        self.stats.bytes_read += len(text)
        if index.get("format") != FORMAT:
            raise LayoutStateError(f"{self.dir / INDEX} is of format {index.get('format')!r}, not {FORMAT!r}")
        self.step = float(index["step"])
        self.client_state = index["client_state"]
        self.kinds = tuple(index["kinds"])
        self.shapes = {name: tuple(shape) for name, shape in index["params"].items()}
        self.files = index["files"]
        self.written_at = index.get("written_at", {})
        self._pieces = {name: [StoredPiece(Rect(*rect), file) for file, *rect in entries]
                        for name, entries in index["pieces"].items()}
        self._open: dict[int, ShardFile] = {}

    def pieces(self, name: str) -> list[StoredPiece]:
        return self._pieces.get(name, [])

    def read(self, name: str, piece: StoredPiece, kind: str, inter: Rect, dest: torch.Tensor) -> None:
        shard = self._open.get(piece.handle)
        if shard is None:
            try:
                shard = self._open[piece.handle] = ShardFile(self.dir / self.files[piece.handle], self.stats)
            except ShardFileError as err:
                raise LayoutStateError(f"{err}; resume from another checkpoint") from None
        rect = piece.rect
        shard.read_into(tensor_key(kind, name, rect), (inter.r0 - rect.r0, inter.r1 - rect.r0),
                        (inter.c0 - rect.c0, inter.c1 - rect.c0), dest)

    def close(self) -> None:
        for shard in self._open.values():
            shard.close()
        self._open.clear()


class LegacySource:
    """neox-layout-free/1: pp{S}-tp{T}.pt files of whole tp shards, memory-mapped."""

    def __init__(self, ckpt_dir: Path, stats: IOStats | None = None):
        self.dir = ckpt_dir / STATE_DIR
        self.stats = stats or IOStats()
        files = sorted(self.dir.glob("pp*-tp*.pt"))
        payloads = {}
        for f in files:
            try:
                payloads[f.name] = torch.load(f, mmap=True, weights_only=True)
            except Exception as err:  # a cut-off or foreign file: torch raises several types
                raise LayoutStateError(f"{f} is unreadable ({type(err).__name__}: {err}); rebuild the copy with "
                                       f"`{_REBUILD_HINT.format(ckpt=ckpt_dir)}`") from None
        first = next(iter(payloads.values()))
        tp_size, pp_size = first["tp_size"], first["pp_size"]
        by_coord = {(p["pp_rank"], p["tp_rank"]): p for p in payloads.values()}
        missing = [f"pp{s:02d}-tp{t:02d}.pt" for s in range(pp_size) for t in range(tp_size) if (s, t) not in by_coord]
        if missing or any(p.get("format") != LEGACY_FORMAT for p in payloads.values()):
            raise LayoutStateError(f"{self.dir} is incomplete or of another format (missing {missing}); resume from "
                                   "another checkpoint")
        zero = by_coord[(0, 0)]
        self.step, self.client_state = float(zero["step"]), zero["client_state"]
        with_moments = all(p["moments"].get(k) for p in payloads.values() for k in MOMENTS)
        self.kinds = (WEIGHT, *MOMENTS) if with_moments else (WEIGHT,)
        self.written_at = {"tp": tp_size, "pp": pp_size}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._pieces: dict[str, list[StoredPiece]] = {}
        for payload in payloads.values():
            tp_rank = payload["tp_rank"]
            for name, tensor in payload["weights"].items():
                dim = tp_split_dim(name, payload.get("split_dims")) if tp_size > 1 else None
                if dim is None and tp_rank != 0:
                    continue  # a tp-replicated tensor: every tp file has it
                full = list(tensor.shape)
                if dim is not None:
                    full[dim] *= tp_size
                self.shapes[name] = tuple(full)
                self._pieces.setdefault(name, []).append(
                    StoredPiece(tp_band(full, dim, tp_rank, tp_size), payload))

    def pieces(self, name: str) -> list[StoredPiece]:
        return self._pieces.get(name, [])

    def read(self, name: str, piece: StoredPiece, kind: str, inter: Rect, dest: torch.Tensor) -> None:
        payload, rect = piece.handle, piece.rect
        stored = payload["weights"][name] if kind == WEIGHT else payload["moments"][kind][name]
        grid = stored.reshape(rect.rows, rect.cols)
        dest.copy_(grid[inter.r0 - rect.r0:inter.r1 - rect.r0, inter.c0 - rect.c0:inter.c1 - rect.c0])
        self.stats.bytes_read += inter.numel * stored.element_size()

    def close(self) -> None:
        pass


Source = IndexedSource | LegacySource


def has_layout_free_state(ckpt_dir: Path) -> bool:
    folder = ckpt_dir / STATE_DIR
    return folder.is_dir() and ((folder / INDEX).is_file() or any(folder.glob("pp*-tp*.pt")))


def open_source(ckpt_dir: Path, stats: IOStats | None = None) -> Source:
    folder = ckpt_dir / STATE_DIR
    if (folder / INDEX).is_file():
        return IndexedSource(ckpt_dir, stats)
    if folder.is_dir() and any(folder.glob("pp*-tp*.pt")):
        return LegacySource(ckpt_dir, stats)
    raise LayoutStateError(f"{ckpt_dir} has no {STATE_DIR}/ files (saved with checkpoint_layout_free: false, or by an "
                           f"older neox): build them with `python tools/reshard_checkpoint.py --checkpoint "
                           f"{ckpt_dir}`, or resume at the layout that wrote it")


def fill(source: Source, ranges: list[FlatRange], resizable_rows: frozenset[str] = frozenset()) -> None:
    """Copy every range's elements of each kind it asks for from the source. A parameter in resizable_rows may have
    another number of rows (dim 0) in the checkpoint than in the model (a re-padded vocabulary): rows past the
    checkpoint's are filled with zeros; rows past the model's are never asked for."""
    for fr in ranges:
        saved = source.shapes.get(fr.name)
        if saved is None:
            raise LayoutStateError(f"the checkpoint's layout-free state lacks {fr.name}: it is of another model")
        saved_rows = _saved_rows(fr, saved, resizable_rows)
        pieces = source.pieces(fr.name)
        for kind, flat in fr.tensors.items():
            if kind not in source.kinds:
                raise LayoutStateError(f"the checkpoint's layout-free state has no {kind} (saved without optimizer "
                                       "state)")
            if not flat.is_contiguous() or flat.dim() != 1:
                raise LayoutStateError(f"{fr.name}: the engine's {kind} is not a flat contiguous view")
            for rect, offset in flat_range_rects(fr.band, fr.start, fr.stop):
                chunk = flat[offset:offset + rect.numel].view(rect.rows, rect.cols)
                covered = 0
                for piece in pieces:
                    inter = rect.intersect(piece.rect)
                    if inter is not None:
                        source.read(fr.name, piece, kind, inter, chunk[inter.r0 - rect.r0:inter.r1 - rect.r0,
                                                                       inter.c0 - rect.c0:inter.c1 - rect.c0])
                        covered += inter.numel
                if rect.r1 > saved_rows:
                    first = max(rect.r0, saved_rows)
                    with torch.no_grad():
                        chunk[first - rect.r0:].zero_()
                    covered += (rect.r1 - first) * rect.cols
                if covered != rect.numel:
                    raise LayoutStateError(f"the checkpoint's layout-free state covers {covered} of the {rect.numel} "
                                           f"elements of {fr.name} ({kind}) rows {rect.r0}..{rect.r1 - 1}, columns "
                                           f"{rect.c0}..{rect.c1 - 1}: it is incomplete")


def _saved_rows(fr: FlatRange, saved: tuple[int, ...], resizable_rows: frozenset[str]) -> int:
    if tuple(saved) == tuple(fr.full_shape):
        return grid_shape(saved)[0]
    if fr.name in resizable_rows and len(saved) == len(fr.full_shape) > 1 and saved[1:] == fr.full_shape[1:]:
        return saved[0]
    raise LayoutStateError(f"{fr.name}: checkpoint shape {tuple(saved)} vs model {tuple(fr.full_shape)}")
