"""Index arrays built once and shared by every rank: locked, atomic, memory-mapped ``.npy`` files.

The first rank that finds a cache entry missing takes an exclusive ``fcntl`` lock on
``<stem>.lock``, checks again, builds and writes each array under a temporary name before
``os.replace``; the other ranks block on the lock and then load what it wrote.
"""
from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from neox.data.errors import DataError

__all__ = ["default_cache_dir", "load_or_build", "array_path"]


def default_cache_dir() -> Path:
    """Where indices go when the data directory is read-only and no cache_dir was given."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "neox" / "index-cache"


def directories_for(prefix: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Where a dataset's index entries are looked up, in order: cache_dir (if given), next to the data, the default
    cache directory; load_or_build writes into the first writable one."""
    directories = [Path(os.fspath(prefix)).resolve().parent, default_cache_dir()]
    return ([Path(cache_dir)] if cache_dir is not None else []) + directories


def array_path(directory: Path, stem: str, name: str) -> Path:
    return directory / f"{stem}_{name}.npy"


def _complete(directory: Path, stem: str, names: Sequence[str]) -> bool:
    return all(array_path(directory, stem, name).is_file() for name in names)


def _load(directory: Path, stem: str, names: Sequence[str]) -> dict[str, np.ndarray]:
    return {name: np.load(array_path(directory, stem, name), mmap_mode="r") for name in names}


def _save_atomically(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as stream:
            np.save(stream, np.ascontiguousarray(array), allow_pickle=False)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _open_lock(directory: Path, stem: str) -> int:
    """A descriptor on the entry's lock file; OSError when the directory is not writable."""
    directory.mkdir(parents=True, exist_ok=True)
    return os.open(directory / f"{stem}.lock", os.O_CREAT | os.O_RDWR, 0o644)


def load_or_build(
    stem: str,
    names: Sequence[str],
    build: Callable[[], Mapping[str, np.ndarray]],
    directories: Sequence[Path],
    *,
    use_lock: bool = True,
) -> tuple[dict[str, np.ndarray], Path]:
    """Load arrays ``names`` of entry ``stem`` from the first directory holding all of them, or
    build them into the first writable directory. Returns read-only memory maps and that directory.
    """
    for directory in directories:
        if _complete(directory, stem, names):
            return _load(directory, stem, names), directory
    failures: list[str] = []
    built: Mapping[str, np.ndarray] | None = None  # kept if writing to one directory fails
    for directory in directories:
        try:
            lock = _open_lock(directory, stem) if use_lock else None
        except OSError as err:
            failures.append(f"{directory}: {err.strerror or err}")
            continue
        try:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not _complete(directory, stem, names):
                arrays = built = built if built is not None else build()
                missing = set(names) - set(arrays)
                if missing:
                    raise RuntimeError(f"index builder for {stem} returned no {sorted(missing)}")
                directory.mkdir(parents=True, exist_ok=True)
                for name in names:
                    _save_atomically(array_path(directory, stem, name), arrays[name])
            return _load(directory, stem, names), directory
        except OSError as err:  # read-only mount, full disk...: try the next directory
            failures.append(f"{directory}: {err.strerror or err}")
        finally:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)
                os.close(lock)
    raise DataError(
        f"cannot write index cache {stem}: no writable directory ({'; '.join(failures)}); "
        f"pass a writable cache_dir"
    )
