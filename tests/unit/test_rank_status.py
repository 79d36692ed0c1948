"""Where each rank is when a job hangs or dies: the status record, the collective an error came out of, the report
that names both, the rendezvous errors and the hang-before-rendezvous fault (the 2-rank launches that use them are
in tests/e2e/test_rank_failure.py)."""
from __future__ import annotations

import datetime
import json
import os
import threading
import time
from pathlib import Path

import pytest

from neox.parallel import rank_status
from neox.parallel.runtime import RendezvousError, _join, _message_of, _rendezvous_hint
from neox.train import faults, rank_log
from tests.e2e.train_helpers import free_port

# A stand-in for torch's c10d module: collective_of finds the public call by the file it is defined in.
_FAKE_C10D = """
def all_reduce(tensor, op=None, group=None, async_op=False):
    return _wait(tensor)

def _wait(tensor):
    raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 9000ms for recv operation")
"""


def _fake_collective():
    namespace: dict = {}
    exec(compile(_FAKE_C10D, os.path.join("site-packages", "torch", "distributed", "distributed_c10d.py"), "exec"),
         namespace)
    return namespace["all_reduce"]


def test_status_record_is_rewritten_in_place_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_status, "_fd", None)
    before = time.time() - 1  # file times are coarser than time.time()
    rank_status.start(tmp_path, 3)
    assert rank_status.read(tmp_path, 3, before).text == "start-up (before the rendezvous)"
    rank_status.enter("training step 12")
    rank_status.enter("checkpoint save at step 12")
    path = rank_status.status_path(tmp_path, 3)
    assert path.stat().st_size == rank_status.RECORD_BYTES  # one fixed-size record, never a growing file
    phase = rank_status.read(tmp_path, 3, before)
    assert phase.text == "checkpoint save at step 12" and before < phase.since <= time.time()
    assert rank_status.current() == phase
    assert rank_status.read(tmp_path, 3, time.time() + 60) is None  # a record older than the launch is not its
    assert rank_status.read(tmp_path, 4, before) is None
    os.close(rank_status._fd)


def test_enter_before_start_only_remembers_the_phase(monkeypatch):
    monkeypatch.setattr(rank_status, "_fd", None)
    rank_status.enter("x" * 1000)
    assert rank_status.current().text == "x" * 300  # bounded, so the record stays one fixed-size line


def test_collective_of_names_the_torch_call_and_the_line_that_called_it():
    all_reduce = _fake_collective()
    try:
        all_reduce(None)  # the line named below
    except RuntimeError as err:
        error = err
    line = error.__traceback__.tb_lineno
    site = f"{__file__}:{line} (test_collective_of_names_the_torch_call_and_the_line_that_called_it)"
    # No process group in this process: the group is not named, the call and its caller are.
    assert rank_status.collective_of([error]) == f"all_reduce, called at {site}"
    assert rank_status.innermost_caller(error) == site
    assert rank_status.collective_of([ValueError("no traceback")]) is None


def test_collective_of_takes_the_caller_from_an_error_raised_inside_the_collective():
    # A lost peer's error caught inside torch's frames, where a second error (a data-loader worker's death, raised by
    # torch's SIGCHLD handler) replaced it: only the second one's traceback reaches the caller.
    all_reduce = _fake_collective()

    def step():
        try:
            all_reduce(None)
        except RuntimeError:
            exec(compile("raise RuntimeError('DataLoader worker (pid 7) is killed by signal: Terminated.')",
                         os.path.join("site-packages", "torch", "utils", "data", "signal_handling.py"), "exec"))

    try:
        step()
    except RuntimeError as err:
        outer = err
    inner = outer.__context__
    inner.__traceback__ = inner.__traceback__.tb_next  # as torch catches it: from its own frames only
    found = rank_status.collective_of([outer, inner])
    assert found.startswith("all_reduce, called at ") and found.endswith(":{} (step)".format(
        outer.__traceback__.tb_next.tb_lineno)), found


def _write_rank(directory: Path, rank: int, lines: list[str], record: dict | None, phase: str, age: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rank_log.log_path(directory, rank).write_text(f"{rank_log.HEADER_PREFIX}{rank} pid 1 started now ====\n"
                                                  + "\n".join(lines) + "\n")
    if record is not None:
        rank_log.exit_record_path(directory, rank).write_text(json.dumps({"rank": rank, **record}))
    status = json.dumps({"phase": phase, "since": time.time() - age, "pid": 1}).encode()
    rank_status.status_path(directory, rank).write_bytes(status.ljust(rank_status.RECORD_BYTES - 1) + b"\n")


def test_report_names_the_phase_of_a_hung_rank_and_the_collective_its_peer_timed_out_in(tmp_path):
    since = time.time() - 100
    timeout = "RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 9000ms for recv operation"
    _write_rank(tmp_path, 0, ["iteration 4 | lm_loss 5.8"],
                {"code": 1, "error": timeout, "lost_peer": True, "time": time.time() - 31,
                 "blocked_in": "all_reduce over the world group (2 ranks), called at neox/train/preemption.py:76 "
                               "(agreed)"}, "training step 5", age=40)
    _write_rank(tmp_path, 1, ["iteration 4 done"], None, "training step 5", age=40)
    lines = rank_log.failure_report(tmp_path, 2, since, 1).splitlines()
    assert lines[1].startswith("rank 1 died without an exit record: killed by a signal")
    assert lines[1].endswith("; it was in training step 5 for 40 s. Last lines of "
                             f"{rank_log.log_path(tmp_path, 1)}:")  # until the report: how long it hung
    assert lines[-1] == ("rank 0 then stopped: it lost a peer in all_reduce over the world group (2 ranks), called "
                         "at neox/train/preemption.py:76 (agreed); it was in training step 5 for 9 s "
                         f"({timeout})")  # until its own exit record


def test_report_blames_the_rank_that_raised_not_the_ones_the_launcher_then_killed(tmp_path):
    since = time.time() - 100
    error = ("RendezvousError: rank 0: the rendezvous with 127.0.0.1:29500 (2 ranks) failed after 0 s: The server "
             "socket has failed to listen on any local network address. port: 29500, code: -98, name: EADDRINUSE")
    _write_rank(tmp_path, 0, ["Traceback ..."], {"code": 1, "error": error, "lost_peer": False, "time": time.time()},
                "the rendezvous with 127.0.0.1:29500 (2 ranks)", age=1)
    _write_rank(tmp_path, 1, [], None, "the rendezvous with 127.0.0.1:29500 (2 ranks)", age=31)
    lines = rank_log.failure_report(tmp_path, 2, since, 1).splitlines()
    assert lines[1].startswith(f"rank 0 failed: {error}; it was in the rendezvous with 127.0.0.1:29500 (2 ranks)")
    assert lines[-1] == ("rank 1 then ended without an exit record (stopped by the launcher); it was in the "
                         "rendezvous with 127.0.0.1:29500 (2 ranks) for 31 s")


@pytest.mark.parametrize("message, hint", [
    ("The server socket has failed to listen on any local network address. port: 29500, useIpv6: false, code: -98, "
     "name: EADDRINUSE, message: address already in use", "Another process listens on 10.0.0.1:29500"),
    ("Timed out after 601 seconds waiting for clients. 15/16 clients joined.", "Not every rank connected"),
    ("The client socket has timed out after 600000ms while trying to connect to (10.0.0.1, 29500).",
     "Rank 0 did not answer at 10.0.0.1:29500"),
    ("something else", ""),
])
def test_rendezvous_failures_get_a_hint(message, hint):
    assert _rendezvous_hint(message, "10.0.0.1:29500").startswith(hint)


def test_store_error_message_drops_the_log_lines_torch_glued_to_it():
    glued = ("The client socket has timed out after 3000ms while trying to connect to (127.0.0.1, 29779)."
             "[E1206 18:15:06.260530050 socket.cpp:1028] [c10d] The client socket has timed out\nframe #0: ...")
    assert _message_of(RuntimeError(glued)) == ("The client socket has timed out after 3000ms while trying to connect "
                                                "to (127.0.0.1, 29779)")
    assert _message_of(OSError("[Errno 98] Address already in use")) == "[Errno 98] Address already in use"


def test_a_rank_whose_rank_0_never_listens_names_the_address_it_waited_for(monkeypatch):
    # Rank 1 of 2 with nobody at MASTER_PORT: the client side of the rendezvous (torch's store client, as DeepSpeed's
    # init_distributed starts it), bounded by the timeout.
    import torch

    port = free_port()

    class ClientOnly:
        @staticmethod
        def init_distributed(dist_backend, timeout):
            torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timeout)

    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RendezvousError) as caught:
        _join(ClientOnly, "gloo", datetime.timedelta(seconds=0.5))
    message = str(caught.value)
    assert message.startswith(f"rank 1: the rendezvous with 127.0.0.1:{port} (2 ranks) failed after "), message
    assert "(distributed_timeout_minutes 0.00833333): The client socket has timed out after 500ms" in message
    assert f"Rank 0 did not answer at 127.0.0.1:{port}" in message and "frame #" not in message, message
    assert rank_status.current().text == f"the rendezvous with 127.0.0.1:{port} (2 ranks)"


def test_hang_before_rendezvous_fault_stops_only_the_rank_it_names():
    faults.hang_before_rendezvous(0, {})
    faults.hang_before_rendezvous(0, {faults.HANG_ENV_VAR: "1"})
    with pytest.raises(faults.FaultSpecError, match="expected a rank"):
        faults.hang_before_rendezvous(0, {faults.HANG_ENV_VAR: "one"})
    hung = threading.Thread(target=faults.hang_before_rendezvous, args=(1, {faults.HANG_ENV_VAR: "1"}), daemon=True)
    hung.start()
    hung.join(0.3)
    assert hung.is_alive()  # and stays so until the process ends (a daemon thread here, a killed rank in a job)
