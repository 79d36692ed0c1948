"""Fault injection, to try the failure handling of a launch (ours, or a cluster's requeue rules) on purpose.

NEOX_FAULT_RAISE_AT="RANK:ITERATION" makes that rank raise InjectedFault right after that training iteration;
the other ranks run on into their next collective and find the rank gone.
NEOX_FAULT_HANG_BEFORE_RENDEZVOUS=RANK makes that rank stop just before it joins the process group, alive and silent
until killed (a rank stuck on its way up): the others time out in the rendezvous.
NEOX_FAULT_SLOW_CHECKPOINT_WRITE=SECONDS delays each background checkpoint write (checkpoint_async) by that long, so
a signal or a kill can be sent while a write is in flight.
Unset (always, outside such a test), nothing happens. deepy passes its environment to the ranks it starts on its own
node; for ranks on other nodes put the variables in the DeepSpeed env file (.deepspeed_env).
"""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

ENV_VAR = "NEOX_FAULT_RAISE_AT"
HANG_ENV_VAR = "NEOX_FAULT_HANG_BEFORE_RENDEZVOUS"
SLOW_WRITE_ENV_VAR = "NEOX_FAULT_SLOW_CHECKPOINT_WRITE"


class FaultSpecError(ValueError):
    pass


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class RaiseAt:
    rank: int
    iteration: int

    def after_step(self, rank: int, iteration: int) -> None:
        if (rank, iteration) == (self.rank, self.iteration):
            raise InjectedFault(f"fault injected by {ENV_VAR}={self.rank}:{self.iteration} (rank {rank}, after "
                                f"iteration {iteration})")


def from_environment(environ: dict[str, str] | os._Environ = os.environ) -> RaiseAt | None:
    spec = environ.get(ENV_VAR)
    if not spec:
        return None
    try:
        rank, iteration = (int(part) for part in spec.split(":"))
    except ValueError:
        raise FaultSpecError(f"{ENV_VAR}={spec!r}: expected RANK:ITERATION, e.g. 1:3 (or unset the variable)") from None
    return RaiseAt(rank, iteration)


def hang_before_rendezvous(rank: int, environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Never returns on the rank HANG_ENV_VAR names; returns at once everywhere else."""
    spec = environ.get(HANG_ENV_VAR)
    if not spec:
        return
    try:
        hung = int(spec)
    except ValueError:
        raise FaultSpecError(f"{HANG_ENV_VAR}={spec!r}: expected a rank, e.g. 1 (or unset the variable)") from None
    if rank != hung:
        return
    sys.stderr.write(f"fault injected by {HANG_ENV_VAR}={spec}: rank {rank} hangs before the rendezvous\n")
    sys.stderr.flush()
    threading.Event().wait()


def checkpoint_write_delay(environ: dict[str, str] | os._Environ = os.environ) -> float:
    """Seconds each background checkpoint write waits before it starts: 0 unless a failure test sets the variable."""
    spec = environ.get(SLOW_WRITE_ENV_VAR)
    if not spec:
        return 0.0
    try:
        seconds = float(spec)
    except ValueError:
        seconds = -1.0
    if seconds < 0:
        raise FaultSpecError(f"{SLOW_WRITE_ENV_VAR}={spec!r}: expected seconds >= 0, e.g. 2 (or unset the variable)")
    return seconds
