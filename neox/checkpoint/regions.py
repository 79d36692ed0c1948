"""Where a piece of one parameter sits in the single-device tensor: the coordinates layout-free shards are written in.

Every parameter is seen as a 2-D grid that no layout changes: a matrix [d0, d1, ...] as d0 rows of d1 x ... columns,
a vector [n] as one row of n columns. A tensor-parallel shard is a band of that grid: split along dim 0, a band of
rows (a vector: of columns); split along dim 1, a band of columns (contiguous, since the dims after it stay whole).
ZeRO flattens the shard row-major and cuts it at arbitrary element offsets; a flat range [a, b) of a band is at most
three rectangles (the end of one row, whole rows, the start of another), each of which is contiguous in the flat
range. So every piece any layout owns is a list of rectangles in the one grid, and a rank of another layout needs
exactly the intersections of its own rectangles with the stored ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


class RegionError(ValueError):
    pass


@dataclass(frozen=True)
class Rect:
    """Rows [r0, r1) x columns [c0, c1) of a parameter's grid."""
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def rows(self) -> int:
        return self.r1 - self.r0

    @property
    def cols(self) -> int:
        return self.c1 - self.c0

    @property
    def numel(self) -> int:
        return max(self.rows, 0) * max(self.cols, 0)

    def intersect(self, other: "Rect") -> "Rect | None":
        r0, r1 = max(self.r0, other.r0), min(self.r1, other.r1)
        c0, c1 = max(self.c0, other.c0), min(self.c1, other.c1)
        return Rect(r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None

    def as_list(self) -> list[int]:
        return [self.r0, self.r1, self.c0, self.c1]


def grid_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """(rows, columns) of a parameter of this single-device shape."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def tp_band(shape: tuple[int, ...] | list[int], split_dim: int | None, tp_rank: int, tp_size: int) -> Rect:
    """The rectangle of the grid that tp rank tp_rank of tp_size holds (the whole grid when not split)."""
    rows, cols = grid_shape(shape)
    if split_dim is None or tp_size == 1:
        return Rect(0, rows, 0, cols)
    if len(shape) == 1 and split_dim == 0 or len(shape) > 1 and split_dim == 1:
        width = _part(cols, tp_size, shape, split_dim)
        return Rect(0, rows, tp_rank * width, (tp_rank + 1) * width)
    if len(shape) > 1 and split_dim == 0:
        height = _part(rows, tp_size, shape, split_dim)
        return Rect(tp_rank * height, (tp_rank + 1) * height, 0, cols)
    raise RegionError(f"a tensor of shape {tuple(shape)} split along dim {split_dim} is not a band of rows or "
                      "columns; the layout-free format stores only splits along dim 0 or 1")


def _part(size: int, tp_size: int, shape, dim: int) -> int:
    if size % tp_size:
        raise RegionError(f"dim {dim} of a tensor of shape {tuple(shape)} does not split into {tp_size} shards")
    return size // tp_size


def flat_range_rects(band: Rect, start: int, stop: int) -> list[tuple[Rect, int]]:
    """The rectangles (with the offset of their first element from `start`) that elements [start, stop) of the band,
    flattened row-major, cover. Each rectangle is contiguous in that flat order."""
    width = band.cols
    if not 0 <= start <= stop <= band.numel:
        raise RegionError(f"flat range [{start}, {stop}) is outside a shard of {band.numel} elements")
    if start == stop:
        return []
    first_row, first_col = divmod(start, width)
    last_row, last_col = divmod(stop, width)
    if first_row == last_row:
        return [(Rect(band.r0 + first_row, band.r0 + first_row + 1, band.c0 + first_col, band.c0 + last_col), 0)]
    rects: list[tuple[Rect, int]] = []
    offset = 0
    if first_col:
        rects.append((Rect(band.r0 + first_row, band.r0 + first_row + 1, band.c0 + first_col, band.c1), 0))
        offset = width - first_col
        first_row += 1
    if last_row > first_row:
        rects.append((Rect(band.r0 + first_row, band.r0 + last_row, band.c0, band.c1), offset))
        offset += (last_row - first_row) * width
    if last_col:
        rects.append((Rect(band.r0 + last_row, band.r0 + last_row + 1, band.c0, band.c0 + last_col), offset))
    return rects
