"""Per-rank logs and exit records, so that a failed job names the rank that died and shows its last lines.

Rank side: RankLog copies everything the rank writes to stdout and stderr (fd level: Python, DeepSpeed, native
code) into {ranks_dir}/rank{R}.log, appending (a requeued job keeps its history), keeps rank{R}.status (the phase
the rank is in: neox/parallel/rank_status.py) and writes rank{R}.exit.json when the rank ends by returning or
raising, with the phase and the collective it was blocked in. A rank killed by a signal (kill -9, the OOM killer, a
segfault, the launcher ending a hung rank) leaves no exit record: that absence is what names it, and its status
says where it was.
Launcher side: failure_report() reads them back after a failed launch.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import sys
import termios
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from neox.parallel import rank_status

RANKS_DIR_NAME = "ranks"
HEADER_PREFIX = "==== neox rank "
TAIL_LINES = 12
_PARTIAL_LINE_WAIT = 0.25  # seconds a line without its end waits for the rest before the log gets it alone
_MAX_PARTIAL_LINE = 1 << 16
# Messages of collectives that failed because a peer went away or stopped answering (gloo and NCCL): a rank that
# ends with one of them is a victim of another rank's death, not its cause.
_LOST_PEER_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out",
                      "timed out", "Timeout", "NCCL communicator was aborted", "remote process exited")


def ranks_dir(log_dir: str | None, run_dir: Path) -> Path:
    return Path(log_dir) / RANKS_DIR_NAME if log_dir else run_dir / RANKS_DIR_NAME


def log_path(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank}.log"


def exit_record_path(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank}.exit.json"


def lost_peer(error_text: str) -> bool:
    return any(marker in error_text for marker in _LOST_PEER_MARKERS)


class _Tee:
    """fd -> pipe; a thread copies the pipe to the original destination and to the log file."""

    def __init__(self, fd: int, log_fd: int, lock: threading.Lock):
        self.fd, self.log_fd, self.lock = fd, log_fd, lock
        self.original = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self.read_end = read_end
        self.copying = False
        self.thread = threading.Thread(target=self._copy, name=f"rank-log-fd{fd}", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        # The console gets every chunk at once; the log gets whole lines, because stdout and stderr share it and
        # an unbuffered print() writes its text and its newline in two calls that the other stream can split.
        # A partial line (a prompt, a progress bar) is written alone once nothing follows it for a moment.
        pending = b""
        while True:
            if not select.select([self.read_end], [], [], _PARTIAL_LINE_WAIT if pending else None)[0]:
                self._to_log(pending)
                pending = b""
                self.copying = False
                continue
            # Set before the read empties the pipe: drain() then never sees bytes that are in neither place.
            self.copying = True
            chunk = os.read(self.read_end, 65536)
            if not chunk:
                break
            _write_all(self.original, chunk)
            pending += chunk
            cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
            if len(pending) > _MAX_PARTIAL_LINE:
                cut = len(pending)
            if cut:
                self._to_log(pending[:cut])
                pending = pending[cut:]
            self.copying = bool(pending)
        if pending:
            self._to_log(pending)
        self.copying = False

    def _to_log(self, data: bytes) -> None:
        with self.lock:
            _write_all(self.log_fd, data)

    def drain(self, timeout: float = 2.0) -> None:
        """Wait until everything written so far is copied."""
        deadline = time.monotonic() + timeout
        # The pipe first, then the flag: a chunk leaves the pipe only after the flag is up.
        while (_unread_bytes(self.read_end) or self.copying) and time.monotonic() < deadline:
            time.sleep(0.005)

    def restore(self) -> None:
        """Point fd back at its destination once everything this rank wrote is copied. Not waiting for the pipe's
        end: processes this rank started (data-loader workers) and libraries that saved a copy of the descriptor
        and never closed it (DeepSpeed's op builder, around its compiler probes) keep it open until the process
        exits; the thread is a daemon and copies whatever they still write."""
        os.dup2(self.original, self.fd)
        self.drain()


def _chain(exc: BaseException) -> list[BaseException]:
    """exc and the exceptions it was raised from or during: a collective that failed on a lost peer is often
    followed by a second error (DeepSpeed's launcher stopping this rank's data-loader workers)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _blocked_in(chain: list[BaseException]) -> str | None:
    """The collective a failed rank was in; for a lost peer with none on the traceback (a wait on an asynchronous
    collective's handle), the line that waited."""
    waited = (rank_status.innermost_caller(e) for e in chain if lost_peer(str(e)))
    return rank_status.collective_of(chain) or next((c for c in waited if c), None)


def _unread_bytes(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class RankLog:
    """Context manager around a rank's whole life: the tee, then the exit record."""

    def __init__(self, directory: Path, rank: int):
        self.directory, self.rank = directory, rank
        self.exit_code: int | None = None  # set by the body when it returns a code other than 0
        self._tees: list[_Tee] = []
        self._log_fd: int | None = None

    def __enter__(self) -> RankLog:
        self.directory.mkdir(parents=True, exist_ok=True)
        # Not the tmp-and-rename rule: a log is appended to while the rank runs, it is never a finished output.
        self._log_fd = os.open(log_path(self.directory, self.rank), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        _write_all(self._log_fd, f"{HEADER_PREFIX}{self.rank} pid {os.getpid()} started {started} ====\n".encode())
        sys.stdout.flush()
        sys.stderr.flush()
        lock = threading.Lock()
        self._tees = [_Tee(fd, self._log_fd, lock) for fd in (1, 2)]
        rank_status.start(self.directory, self.rank)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # The record first: while this rank ends, more errors may be raised into it (torch's SIGCHLD handler, when
        # DeepSpeed's launcher stops the data-loader workers), and the record must be written regardless.
        error = None if exc is None else f"{type(exc).__name__}: {exc}"
        code = self.exit_code if exc is None else 1
        if isinstance(exc, SystemExit) and isinstance(exc.code, int):
            code = exc.code
        chain = [] if exc is None else _chain(exc)
        # The collective's own message, when another error followed it (a data-loader worker's death).
        peer_error = next((f"{type(e).__name__}: {e}" for e in chain if lost_peer(str(e))), None)
        phase = rank_status.current()
        record = {"rank": self.rank, "pid": os.getpid(), "code": code or 0, "error": error,
                  "lost_peer": peer_error is not None, "peer_error": peer_error, "time": time.time(),
                  "phase": phase and phase.text, "phase_since": phase and phase.since,
                  "blocked_in": _blocked_in(chain) if chain else None}
        path = exit_record_path(self.directory, self.rank)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        sys.stdout.flush()
        sys.stderr.flush()
        for tee in self._tees:
            tee.drain()
        if exc is not None and self._log_fd is not None:
            # Python prints the traceback after this rank's code has ended, too late for the tee: copy it now.
            _write_all(self._log_fd, "".join(traceback.format_exception(exc)).encode())
        for tee in self._tees:
            tee.restore()
        self._tees = []
        # The log stays open: a data-loader worker may still write to the pipe, and the thread copies it there.


# --- launcher side ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankEnd:
    rank: int
    record: dict | None  # None: no exit record from this launch
    phase: rank_status.Phase | None = None  # the last phase it noted in this launch

    @property
    def killed(self) -> bool:
        return self.record is None

    @property
    def raised_itself(self) -> bool:
        """Raised an error of its own (not a lost peer)."""
        return self.record is not None and self.record["code"] != 0 and not self.record["lost_peer"]

    @property
    def failed_itself(self) -> bool:
        """Died without a record, or raised an error that is not a lost peer."""
        return self.killed or self.raised_itself


def rank_ends(directory: Path, world_size: int, since: float) -> list[RankEnd]:
    """How each rank of the launch that started at `since` (time.time()) ended; older records are ignored."""
    ends = []
    for rank in range(world_size):
        path = exit_record_path(directory, rank)
        record = None
        if path.is_file() and path.stat().st_mtime >= since:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                record = None
        ends.append(RankEnd(rank, record, rank_status.read(directory, rank, since)))
    return ends


def last_lines(directory: Path, rank: int, since: float, count: int = TAIL_LINES) -> list[str]:
    """The last lines rank wrote in the launch that started at `since` (nothing if its log is older)."""
    path = log_path(directory, rank)
    if not path.is_file() or path.stat().st_mtime < since:
        return []
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 256 * 1024))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(HEADER_PREFIX)]
    if starts:
        lines = lines[starts[-1] + 1:]
    return [line for line in lines if line.strip()][-count:]


def _first_line(text: str | None, limit: int = 300) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else "no message"
    return line if len(line) <= limit else line[:limit] + "..."


def _where(end: RankEnd, now: float) -> str:
    """"; it was in training step 4 for 38 s": what a rank was doing when it ended (a rank without a record: until
    the report, which is how long a hung rank was stuck)."""
    if end.phase is None:
        return ""
    ended = end.record["time"] if end.record else now
    return f"; it was in {end.phase.text} for {max(0.0, ended - end.phase.since):.0f} s"


def failure_report(directory: Path, world_size: int, since: float, exit_code: int) -> str:
    """One paragraph per rank that caused the failure (the first ones to go), then a line for the others, each
    naming the phase the rank was in and, for a rank that lost a peer, the collective it was blocked in."""
    now = time.time()
    ends = rank_ends(directory, world_size, since)
    raised = [end for end in ends if end.raised_itself]
    # A rank that raised an error of its own is the cause; DeepSpeed's launcher then ends the others (SIGKILL 30 s
    # after SIGTERM for a rank that does not exit), which leaves them without a record. With no such error, a rank
    # killed without a record is the cause, or else every rank that failed is shown.
    culprits = raised or [end for end in ends if end.killed] or [end for end in ends if end.record
                                                                 and end.record["code"] != 0]
    parts = [f"deepy: the job failed (exit code {exit_code})."]
    for end in culprits:
        log = log_path(directory, end.rank)
        if end.killed and not (log.is_file() and log.stat().st_mtime >= since):
            parts.append(f"rank {end.rank} ended before it opened {log} (while starting up: its own message "
                         "above says why, or it was killed)")
            continue
        if end.killed:
            what = ("died without an exit record: killed by a signal (kill -9, the OOM killer, the scheduler, or "
                    "the launcher ending a rank that hung) or a crash in native code")
        else:
            error = end.record["error"]
            what = f"failed: {_first_line(error) if error else 'exit code ' + str(end.record['code'])}"
        tail = last_lines(directory, end.rank, since)
        shown = "\n".join(f"    {line}" for line in tail) if tail else "    (nothing logged)"
        parts.append(f"rank {end.rank} {what}{_where(end, now)}. Last lines of {log}:\n{shown}")
    for end in ends:
        if end in culprits:
            continue
        if end.killed and raised:
            parts.append(f"rank {end.rank} then ended without an exit record (stopped by the launcher)"
                         f"{_where(end, now)}")
        elif end.record and end.record["code"] != 0:
            blocked = end.record.get("blocked_in")
            error = end.record.get("peer_error") or end.record["error"]
            parts.append(f"rank {end.rank} then stopped: it lost a peer{' in ' + blocked if blocked else ''}"
                         f"{_where(end, now)} ({_first_line(error, limit=600)})")
    if not culprits:
        parts.append(f"no rank reported an error; rank logs are in {directory}")
    return "\n".join(parts)
