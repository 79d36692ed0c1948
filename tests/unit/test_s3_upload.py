"""Checkpoint upload (s3_path, s3_chunk_size) against a real S3-compatible server: moto's server mode, started
here on a free port and reached over HTTP by boto3 exactly as an S3 endpoint would be."""
import os
import socket
import time
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

from neox.checkpoint.s3_upload import S3Uploader, S3UploadError, STAGING_DIR  # noqa: E402
from neox.config import ConfigError  # noqa: E402
from neox.config.s3 import check_s3_settings  # noqa: E402

CHUNK = 1024  # bytes per part: the big file below goes up in 3 parts


@pytest.fixture(scope="module")
def s3_server():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    import moto.s3.models

    saved_min = moto.s3.models.S3_UPLOAD_PART_MIN_SIZE
    moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = CHUNK  # real S3 wants 5 MiB parts; a test checkpoint is tiny
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = saved_min


@pytest.fixture
def s3(s3_server, monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": s3_server}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3")
    bucket = f"ckpt-{time.monotonic_ns()}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def checkpoint(save: Path, tag: str) -> dict[str, bytes]:
    files = {
        "mp_rank_00_model_states.pt": os.urandom(2 * CHUNK + 100),  # 3 parts
        "exactly_one_chunk.bin": os.urandom(CHUNK),
        "complete.json": b'{"iteration": 5}\n',
        "rng/rank0.pt": os.urandom(300),
        "empty.txt": b"",
    }
    for name, data in files.items():
        path = save / tag / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_checkpoints_reach_s3_byte_for_byte_even_if_deleted_meanwhile(s3, tmp_path):
    client, bucket = s3
    save = tmp_path / "run-a"
    expected = {tag: checkpoint(save, tag) for tag in ("global_step5", "global_step10")}
    uploader = S3Uploader(f"s3://{bucket}/team/models", save, CHUNK, log=lambda line: None)
    uploader.submit(save / "global_step5")
    # keep_last_n_checkpoints removes older checkpoints right after a save: the upload must not care
    import shutil

    shutil.rmtree(save / "global_step5")
    uploader.submit(save / "global_step10")
    uploader.finish()
    assert uploader.uploaded == ["global_step5", "global_step10"] and not uploader.failures
    assert not (save / STAGING_DIR).exists()
    listing = client.list_objects_v2(Bucket=bucket, Prefix="team/models/")["Contents"]
    keys = sorted(o["Key"] for o in listing)
    assert keys == sorted(f"team/models/run-a/{tag}/{name}" for tag, files in expected.items() for name in files)
    for tag, files in expected.items():
        for name, data in files.items():
            key = f"team/models/run-a/{tag}/{name}"
            assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data, key
    # the large file went up as a 3-part multipart upload (S3's ETag of a multipart object ends in -<parts>)
    head = client.head_object(Bucket=bucket, Key="team/models/run-a/global_step10/mp_rank_00_model_states.pt")
    assert head["ETag"].strip('"').endswith("-3")
    single = client.head_object(Bucket=bucket, Key="team/models/run-a/global_step10/exactly_one_chunk.bin")
    assert "-" not in single["ETag"]


def test_submit_does_not_wait_for_the_upload(s3, tmp_path):
    client, bucket = s3

    class SlowClient:
        def __getattr__(self, name):
            call = getattr(client, name)

            def slow(*args, **kwargs):
                time.sleep(0.2)
                return call(*args, **kwargs)
            return slow

    save = tmp_path / "run-b"
    checkpoint(save, "global_step1")
    uploader = S3Uploader(f"s3://{bucket}", save, CHUNK, client_factory=SlowClient, log=lambda line: None)
    start = time.perf_counter()
    uploader.submit(save / "global_step1")
    submitted = time.perf_counter() - start
    uploader.finish()
    waited = time.perf_counter() - start
    assert submitted < 0.15 < 1.0 < waited  # 5 files, 7 requests of 0.2 s each happen after submit returned
    assert len(client.list_objects_v2(Bucket=bucket, Prefix="run-b/global_step1/")["Contents"]) == 5


def test_a_failed_upload_is_reported_with_every_file(s3, tmp_path):
    _, bucket = s3
    save = tmp_path / "run-c"
    files = checkpoint(save, "global_step2")
    lines = []
    uploader = S3Uploader(f"s3://{bucket}-missing/x", save, CHUNK, log=lines.append)
    uploader.submit(save / "global_step2")
    with pytest.raises(S3UploadError) as info:
        uploader.finish()
    message = str(info.value)
    assert f"{len(files)} checkpoint file(s) were not uploaded to s3://{bucket}-missing/x" in message
    assert "global_step2/mp_rank_00_model_states.pt: NoSuchBucket" in message and "does not exist" in message
    assert str(save) in message  # where the checkpoint still is
    assert len(lines) == 1 and f"{len(files)} of {len(files)} files failed" in lines[0]


@pytest.mark.parametrize("path,chunk,save,expected", [
    ("bucket/x", 104_857_600, "ck", "'s3_path' must look like s3://bucket[/prefix]"),
    ("s3://", 104_857_600, "ck", "'s3_path' must look like s3://bucket[/prefix]"),
    ("s3://bucket", 1024, "ck", "'s3_chunk_size' must be between 5242880 (5 MiB)"),
    ("s3://bucket", 104_857_600, None, "'s3_path' uploads the checkpoints written to 'save', which is not set"),
])
def test_s3_settings_are_checked_with_the_config(path, chunk, save, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        check_s3_settings(path, chunk, save)
