"""Checks of the checkpoint-upload keys s3_path and s3_chunk_size (the upload is neox/checkpoint/s3_upload.py)."""
from __future__ import annotations

import importlib.util

from neox.config.errors import ConfigError

# S3's multipart limits: every part but the last is at least 5 MiB, and none is over 5 GiB.
MIN_PART_BYTES = 5 * 1024 * 1024
MAX_PART_BYTES = 5 * 1024 * 1024 * 1024


def split_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix')."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise ConfigError(f"'s3_path' must look like s3://bucket[/prefix], got {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


def check_s3_settings(s3_path: str | None, chunk_size: int, save: str | None) -> None:
    if not MIN_PART_BYTES <= chunk_size <= MAX_PART_BYTES:
        raise ConfigError(f"'s3_chunk_size' must be between {MIN_PART_BYTES} (5 MiB) and {MAX_PART_BYTES} (5 GiB), "
                          f"S3's multipart part sizes; got {chunk_size}")
    if s3_path is None:
        return
    split_s3_url(s3_path)
    if save is None:
        raise ConfigError("'s3_path' uploads the checkpoints written to 'save', which is not set")
    if importlib.util.find_spec("boto3") is None:
        raise ConfigError("'s3_path' needs the boto3 package (pip install 'neox[s3]' or pip install boto3)")
