"""Where each rank is, so that a job that hangs or dies can name what every rank was doing.

Rank side: enter("training step 812") notes the phase a rank begins ("the rendezvous with 10.0.0.1:29500 (16
ranks)", "building the datasets", "checkpoint save at step 800", ...) in {ranks_dir}/rank{R}.status, a record even a
rank killed without a word leaves behind; collective_of(errors) names the torch.distributed call a rank failed in
(gloo's and NCCL's timeout messages name no operation). Launcher side: read() for the failure report.

The record is rewritten in place at a fixed size (pwrite at offset 0): no rename or truncate per step, which on a
shared filesystem would be one metadata operation per rank per step. Until start() names the directory (the rank
programs that keep rank files call it), enter() only remembers the phase.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

RECORD_BYTES = 512
_PHASE_CHARS = 300  # keeps the JSON record within RECORD_BYTES
_C10D_MODULE = os.path.join("torch", "distributed", "distributed_c10d.py")
# torch itself, DeepSpeed's wrappers of torch.distributed and typing_extensions' @deprecated wrapper (torch marks
# collectives with it): the frame that called into them is the one to name
_COMM_LAYER_PATHS = (os.sep + "torch" + os.sep, os.path.join("deepspeed", "comm") + os.sep,
                    os.sep + "typing_extensions.py")
_GROUP_RANKS_SHOWN = 8


@dataclass(frozen=True)
class Phase:
    text: str
    since: float  # time.time() when the rank entered it


_fd: int | None = None
_current: Phase | None = None


def status_path(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank}.status"


def start(directory: Path, rank: int) -> None:
    """From now on this process's phases go to directory/rank{rank}.status (a later start moves them)."""
    global _fd
    directory.mkdir(parents=True, exist_ok=True)
    if _fd is not None:
        os.close(_fd)
    _fd = os.open(status_path(directory, rank), os.O_WRONLY | os.O_CREAT, 0o644)
    os.ftruncate(_fd, 0)  # once per start: a record of an older format or size must not linger behind ours
    enter("start-up (before the rendezvous)")


def enter(text: str) -> None:
    global _current
    _current = Phase(text[:_PHASE_CHARS], time.time())
    if _fd is None:
        return
    record = json.dumps({"phase": _current.text, "since": _current.since, "pid": os.getpid()}).encode()
    os.pwrite(_fd, record.ljust(RECORD_BYTES - 1) + b"\n", 0)


def current() -> Phase | None:
    return _current


def read(directory: Path, rank: int, since: float) -> Phase | None:
    """The last phase rank noted in the launch that started at `since` (time.time()), or None."""
    path = status_path(directory, rank)
    try:
        if path.stat().st_mtime < since:
            return None
        record = json.loads(path.read_bytes().split(b"\n", 1)[0])
        return Phase(str(record["phase"]), float(record["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def collective_of(errors: Sequence[BaseException]) -> str | None:
    """The torch.distributed call a rank failed in, with its group and the line that called it: "all_reduce over the
    world group (2 ranks), called at neox/train/preemption.py:74 (agreed)". errors: the error, then the ones it was
    raised from or during (a collective that failed on a lost peer is often followed by another error raised in its
    frames, e.g. a data-loader worker's death, whose traceback has the caller). None when no such call is on them."""
    call = next((found for found in map(_c10d_call, errors) if found), None)
    if call is None:
        return None
    site = next((found for found in map(_call_site, errors) if found), None)
    return call + (f", called at {site}" if site else "")


def _c10d_call(error: BaseException) -> str | None:
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        # The outermost frame in torch's c10d module is the public call (all_reduce, barrier, new_group,
        # init_process_group); the ones below it are its private helpers.
        if code.co_filename.endswith(_C10D_MODULE) and not code.co_name.startswith("_"):
            return code.co_name + _group_text(tb.tb_frame.f_locals.get("group"), code.co_name)
        tb = tb.tb_next
    return None


def _call_site(error: BaseException) -> str | None:
    """The last frame outside the comm layer before the traceback enters it."""
    tb, outside, site = error.__traceback__, None, None
    while tb is not None:
        if _is_comm_layer(tb.tb_frame.f_code.co_filename):
            site = site or outside
        else:
            outside, site = _frame_text(tb), None
        tb = tb.tb_next
    return site


def innermost_caller(error: BaseException) -> str | None:
    """file:line (function) of the innermost frame outside torch and DeepSpeed's comm layer: where a wait on an
    asynchronous collective's handle (DeepSpeed's ZeRO buckets) was, when no torch.distributed call is on the
    traceback."""
    tb, found = error.__traceback__, None
    while tb is not None:
        if not _is_comm_layer(tb.tb_frame.f_code.co_filename):
            found = _frame_text(tb)
        tb = tb.tb_next
    return found


def _is_comm_layer(filename: str) -> bool:
    return any(part in filename for part in _COMM_LAYER_PATHS)


def _frame_text(tb) -> str:
    return f"{_short_path(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno} ({tb.tb_frame.f_code.co_name})"


def _short_path(filename: str) -> str:
    """deepspeed/runtime/engine.py, neox/train/run.py: from the package on."""
    for marker, prefix in (("site-packages" + os.sep, ""), (os.sep + "neox" + os.sep, "neox" + os.sep)):
        if marker in filename:
            return prefix + filename.rsplit(marker, 1)[1]
    return filename


def _group_text(group, operation: str) -> str:
    if operation in ("init_process_group", "new_group", "new_subgroups"):
        return ""  # the group is what is being made
    try:
        import torch.distributed as dist

        if group is None or group is dist.GroupMember.WORLD:
            return f" over the world group ({dist.get_world_size()} ranks)"
        ranks = dist.get_process_group_ranks(group)
    except (ImportError, RuntimeError, ValueError):  # the group is gone, or this is no group at all
        return ""
    shown = ", ".join(str(r) for r in ranks[:_GROUP_RANKS_SHOWN])
    return f" over ranks {shown}" if len(ranks) <= _GROUP_RANKS_SHOWN else f" over {len(ranks)} ranks ({shown}, ...)"
