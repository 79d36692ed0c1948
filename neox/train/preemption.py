"""Preemption: SIGTERM or SIGUSR1 means "finish this step, write a checkpoint, exit with the requeue code".

How a request reaches the ranks:
- sent to the ranks themselves (Slurm signals every task of a step, `scancel -s USR1` too): each rank's handler
  sets a flag;
- sent to `deepy train` only (Kubernetes signals PID 1, `kill PID`): deepy writes {run_dir}/stop_request, which
  the first rank of every node looks for after each step (the run directory is shared by all nodes).
After every step the ranks all-reduce their flags (max), so they all stop after the same step even when the
signal reached them at different moments.

DeepSpeed's launch.py, between deepy and the local ranks, kills the ranks on SIGTERM and dies of SIGUSR1. deepy
therefore blocks both signals before it starts anything: a blocked signal stays blocked across fork and exec,
so launch.py never acts on them, while deepy takes them with sigtimedwait in a thread and each rank unblocks them
once its handler is installed.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_REQUEST_NAME = "stop_request"


def stop_request_path(run_dir: Path) -> Path:
    """The file deepy writes on a preemption signal: beside the resolved config the ranks are started with."""
    return run_dir / STOP_REQUEST_NAME


class StopRequests:
    """Rank side: notes preemption signals and, once per step, agrees with every other rank on whether to stop."""

    def __init__(self, request_file: Path | None, device: torch.device):
        self.request_file = request_file  # None: this rank does not look (only the first rank of a node does)
        self.device = device
        self.signalled: int | None = None
        self._pid = os.getpid()

    def install(self) -> None:
        """Main thread only. The handlers stay for the life of the process: DeepSpeed's launch.py SIGTERMs ranks
        that are already on their way out, and those must finish exiting (and flush their logs) undisturbed."""
        self._pid = os.getpid()
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, self._on_signal)
        # Blocked by deepy (see the module docstring); anything that arrived meanwhile is delivered now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPT_SIGNALS)

    def _on_signal(self, signum: int, frame) -> None:
        # Data-loader workers forked from this rank inherit the handler; only the rank itself speaks.
        if self.signalled is None and os.getpid() == self._pid:
            # os.write, not print: a handler that interrupts a print to the same stream would make a reentrant call.
            os.write(2, f"received {signal.Signals(signum).name}: stopping after this step with a checkpoint\n"
                     .encode())
        self.signalled = signum

    def requested_here(self) -> bool:
        return self.signalled is not None or (self.request_file is not None and self.request_file.exists())

    def agreed(self) -> bool:
        """Collective: True on every rank if any rank saw a request."""
        import torch  # here: deepy imports this module before anything may start a thread (see StopForwarder)

        local = self.requested_here()
        if not torch.distributed.is_initialized():
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


class StopForwarder:
    """Launcher side, a context manager around the whole `deepy train` command. Enter it before anything starts a
    thread (importing torch does): SIGTERM/SIGUSR1 are blocked from then on in this process and in every thread and
    process it starts, and a thread of ours takes them with sigtimedwait. Each one becomes the request file once
    aim() has named it (a signal that came earlier is written then)."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.request_file: Path | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._waiter: threading.Thread | None = None
        self._previous_mask: set[int] | None = None

    def __enter__(self) -> StopForwarder:
        self._previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)
        self._waiter = threading.Thread(target=self._wait, name="deepy-preemption", daemon=True)
        self._waiter.start()  # after the mask is set: it inherits it
        return self

    def aim(self, request_file: Path) -> None:
        with self._lock:
            request_file.unlink(missing_ok=True)  # a request left by an earlier run must not stop this one
            self.request_file = request_file
            if self.signals:
                self._write_request(self.signals[0])

    def _wait(self) -> None:
        while not self._done.is_set():
            info = signal.sigtimedwait(PREEMPT_SIGNALS, 0.2)
            # CPython (3.11) returns an uninitialised siginfo when the wait is interrupted (EINTR) just before its
            # timeout: a made-up signal number, noted as a preemption (on a loaded machine deepy once died of the
            # ValueError naming it; a number that happens to be a real signal would stop the ranks).
            if info is not None and info.si_signo in PREEMPT_SIGNALS:
                self._note(info.si_signo)

    def _note(self, signum: int) -> None:
        with self._lock:
            first = not self.signals
            self.signals.append(signum)
            if first and self.request_file is not None:
                self._write_request(signum)

    def _write_request(self, signum: int) -> None:
        assert self.request_file is not None
        name = signal.Signals(signum).name
        print(f"deepy: received {name}: asking every rank to finish its step, checkpoint and stop "
              f"({self.request_file})", file=sys.stderr, flush=True)
        tmp = self.request_file.with_name(f".{self.request_file.name}.tmp")
        tmp.write_text(f"{name}\n")
        tmp.replace(self.request_file)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._done.set()
        if self._waiter is not None:
            self._waiter.join()
        # Taken here rather than delivered by the unblock below, whose default action would end deepy.
        while (info := signal.sigtimedwait(PREEMPT_SIGNALS, 0)) is not None:
            self.signals.append(info.si_signo)
        if self._previous_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)
        if self.request_file is not None:
            self.request_file.unlink(missing_ok=True)
