"""Upload finished checkpoints to S3 (gpt-neox's s3_path / s3_chunk_size) without holding up training.

Rank 0 hands each complete checkpoint directory to an S3Uploader, which copies it under
s3://bucket/prefix/<basename of save>/<tag>/ (gpt-neox's layout) from one background thread: files up to
s3_chunk_size bytes in one PUT, larger ones as multipart uploads of s3_chunk_size parts, a few parts in flight.
The directory is first hard-linked into a private staging folder beside it, so keep_last_n_checkpoints may delete
the checkpoint while it is still being sent. The run waits for the uploads at its end (finish); a failed upload is
printed when it happens and again, with every failed file, by finish, which then raises S3UploadError.

Endpoint and credentials come from boto3's usual sources (AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_ENDPOINT_URL_S3 for
an S3-compatible server, ...).
"""
from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from neox.config.s3 import split_s3_url

STAGING_DIR = ".s3_upload_staging"
PARTS_IN_FLIGHT = 4
# gpt-neox's uploads give the bucket's owner full control (buckets written to from another account).
ACL = "bucket-owner-full-control"


class S3UploadError(RuntimeError):
    pass


@dataclass
class Failure:
    tag: str
    file: str
    error: str


def remote_prefix(s3_path: str, save: str | Path, tag: str) -> tuple[str, str]:
    """(bucket, key prefix) of a checkpoint: s3_path / basename(save) / tag, as gpt-neox names it."""
    bucket, prefix = split_s3_url(s3_path)
    parts = [p for p in (prefix, Path(os.path.abspath(save)).name, tag) if p]
    return bucket, "/".join(parts)


def upload_file(client: Any, path: Path, bucket: str, key: str, chunk_size: int) -> None:
    size = path.stat().st_size
    if size <= chunk_size:
        with path.open("rb") as handle:
            client.put_object(Bucket=bucket, Key=key, Body=handle.read(), ACL=ACL)
        return
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, ACL=ACL)["UploadId"]
    try:
        count = -(-size // chunk_size)

        def send(number: int) -> dict:
            with path.open("rb") as handle:
                handle.seek((number - 1) * chunk_size)
                body = handle.read(chunk_size)
            etag = client.upload_part(Bucket=bucket, Key=key, PartNumber=number, UploadId=upload_id, Body=body)["ETag"]
            return {"ETag": etag, "PartNumber": number}

        with ThreadPoolExecutor(max_workers=min(PARTS_IN_FLIGHT, count)) as pool:
            parts = list(pool.map(send, range(1, count + 1)))
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception:  # the original error is the one to report
            pass
        raise


def stage(ckpt_dir: Path, staging_root: Path) -> Path:
    """A hard-linked copy of ckpt_dir (a real copy where links are not possible): immune to later deletion."""
    target = staging_root / ckpt_dir.name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(ckpt_dir, target, copy_function=_link_or_copy)
    return target


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class S3Uploader:
    """Uploads checkpoints in the order they are submitted, from one background thread."""

    def __init__(self, s3_path: str, save: str | Path, chunk_size: int,
                 client_factory: Callable[[], Any] | None = None, log: Callable[[str], None] = print):
        split_s3_url(s3_path)
        self.s3_path, self.save, self.chunk_size = s3_path, Path(save), chunk_size
        self.log = log
        self._client_factory = client_factory or _boto3_client
        self._client: Any = None
        self._queue: queue.Queue[tuple[Path, str] | None] = queue.Queue()
        self.failures: list[Failure] = []
        self.uploaded: list[str] = []
        self._thread = threading.Thread(target=self._work, name="s3-upload", daemon=True)
        self._thread.start()

    def submit(self, ckpt_dir: Path) -> None:
        """Queue a complete checkpoint directory; returns at once (after hard-linking it into the staging area)."""
        staged = stage(Path(ckpt_dir), self.save / STAGING_DIR)
        self._queue.put((staged, Path(ckpt_dir).name))

    def finish(self) -> None:
        """Wait for every queued upload; raise S3UploadError naming each file that failed."""
        self._queue.put(None)
        self._thread.join()
        shutil.rmtree(self.save / STAGING_DIR, ignore_errors=True)
        if self.failures:
            lines = "\n".join(f"  {f.tag}/{f.file}: {f.error}" for f in self.failures)
            raise S3UploadError(f"{len(self.failures)} checkpoint file(s) were not uploaded to {self.s3_path} "
                                f"(the checkpoints are complete in {self.save}):\n{lines}")

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            staged, tag = item
            try:
                self._upload_checkpoint(staged, tag)
            finally:
                shutil.rmtree(staged, ignore_errors=True)

    def _upload_checkpoint(self, staged: Path, tag: str) -> None:
        bucket, prefix = remote_prefix(self.s3_path, self.save, tag)
        start = time.perf_counter()
        files = sorted(p for p in staged.rglob("*") if p.is_file())
        failed = 0
        for path in files:
            relative = path.relative_to(staged).as_posix()
            try:
                if self._client is None:
                    self._client = self._client_factory()
                upload_file(self._client, path, bucket, f"{prefix}/{relative}", self.chunk_size)
            except Exception as err:  # reported, and the other files still go
                failed += 1
                self.failures.append(Failure(tag, relative, f"{type(err).__name__}: {err}"))
        if failed:
            self.log(f"s3 upload of checkpoint {tag} to s3://{bucket}/{prefix}/: {failed} of {len(files)} files "
                     f"failed (first: {self.failures[-failed].error}); the checkpoint stays in {self.save}")
        else:
            self.uploaded.append(tag)
            self.log(f"uploaded checkpoint {tag} to s3://{bucket}/{prefix}/ ({len(files)} files) in "
                     f"{time.perf_counter() - start:.1f} s")


def _boto3_client() -> Any:
    import boto3

    return boto3.client("s3")


def uploader_for(s3_path: str | None, save: str | None, chunk_size: int, rank: int) -> S3Uploader | None:
    """The run's uploader: rank 0 of a run with s3_path set, None elsewhere."""
    if s3_path is None or save is None or rank != 0:
        return None
    return S3Uploader(s3_path, save, chunk_size, log=lambda line: print(line, flush=True))
