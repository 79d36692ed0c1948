"""s3_path through `deepy train`: every checkpoint of a real run reaches an S3-compatible server (moto's server
mode, started by the test), also the one keep_last_n_checkpoints deletes locally while it is being uploaded."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.train_helpers import deepy_train, preprocess_kjv, write_config
from tests.unit.test_s3_upload import s3, s3_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


def test_a_training_run_uploads_each_checkpoint(s3, tmp_path):  # noqa: F811
    client, bucket = s3
    data_path = preprocess_kjv(tmp_path / "data")
    config = write_config(tmp_path / "model.yml", data_path, train_iters=4, lr_decay_iters=4, eval_interval=100,
                          save_interval=2, keep_last_n_checkpoints=1)
    launch = deepy_train(tmp_path / "run", config, extra={"s3_path": f"s3://{bucket}/neox"})
    save = launch.save_dir
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("global_step")) == ["global_step4"]
    assert "uploaded checkpoint global_step2 to s3://" in launch.output
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="neox/ckpt/")["Contents"]}
    # global_step2 was deleted locally (keep_last_n_checkpoints: 1) and still arrived whole
    assert "neox/ckpt/global_step2/complete.json" in keys and "neox/ckpt/global_step2/config.yml" in keys
    local = {p.relative_to(save).as_posix(): p for p in (save / "global_step4").rglob("*") if p.is_file()}
    assert {k[len("neox/ckpt/"):] for k in keys if "/global_step4/" in k} == set(local)
    for name, path in local.items():
        assert client.get_object(Bucket=bucket, Key=f"neox/ckpt/{name}")["Body"].read() == path.read_bytes(), name
    assert not (save / ".s3_upload_staging").exists()
