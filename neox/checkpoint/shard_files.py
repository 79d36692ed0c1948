"""One rank's layout-free shard file: a safetensors file written and read a piece at a time.

The file is plain safetensors (an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape
and byte range, then the bytes), so `safetensors.safe_open` opens it; we write and read it ourselves because
safetensors' own writer builds the whole file in memory first, and we want a reader that copies exactly the byte
ranges a rank needs straight into the tensors they belong in:
- writing streams each tensor from where it lives: a contiguous fp32 CPU tensor is written from its own memory,
  anything else (a GPU tensor, another dtype) through one staging buffer of at most BUFFER_BYTES;
- reading preads each needed run of bytes into the destination's own memory when that is a contiguous fp32 CPU
  tensor, else through the same kind of bounded buffer.
Every byte moved is counted in IOStats (tests check that a rank reads and writes ~1/N of the state).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neox.checkpoint.errors import CheckpointError

BUFFER_BYTES = 64 << 20  # the staging buffer a write or read never exceeds when it cannot work in place
_F32 = 4
_HEADER_LIMIT = 1 << 30


class ShardFileError(CheckpointError):
    pass


@dataclass
class IOStats:
    """Bytes this process moved through shard files, and the largest staging buffer it used."""
    bytes_written: int = 0
    bytes_read: int = 0  # tensor payload and headers
    files_written: int = 0
    files_opened: int = 0
    staging_peak: int = 0
    read_calls: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Staging:
    """One reusable fp32 buffer (pinned when it feeds a GPU)."""
    stats: IOStats
    tensor: torch.Tensor | None = None

    def get(self, numel: int, pinned: bool) -> torch.Tensor:
        numel = min(numel, BUFFER_BYTES // _F32)
        if self.tensor is None or self.tensor.numel() < numel or self.tensor.is_pinned() != pinned:
            self.tensor = torch.empty(numel, dtype=torch.float32, pin_memory=pinned)
            self.stats.staging_peak = max(self.stats.staging_peak, numel * _F32)
        return self.tensor[:numel]


def _in_place(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().numpy()).cast("B")


@dataclass(frozen=True)
class Entry:
    """One tensor of a shard file: stored as float32 [rows, cols], its values the flat `source` (any device/dtype)."""
    key: str
    rows: int
    cols: int
    source: torch.Tensor


def write_shard_file(path: Path, entries: list[Entry], metadata: dict[str, str], stats: IOStats) -> int:
    """Write (to a temporary name, fsynced, then renamed into place); returns the file's size in bytes."""
    header: dict[str, dict] = {"__metadata__": dict(metadata)}
    offset = 0
    for e in entries:
        if e.source.numel() != e.rows * e.cols:
            raise ShardFileError(f"{e.key}: {e.source.numel()} values for a [{e.rows}, {e.cols}] tensor")
        size = e.rows * e.cols * _F32
        header[e.key] = {"dtype": "F32", "shape": [e.rows, e.cols], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging = _Staging(stats)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for e in entries:
            _write_tensor(f, e.source.reshape(-1), staging)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    size = 8 + len(text) + offset
    stats.bytes_written += size
    stats.files_written += 1
    return size


def _write_tensor(f, flat: torch.Tensor, staging: _Staging) -> None:
    if _in_place(flat):
        f.write(_bytes_of(flat))
        return
    pinned = flat.device.type == "cuda"
    step = BUFFER_BYTES // _F32
    for start in range(0, flat.numel(), step):
        piece = flat[start:start + step]
        buf = staging.get(piece.numel(), pinned)
        buf.copy_(piece)
        f.write(_bytes_of(buf))


class ShardFile:
    """A shard file opened for reading: only its header is read until a tensor's bytes are asked for."""

    def __init__(self, path: Path, stats: IOStats):
        self.path, self.stats = path, stats
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise ShardFileError(f"cannot open layout-free shard {path}: {err.strerror}") from None
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, 8, 0)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(size - 8, _HEADER_LIMIT):
            self.close()
            raise ShardFileError(f"{path} is not a safetensors file (cut off or another format)")
        try:
            self.header = json.loads(os.pread(self.fd, length, 8))
        except ValueError:
            self.close()
            raise ShardFileError(f"{path}: unreadable safetensors header") from None
        self.data_start = 8 + length
        end = max((v["data_offsets"][1] for k, v in self.header.items() if k != "__metadata__"), default=0)
        if self.data_start + end > size:
            self.close()
            raise ShardFileError(f"{path} is {size} bytes, shorter than its header says: it was cut off")
        self.staging = _Staging(stats)
        stats.files_opened += 1
        stats.bytes_read += 8 + length

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.get("__metadata__", {})

    def read_into(self, key: str, rows: tuple[int, int], cols: tuple[int, int], dest: torch.Tensor) -> None:
        """Rows x cols of the stored [R, C] tensor `key` into dest (a 2-D view of that size whose rows are each
        contiguous): one pread per row, or one for the whole block when it spans full rows of both."""
        info = self.header.get(key)
        if info is None or info.get("dtype") != "F32":
            raise ShardFileError(f"{self.path} has no float32 tensor {key!r}")
        width = info["shape"][1]
        base = self.data_start + info["data_offsets"][0]
        (r0, r1), (c0, c1) = rows, cols
        if tuple(dest.shape) != (r1 - r0, c1 - c0):
            raise ShardFileError(f"{key}: destination {tuple(dest.shape)} for rows {rows} x cols {cols}")
        if c0 == 0 and c1 == width and dest.is_contiguous():
            self._pread(base + r0 * width * _F32, dest.reshape(-1))
            return
        for i, row in enumerate(range(r0, r1)):
            self._pread(base + (row * width + c0) * _F32, dest[i])

    def _pread(self, offset: int, dest: torch.Tensor) -> None:
        if dest.numel() == 0:
            return
        if _in_place(dest):
            self._pread_exact(offset, _bytes_of(dest))
            return
        step = BUFFER_BYTES // _F32
        pinned = dest.device.type == "cuda"
        for start in range(0, dest.numel(), step):
            piece = dest[start:start + step]
            buf = self.staging.get(piece.numel(), pinned)
            self._pread_exact(offset + start * _F32, _bytes_of(buf))
            piece.copy_(buf)

    def _pread_exact(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            got = os.preadv(self.fd, [buf[done:]], offset + done)
            if got <= 0:
                raise ShardFileError(f"{self.path}: unexpected end of file at byte {offset + done}")
            done += got
            self.stats.read_calls += 1
        self.stats.bytes_read += len(buf)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
