"""The pieces behind preemption and rank-failure reports, in one process: deepy's signal forwarder, a rank's stop
flag, the rank log tee and exit record, the failure report, the fault-injection variable."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neox.train import faults, rank_log
from neox.train.preemption import StopForwarder, StopRequests, stop_request_path
from tests.conftest import REPO_ROOT


def test_importing_deepy_starts_no_thread():
    # A thread started before StopForwarder blocks the signals would take SIGTERM with the default action (exit).
    code = "import os, launcher.deepy; print(len(os.listdir('/proc/self/task')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


# The forwarder checks run in a fresh process: a process-directed signal goes to any thread that has not blocked it,
# and threads started by earlier tests in this pytest process (torch's, tqdm's) have not, so the default action
# (exit) would end the whole test run. deepy enters StopForwarder before anything starts a thread.
_FORWARDER_CHILD = """
import json, os, signal, subprocess, sys, time
from pathlib import Path
from neox.train.preemption import StopForwarder, stop_request_path

def wait_for(condition):
    deadline = time.monotonic() + 10
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)

tmp = Path(sys.argv[1])
if sys.argv[2] == "forward":
    request = stop_request_path(tmp)
    request.write_text("left by an earlier run\\n")
    with StopForwarder() as stop:
        stop.aim(request)
        assert not request.exists(), "an old request must not stop the new run"
        # A process started now (DeepSpeed's launch.py) has both signals blocked: it cannot act on them.
        blocked = subprocess.run([sys.executable, "-c", "import signal; print(sorted(int(s) for s in "
                                  "signal.pthread_sigmask(signal.SIG_BLOCK, [])))"],
                                 capture_output=True, text=True, check=True).stdout
        assert {int(signal.SIGTERM), int(signal.SIGUSR1)} <= set(json.loads(blocked)), blocked
        os.kill(os.getpid(), signal.SIGTERM)  # would end this process if it were not taken
        wait_for(request.exists)
        assert request.read_text() == "SIGTERM\\n", request.read_text()
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_for(lambda: signal.SIGUSR1 in stop.signals)
    assert stop.signals[:1] == [signal.SIGTERM] and signal.SIGUSR1 in stop.signals, stop.signals
    assert not request.exists(), "removed when the launch is over"
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
else:
    with StopForwarder() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_for(lambda: stop.signals)
        stop.aim(stop_request_path(tmp))
        assert stop_request_path(tmp).read_text() == "SIGUSR1\\n"
print("ok")
"""


@pytest.mark.parametrize("case", ["forward", "early-signal"])
def test_forwarder_turns_signals_into_the_request_file_and_children_inherit_the_block(tmp_path, case):
    # forward: a signal becomes the request file, which goes when the launch ends; children inherit the block.
    # early-signal: a signal that comes before the request file is known is written when it is.
    out = subprocess.run([sys.executable, "-c", _FORWARDER_CHILD, str(tmp_path), case], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# A handled signal interrupting the forwarder's sigtimedwait just before its timeout made CPython return an
# uninitialised siginfo: a made-up signal number, noted as a preemption (seen on a loaded machine). Here the interrupts
# come every 2 ms while the main thread holds the GIL, so nearly every wait ends that way.
_EINTR_CHILD = """
import signal, time
from neox.train.preemption import StopForwarder
signal.signal(signal.SIGUSR2, lambda *args: None)
with StopForwarder() as stop:
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        signal.pthread_kill(stop._waiter.ident, signal.SIGUSR2)
        busy = time.perf_counter() + 0.002
        while time.perf_counter() < busy:
            pass
print(stop.signals)
"""


def test_forwarder_ignores_interrupted_waits():
    out = subprocess.run([sys.executable, "-c", _EINTR_CHILD], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)


def test_rank_stop_flag_from_a_signal_or_the_request_file(tmp_path):
    import torch

    request = stop_request_path(tmp_path)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = StopRequests(request, torch.device("cpu"))
        stop.install()
        assert not stop.agreed()  # a world of one: its own flag
        request.write_text("SIGTERM\n")
        assert stop.agreed()
        request.unlink()
        other = StopRequests(None, torch.device("cpu"))  # not the first rank of its node: no file look-up
        other.install()
        request.write_text("SIGTERM\n")
        assert not other.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert other.agreed() and other.signalled == signal.SIGUSR1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_TEE_CHILD = """
import os, sys
from pathlib import Path
from neox.train.rank_log import RankLog
with RankLog(Path(sys.argv[1]), 3) as log:
    print("from python")
    os.write(2, b"from fd 2\\n")
    if sys.argv[2] == "raise":
        raise ValueError("bad thing")
    log.exit_code = 75
"""


@pytest.mark.parametrize("mode", ["return", "raise"])
def test_rank_log_tees_both_streams_and_records_the_end(tmp_path, mode):
    result = subprocess.run([sys.executable, "-c", _TEE_CHILD, str(tmp_path), mode], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert "from python" in result.stdout and "from fd 2" in result.stderr  # the console still gets both
    log = rank_log.log_path(tmp_path, 3).read_text()
    assert log.startswith(f"{rank_log.HEADER_PREFIX}3 pid ") and "from python" in log and "from fd 2" in log
    record = json.loads(rank_log.exit_record_path(tmp_path, 3).read_text())
    if mode == "return":
        assert (result.returncode, record["code"], record["error"]) == (0, 75, None)
    else:
        assert result.returncode == 1
        assert (record["code"], record["error"], record["lost_peer"]) == (1, "ValueError: bad thing", False)
        assert "from python\n" in log and "Traceback (most recent call last):" in log  # the traceback too
        assert log.rstrip().endswith("ValueError: bad thing")


_INTERLEAVED_CHILD = """
import os, sys
from pathlib import Path
from neox.train.rank_log import RankLog
with RankLog(Path(sys.argv[1]), 0):
    for i in range(300):
        print(f"stdout line {i}")  # unbuffered: the text and its newline are two writes
        os.write(2, f"stderr line {i}\\n".encode())
    sys.stdout.write("no newline at the end")
"""


def test_rank_log_keeps_lines_of_the_two_streams_whole(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-c", _INTERLEAVED_CHILD, str(tmp_path)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = rank_log.log_path(tmp_path, 0).read_text().splitlines()[1:]
    expected = {f"{stream} line {i}" for stream in ("stdout", "stderr") for i in range(300)}
    assert set(lines) == expected | {"no newline at the end"} and len(lines) == len(expected) + 1
    assert [line for line in lines if line.startswith("stdout")] == [f"stdout line {i}" for i in range(300)]


_HELD_PIPE_CHILD = """
import os, subprocess, sys, time
from pathlib import Path
from neox.train.rank_log import RankLog, log_path
# A process the rank started (as a data-loader worker) and a copy of stderr a library never closed (as DeepSpeed's
# op builder leaves one) both hold the log's pipes open after the rank's code has ended.
with RankLog(Path(sys.argv[1]), 0):
    helper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline(); print('from the helper')"],
                              stdin=subprocess.PIPE)
    leaked = os.dup(2)
    print("the rank's last line", flush=True)
    started = time.monotonic()
ended = time.monotonic() - started
print(f"helper alive after the exit: {helper.poll() is None}; exit took {ended:.2f} s", flush=True)
helper.communicate(b"go\\n")
deadline = time.monotonic() + 60
while "from the helper" not in log_path(Path(sys.argv[1]), 0).read_text() and time.monotonic() < deadline:
    time.sleep(0.02)
"""


def test_rank_log_ends_without_waiting_for_processes_that_hold_its_pipes(tmp_path):
    result = subprocess.run([sys.executable, "-c", _HELD_PIPE_CHILD, str(tmp_path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    alive, took = re.search(r"helper alive after the exit: (\w+); exit took ([\d.]+) s", result.stdout).groups()
    # Waiting for the pipes' end took 2 s per stream (a join that timed out) before the rank could exit.
    assert alive == "True" and float(took) < 1.5, result.stdout
    log = rank_log.log_path(tmp_path, 0).read_text()
    assert "the rank's last line\n" in log and "from the helper\n" in log  # the helper's line, after the exit too


def _write_rank(directory: Path, rank: int, lines: list[str], record: dict | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    text = "old launch line\n" + f"{rank_log.HEADER_PREFIX}{rank} pid 1 started now ====\n" + "\n".join(lines) + "\n"
    rank_log.log_path(directory, rank).write_text(text)
    if record is not None:
        rank_log.exit_record_path(directory, rank).write_text(json.dumps({"rank": rank, **record}))


def test_failure_report_names_the_killed_rank_first(tmp_path):
    since = time.time() - 1
    gloo = ("RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1. This is "
            "typically caused by a remote worker crashing.")
    _write_rank(tmp_path, 0, ["iteration 7 | lm_loss 5.8"], {"code": 1, "error": gloo, "lost_peer": True})
    _write_rank(tmp_path, 1, [f"line {i}" for i in range(30)], None)
    report = rank_log.failure_report(tmp_path, 2, since, 247)
    lines = report.splitlines()
    assert lines[0] == "deepy: the job failed (exit code 247)."
    assert lines[1].startswith("rank 1 died without an exit record: killed by a signal")
    assert lines[2:2 + rank_log.TAIL_LINES] == [f"    line {i}" for i in range(30 - rank_log.TAIL_LINES, 30)]
    assert "old launch line" not in report
    assert lines[-1].startswith("rank 0 then stopped: it lost a peer (RuntimeError: [gloo")


def test_failure_report_ignores_records_of_an_earlier_launch(tmp_path):
    _write_rank(tmp_path, 0, ["x"], {"code": 0, "error": None, "lost_peer": False})
    old = time.time() - 100
    os.utime(rank_log.exit_record_path(tmp_path, 0), (old, old))
    report = rank_log.failure_report(tmp_path, 1, time.time() - 10, 1)
    assert "rank 0 died without an exit record" in report


def test_failure_report_for_a_rank_that_never_started_its_log(tmp_path):
    report = rank_log.failure_report(tmp_path, 1, time.time() - 10, 1)
    assert f"rank 0 ended before it opened {rank_log.log_path(tmp_path, 0)} (while starting up" in report


def test_lost_peer_messages():
    assert rank_log.lost_peer("[..gloo..] Timed out waiting 9000ms for recv operation to complete")
    assert rank_log.lost_peer("Connection reset by peer")
    assert not rank_log.lost_peer("ValueError: bad thing")


def test_fault_injection_variable():
    assert faults.from_environment({}) is None
    fault = faults.from_environment({faults.ENV_VAR: "1:3"})
    fault.after_step(0, 3)
    fault.after_step(1, 2)
    with pytest.raises(faults.InjectedFault, match="NEOX_FAULT_RAISE_AT=1:3"):
        fault.after_step(1, 3)
    with pytest.raises(faults.FaultSpecError, match="expected RANK:ITERATION"):
        faults.from_environment({faults.ENV_VAR: "rank1"})


@pytest.mark.parametrize("override, message", [
    (["--preempt_exit_code", "2"], "'preempt_exit_code' must be 3-125"),
    (["--preempt_exit_code", "143"], "'preempt_exit_code' must be 3-125"),
    (["--distributed_timeout_minutes", "0"], "'distributed_timeout_minutes' must be > 0"),
])
def test_preemption_and_timeout_keys_are_checked(override, message):
    from neox.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config([REPO_ROOT / "configs" / "tiny.yml"], override)


def test_preemption_and_timeout_defaults():
    from neox.config import load_config

    cfg = load_config([REPO_ROOT / "configs" / "tiny.yml"], ["--distributed_timeout_minutes", "0.5"])
    assert (cfg.train.preempt_exit_code, cfg.launch.distributed_timeout_minutes) == (75, 0.5)
