"""gpt-neox's logging keys through `deepy train`, one rank (ZeRO 1): per-parameter diagnostics and the noise scale
in metrics.jsonl and TensorBoard, the profiler trace and CPU memory record of the profiled steps, the git hash, and
the wandb and Comet runs written in their offline modes. The values themselves are checked against references at
every layout in tests/distributed/test_diagnostics_layouts.py."""
from __future__ import annotations

import json
import math
import subprocess
import zipfile

import pytest

from tests.conftest import REPO_ROOT
from tests.e2e.train_helpers import deepy_train, preprocess_kjv, write_config

pytestmark = pytest.mark.slow

STEPS = 4
PREFIXES = ("gradient_norms/", "pct_grad_zeros/", "parameter_norms/", "optimizer_state_norms/")


@pytest.fixture(scope="module")
def launch(tmp_path_factory, monkeypatch_module):
    work = tmp_path_factory.mktemp("logging_keys")
    monkeypatch_module.setenv("WANDB_MODE", "offline")
    monkeypatch_module.setenv("WANDB_DIR", str(work / "wandb_dir"))
    monkeypatch_module.setenv("WANDB_SILENT", "true")
    monkeypatch_module.setenv("COMET_START_ONLINE", "false")
    monkeypatch_module.setenv("COMET_OFFLINE_DIRECTORY", str(work / "comet"))
    (work / "wandb_dir").mkdir()
    config = write_config(
        work / "tiny.yml", preprocess_kjv(work / "data"), train_iters=STEPS, eval_iters=0,
        log_grad_norm=True, log_param_norm=True, log_grad_pct_zeros=True, log_optimizer_states=True,
        log_gradient_noise_scale=True, gradient_noise_scale_n_batches=2,
        profile=True, profile_step_start=1, profile_step_stop=3, memory_profiling=True,
        tensorboard_dir=str(work / "run" / "tb"), wandb_group="ablations", wandb_run_name="tiny-run",
        use_comet=True, comet_project="neox-tests", comet_experiment_name="tiny", comet_tags=["e2e"])
    return deepy_train(work / "run", config, num_gpus=1, zero_stage=1)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_diagnostics_records_every_step(launch):
    records = launch.records()
    git = subprocess.run(["git", "describe", "--always"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert records[0] == {"iteration": 0, "git_hash": git}
    diagnostics = {r["iteration"]: r for r in records if any(k.startswith("gradient_norms/") for k in r)}
    train = {r["iteration"]: r for r in records if "lm_loss" in r}
    assert sorted(diagnostics) == sorted(train) == list(range(1, STEPS + 1))
    for it, record in diagnostics.items():
        for prefix in PREFIXES:
            assert any(k.startswith(prefix) for k in record), (it, prefix)
        assert all(0 <= v <= 100 for k, v in record.items() if k.startswith("pct_grad_zeros/"))
        # The per-parameter norms add up to the global norm DeepSpeed's ZeRO optimizer reports (before clipping).
        total = math.sqrt(sum(v ** 2 for k, v in record.items() if k.startswith("gradient_norms/")))
        assert total == pytest.approx(train[it]["grad_norm"], rel=1e-5)
        assert ("noise_scale" in record) == (it >= 2)  # first estimate after n_batches = 2 steps
    assert "gradient_norms/" not in launch.result.stdout  # the console keeps to the training lines


def test_profile_and_memory_files_cover_the_window(launch):
    trace = json.loads((launch.log_dir / "profile" / "rank0.trace.json").read_text())
    steps = sorted(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("train_step#"))
    assert steps == ["train_step#1", "train_step#2"]
    memory = json.loads((launch.log_dir / "memory" / "cpu_memory.rank0.json").read_text())
    assert [s["iteration"] for s in memory["steps"]] == [2, 3]
    assert "memory_profiling (CPU, which has no CUDA allocator history)" in launch.output


def test_tensorboard_wandb_and_comet_get_the_diagnostics(launch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(launch.run_dir / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "gradient_norms/final_norm.weight" in tags and "noise_scale" in tags
    assert [e.step for e in acc.Scalars("parameter_norms/final_norm.weight")] == list(range(1, STEPS + 1))

    (run_dir,) = (launch.run_dir.parent / "wandb_dir" / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb"))

    (archive,) = (launch.run_dir.parent / "comet").glob("*.zip")
    with zipfile.ZipFile(archive) as z:
        experiment = json.loads(z.read("experiment.json"))
        messages = [json.loads(line) for line in z.read("messages.json").decode().splitlines()]
    assert experiment["project_name"] == "neox-tests" and experiment["tags"] == ["e2e"]
    names = {m["payload"]["metric"]["metricName"] for m in messages if m["type"] == "metric_msg"}
    assert {"lm_loss", "noise_scale", "gradient_norms/final_norm.weight"} <= names
