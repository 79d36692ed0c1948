"""A rank that dies, raises or hangs ends the whole 2-rank `deepy train` job within a minute, non-zero, and deepy
names the rank and prints its last log lines ({log_dir}/ranks/rank{R}.log); the survivors never wait forever."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from neox.train import faults
from tests.e2e.test_preemption import finish, start_deepy, wait_for_iteration
from tests.e2e.train_helpers import preprocess_kjv, read_metrics, write_config

pytestmark = pytest.mark.slow

_HEADER = re.compile(r"^==== neox rank (\d+) pid (\d+) started")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rank_failure")


@pytest.fixture(scope="module")
def model_config(work) -> Path:
    return write_config(work / "tiny.yml", preprocess_kjv(work / "data"), train_iters=100000,
                        lr_decay_iters=100000, eval_interval=100000, gradient_accumulation_steps=2)


def rank_pid(log_dir: Path, rank: int) -> int:
    header = (log_dir / "ranks" / f"rank{rank}.log").read_text().splitlines()[0]
    match = _HEADER.match(header)
    assert match and int(match.group(1)) == rank, header
    return int(match.group(2))


def exit_record(log_dir: Path, rank: int) -> dict:
    return json.loads((log_dir / "ranks" / f"rank{rank}.exit.json").read_text())


def test_kill_9_of_one_rank_ends_the_job_naming_it(work, model_config):
    run = work / "kill9"
    proc = start_deepy(run, model_config)
    wait_for_iteration(run / "logs", proc, 3)
    os.kill(rank_pid(run / "logs", 1), signal.SIGKILL)
    killed_at = time.monotonic()
    code, output = finish(proc, run, timeout=90)
    seconds = time.monotonic() - killed_at
    print(f"job ended {seconds:.1f} s after kill -9 of rank 1 (exit code {code})")
    assert code != 0 and seconds < 60
    report = output[output.index("deepy: the job failed"):]
    assert "rank 1 died without an exit record: killed by a signal" in report
    assert f"Last lines of {run / 'logs' / 'ranks' / 'rank1.log'}:" in report
    assert "rank 0 then stopped: it lost a peer" in report
    assert exit_record(run / "logs", 0)["lost_peer"]
    assert not (run / "logs" / "ranks" / "rank1.exit.json").exists()


def test_an_exception_on_one_rank_only_ends_the_job_naming_it(work, model_config, monkeypatch):
    run = work / "raise"
    monkeypatch.setenv(faults.ENV_VAR, "1:3")  # rank 1 raises after iteration 3; rank 0 trains on
    proc = start_deepy(run, model_config)
    started = time.monotonic()
    code, output = finish(proc, run, timeout=120)
    print(f"job ended {time.monotonic() - started:.1f} s after it started (exit code {code})")
    assert code != 0
    report = output[output.index("deepy: the job failed"):]
    assert "rank 1 failed: InjectedFault: fault injected by NEOX_FAULT_RAISE_AT=1:3" in report
    assert f"Last lines of {run / 'logs' / 'ranks' / 'rank1.log'}:" in report
    assert "raise InjectedFault" in report  # its traceback, from the rank log
    assert "rank 0 then stopped: it lost a peer" in report
    assert exit_record(run / "logs", 0)["lost_peer"]
    assert max(r["iteration"] for r in read_metrics(run / "logs")) == 3


def test_a_hung_rank_times_out_the_collectives_instead_of_hanging(work, model_config):
    run = work / "hang"
    proc = start_deepy(run, model_config, distributed_timeout_minutes=0.15)
    wait_for_iteration(run / "logs", proc, 3)
    pid = rank_pid(run / "logs", 1)
    os.kill(pid, signal.SIGSTOP)  # alive, holding its sockets open, answering nothing
    stopped_at = time.monotonic()
    try:
        code, output = finish(proc, run, timeout=120)
    finally:
        if os.path.exists(f"/proc/{pid}"):  # the launcher did not get to it: do not leave it stopped
            os.kill(pid, signal.SIGKILL)
    seconds = time.monotonic() - stopped_at
    print(f"job ended {seconds:.1f} s after rank 1 stopped answering (collective timeout 9 s, exit code {code})")
    assert code != 0 and seconds < 60
    record = exit_record(run / "logs", 0)
    assert record["lost_peer"] and "Timed out" in record["error"], record
    assert "rank 1 died without an exit record" in output
