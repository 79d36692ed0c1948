"""Preemption through `deepy train` with 2 real ranks: a signal -> every rank stops after the same step, writes the
checkpoint and exits with the requeue code; the relaunch resumes and its losses equal an uninterrupted run's.

Two ways a scheduler signals: SIGTERM to the launcher process only (Kubernetes signals PID 1), and SIGUSR1 to every
process of the job, DeepSpeed's launch.py included (Slurm signals all processes of a step, `scancel -s USR1`).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.e2e.train_helpers import (CPU_LAUNCH_CONFIG, DEEPY, Launch, deepy_train, free_port, preprocess_kjv,
                                     read_metrics, train_losses, write_config)

pytestmark = pytest.mark.slow

TRAIN_ITERS = 40
REQUEUE = 75  # train.preempt_exit_code's default
TWO_RANKS = dict(num_gpus=2, zero_stage=1)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("preempt")


@pytest.fixture(scope="module")
def model_config(work) -> Path:
    return write_config(work / "tiny.yml", preprocess_kjv(work / "data"), train_iters=TRAIN_ITERS,
                        lr_decay_iters=TRAIN_ITERS, eval_interval=1000, gradient_accumulation_steps=2,
                        hidden_dropout=0.1)  # dropout: the RNG streams must resume too


def start_deepy(run_dir: Path, model_config: Path, env_extra: dict | None = None, **extra) -> subprocess.Popen:
    """`deepy train` in its own process group (as a job step is), on 2 ranks, saving to run_dir/ckpt."""
    overrides = {"num_gpus": 2, "zero_optimization.stage": 1, "master_port": free_port(),
                 "save": str(run_dir / "ckpt"), "log_dir": str(run_dir / "logs"), **extra}
    argv = [sys.executable, str(DEEPY), "train", str(model_config), str(CPU_LAUNCH_CONFIG)]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(env_extra or {})
    run_dir.mkdir(parents=True, exist_ok=True)
    out = open(run_dir / "deepy.out", "w")
    return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_iteration(log_dir: Path, proc: subprocess.Popen, iteration: int, timeout: float = 150.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"deepy exited ({proc.returncode}) before iteration {iteration}"
        path = log_dir / "metrics.jsonl"
        if path.is_file() and any(r.get("iteration", 0) >= iteration for r in read_metrics(log_dir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"iteration {iteration} not reached within {timeout} s")


def finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 120.0) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return code, (run_dir / "deepy.out").read_text()


def check_preempted_checkpoint(run_dir: Path, output: str) -> int:
    """The stop iteration N: both ranks stopped after it, its checkpoint is complete and `latest` names it."""
    losses = train_losses(read_metrics(run_dir / "logs"))
    stopped = max(losses)
    assert 2 <= stopped < TRAIN_ITERS, stopped
    assert sorted(losses) == list(range(1, stopped + 1))
    ckpt = run_dir / "ckpt"
    assert (ckpt / "latest").read_text().strip() == f"global_step{stopped}"
    assert json.loads((ckpt / f"global_step{stopped}" / "complete.json").read_text())["iteration"] == stopped
    for rank in (0, 1):
        torch.load(ckpt / f"global_step{stopped}" / "rng" / f"rank{rank}.pt", weights_only=True)
        record = json.loads((run_dir / "logs" / "ranks" / f"rank{rank}.exit.json").read_text())
        assert (record["code"], record["error"]) == (REQUEUE, None)
    assert f"preempted: stopped after iteration {stopped} of {TRAIN_ITERS}" in output
    assert not (ckpt / "stop_request").exists()  # deepy removes its request: the relaunch must not stop at once
    return stopped


@pytest.fixture(scope="module")
def uninterrupted(work, model_config) -> Launch:
    return deepy_train(work / "whole", model_config, **TWO_RANKS, extra={"gradient_accumulation_steps": 2})


def test_sigterm_to_the_launcher_checkpoints_stops_and_resumes_exactly(work, model_config, uninterrupted):
    run = work / "sigterm"
    proc = start_deepy(run, model_config)
    wait_for_iteration(run / "logs", proc, 3)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher only, as Kubernetes does
    code, output = finish(proc, run)
    assert code == REQUEUE, output[-4000:]
    assert "deepy: received SIGTERM" in output
    stopped = check_preempted_checkpoint(run, output)

    resumed = deepy_train(run, model_config, **TWO_RANKS,
                          extra={"gradient_accumulation_steps": 2, "load": str(run / "ckpt")})
    assert f"resuming at iteration {stopped}" in resumed.output
    losses = resumed.losses()  # metrics.jsonl is appended to: both launches' iterations
    whole = uninterrupted.losses()
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    assert [losses[i] for i in range(1, TRAIN_ITERS + 1)] == [whole[i] for i in range(1, TRAIN_ITERS + 1)]


def test_sigusr1_to_every_process_of_the_job_stops_all_ranks_at_one_step(work, model_config):
    """With checkpoint_async, and the step-2 checkpoint still being written (each background write made 1 s slower)
    when the signal comes: the run lets it finish and complete, then checkpoints its last step and exits."""
    run = work / "sigusr1"
    proc = start_deepy(run, model_config, env_extra={"NEOX_FAULT_SLOW_CHECKPOINT_WRITE": "1"},
                       checkpoint_async="true", save_interval=2)
    wait_for_iteration(run / "logs", proc, 2)
    signalled = time.time()
    os.killpg(proc.pid, signal.SIGUSR1)  # deepy, DeepSpeed's launch.py and both ranks, as Slurm does
    code, output = finish(proc, run)
    # launch.py would die of SIGUSR1 (the runner then returns 0 while the ranks still run): it must not have.
    assert code == REQUEUE, output[-4000:]
    assert output.count("received SIGUSR1: stopping after this step") == 2  # one per rank, workers quiet
    check_preempted_checkpoint(run, output)  # the last step's checkpoint is complete and `latest`
    in_flight = json.loads((run / "ckpt" / "global_step2" / "complete.json").read_text())
    assert in_flight["time"] > signalled  # it was still being written when the signal came, and completed
