"""Runs the selected checks in order, each within its own time limit, and turns each outcome into a table row.

A check is a function of the shared Context returning a Result; it raises Skip when the device cannot run it (the
stand-in CPU mode only) and anything else counts as a failure. The time limit is enforced twice: launches get the
check's remaining time as their timeout (tools/gpu_check/workspace.py kills the whole process group), and an
interval timer interrupts work done in this process. The sum of the limits is the budget, so the whole run ends in
time by construction.
"""
from __future__ import annotations

import contextlib
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tools.gpu_check.report import Figure, Row


class CheckTimeout(BaseException):
    """The check ran past its limit. A BaseException, so library code that catches Exception cannot swallow it."""


class Skip(Exception):
    """This device cannot run the check (only the --device cpu stand-in skips)."""


@dataclass
class Result:
    ok: bool
    figures: list[Figure] = field(default_factory=list)
    detail: str = ""


@dataclass
class Context:
    """What the checks share: the device, the workspace, what earlier checks produced, and the current deadline."""
    device: str  # "cuda", or "cpu" for the stand-in plumbing mode
    work: Any  # tools.gpu_check.workspace.Workspace
    options: dict[str, Any] = field(default_factory=dict)  # command-line settings the checks read (peak_tflops)
    artifacts: dict[str, Any] = field(default_factory=dict)  # e.g. "checkpoint" -> Path, "hf_dir" -> Path
    deadline: float = float("inf")  # time.monotonic() by which the running check must end

    @property
    def standin(self) -> bool:
        return self.device != "cuda"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


@dataclass(frozen=True)
class Check:
    name: str
    title: str
    limit_s: float
    run: Callable[[Context], Result]
    needs: tuple[str, ...] = ()  # checks whose artifacts this one uses; selecting it selects them


def with_prerequisites(checks: Sequence[Check], wanted: Sequence[str]) -> list[Check]:
    """The wanted checks plus every check they need, in the registry's order."""
    by_name = {c.name: c for c in checks}
    chosen: set[str] = set()

    def add(name: str) -> None:
        if name not in chosen:
            chosen.add(name)
            for need in by_name[name].needs:
                add(need)

    for name in wanted:
        add(name)
    return [c for c in checks if c.name in chosen]


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CheckTimeout in this (main) thread once `seconds` have passed. An outer timer (pytest-timeout's) is
    put back afterwards with the time it has left."""
    def expire(signum, frame):
        raise CheckTimeout()

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 0.001))


def run_one(check: Check, ctx: Context, failed: set[str]) -> Row:
    start = time.monotonic()
    ctx.deadline = start + check.limit_s
    row = Row(check.name, check.title, "FAIL", 0.0, check.limit_s)
    broken = [n for n in check.needs if n in failed]
    if broken:
        row.detail = f"not run: it needs {', '.join(broken)}, which did not pass"
        return row
    try:
        with time_limit(check.limit_s):
            result = check.run(ctx)
        row.status, row.figures, row.detail = ("PASS" if result.ok else "FAIL"), result.figures, result.detail
    except CheckTimeout:
        row.detail = f"exceeded its {check.limit_s:.0f} s limit and was stopped"
    except Skip as why:
        row.status, row.detail = "SKIP", str(why)
    except Exception as err:  # a check that crashes is a failed check; the others still run
        row.detail = f"{type(err).__name__}: {err}".strip()
        row.traceback = traceback.format_exc()
    row.seconds = time.monotonic() - start
    return row


def run_checks(checks: Sequence[Check], ctx: Context, on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    rows, failed = [], set()
    for check in checks:
        row = run_one(check, ctx, failed)
        if row.status != "PASS":
            failed.add(check.name)
        rows.append(row)
        on_row(row)
    return rows
