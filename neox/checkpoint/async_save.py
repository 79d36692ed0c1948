"""Checkpoint saves that training does not wait for (checkpoint_async), and the synchronous ones, behind one object.

With checkpoint_async a save blocks training only while each rank copies its state to host memory:
- DeepSpeed's own files: DeepSpeed still decides what goes into them and builds its state dicts, but during the save
  its checkpoint engine is replaced by one that copies each state dict's tensors to host memory (pinned when they
  are on a GPU) and hands the copy to a background thread, which torch.saves it, fsyncs it and renames it into place;
- the layout-free shard (neox/checkpoint/layout_state.py): copied to host memory once, written by the same thread;
- the small files (RNG streams, config, tokenizer) are written at once.
Training then continues. The checkpoint becomes complete (complete.json, then `latest`) only once every rank's
background writes are durable: every step each rank says whether its writer is idle (one all-reduce of two flags,
only while a save is in flight), and the first step at which all are finishes it. The next save, a preemption stop
and the end of training wait for it first. A SIGTERM therefore lets the write finish and the checkpoint complete
before the run checkpoints its last step and exits; a kill -9 mid-write leaves a directory without complete.json,
which no resume picks. Peak extra host memory: one copy of the rank's DeepSpeed state plus its layout-free shard.
"""
from __future__ import annotations

import copy
import os
import queue
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

from neox.checkpoint import engine_state
from neox.checkpoint.errors import CheckpointError


class CheckpointWriteError(CheckpointError):
    pass


class BackgroundWriter:
    """One daemon thread running write jobs in the order they were submitted."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s  # only a failure test slows the writes down (neox/train/faults.py)
        self._jobs: queue.Queue[Callable[[], Any]] = queue.Queue()
        self._unfinished = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name="neox-checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], Any]) -> None:
        with self._lock:
            self._unfinished += 1
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if self.delay_s:
                    time.sleep(self.delay_s)
                job()
            except BaseException as err:  # reported to the training thread, which stops the run
                with self._lock:
                    self._errors.append(f"{type(err).__name__}: {err}")
            finally:
                with self._lock:
                    self._unfinished -= 1
                    self._idle.notify_all()

    def idle(self) -> bool:
        with self._lock:
            return self._unfinished == 0

    def wait(self) -> list[str]:
        """Block until every submitted job has run; the errors they raised (and forget them)."""
        with self._lock:
            while self._unfinished:
                self._idle.wait()
            errors, self._errors = self._errors, []
        return errors


def host_copy(obj: Any) -> Any:
    """A copy of a (nested) state dict whose tensors live in host memory and share nothing with training's."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type == "cpu":
            return t.clone()
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t)
        return out
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the type (OrderedDict, defaultdict) and its settings
        for key, value in obj.items():
            out[key] = host_copy(value)
        return out
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(host_copy(v) for v in obj)
    try:
        return copy.deepcopy(obj)
    except Exception:  # an object that cannot be copied is one DeepSpeed does not change after saving
        return obj


def torch_save_durable(obj: Any, path: str, zipfile: bool) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp, _use_new_zipfile_serialization=zipfile)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _snapshot_engine_class():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class SnapshotCheckpointEngine(CheckpointEngine):
        """DeepSpeed's checkpoint engine interface: save() copies to host memory and queues the write."""

        def __init__(self, original, writer: BackgroundWriter):
            super().__init__()
            self.name = "neox-snapshot"
            self.original, self.writer = original, writer
            self.zipfile = bool(getattr(original, "zipfile_serialization", False))

        def create(self, info):
            return None

        def save(self, state_dict, path: str):
            snapshot = host_copy(state_dict)
            self.writer.submit(lambda: torch_save_durable(snapshot, path, self.zipfile))

        def load(self, path: str, map_location=None):
            return self.original.load(path, map_location=map_location)

        def commit(self, info):
            return True

        def makedirs(self, path, exist_ok=False):
            os.makedirs(path, exist_ok=exist_ok)

        def is_data_parallel_writer(self, dp_rank):
            return self.original.is_data_parallel_writer(dp_rank)

        def preserves_storage_sharing(self):
            return False  # the host copy is compact already: DeepSpeed need not clone views before saving

    return SnapshotCheckpointEngine


@contextmanager
def deepspeed_saves_in_background(engine, writer: BackgroundWriter):
    """During the block, DeepSpeed's engine writes its checkpoint files through `writer`."""
    original = engine.checkpoint_engine
    engine.checkpoint_engine = _snapshot_engine_class()(original, writer)
    try:
        yield
    finally:
        engine.checkpoint_engine = original


class CheckpointSaver:
    """Saves checkpoints for the training loop, synchronously or (checkpoint_async) in the background.

    save(), poll() and wait() are collective: every rank calls them at the same points of the loop. on_complete(path,
    seconds from the save's start) runs on every rank when a checkpoint has become complete."""

    def __init__(self, asynchronous: bool, rank: int, barrier: Callable[[], None], device: torch.device,
                 on_complete: Callable[[Path, float], None], write_delay_s: float = 0.0):
        self.asynchronous, self.rank, self.barrier, self.device = asynchronous, rank, barrier, device
        self.on_complete = on_complete
        self.writer = BackgroundWriter(write_delay_s) if asynchronous else None
        self.in_flight: engine_state.SaveInProgress | None = None

    def save(self, engine, save_dir: Path, iteration: int, client_state: dict[str, Any],
             run_files: engine_state.RunFiles, keep_last: int | None,
             write_extra: Callable[[Path, Callable[[Any], None] | None], None], **options) -> float:
        """Returns the seconds training waited for it."""
        self.wait()  # the previous checkpoint is completed first: checkpoints complete in order
        began = time.perf_counter()
        if self.writer is None:
            started = engine_state.begin_save(engine, save_dir, iteration, client_state, run_files, self.rank,
                                              self.barrier, keep_last, lambda d: write_extra(d, None), **options)
            self._finish(started)
            return time.perf_counter() - began
        submit = self._submit_shard
        with deepspeed_saves_in_background(engine, self.writer):
            self.in_flight = engine_state.begin_save(engine, save_dir, iteration, client_state, run_files, self.rank,
                                                     self.barrier, keep_last, lambda d: write_extra(d, submit),
                                                     **options)
        return time.perf_counter() - began

    def _submit_shard(self, shard_write) -> None:
        self.writer.submit(shard_write.write)

    def poll(self) -> None:
        """Collective: complete the checkpoint in flight if every rank's writes have finished."""
        if self.in_flight is None:
            return
        if self._agree(self.writer.idle(), failed=False)[0]:
            self.wait()

    def wait(self) -> None:
        """Collective: wait for this rank's writes, then complete the checkpoint in flight (if any)."""
        if self.in_flight is None:
            return
        errors = self.writer.wait()
        _, failed = self._agree(True, failed=bool(errors))
        started, self.in_flight = self.in_flight, None
        if failed:
            mine = f": on this rank {'; '.join(errors)}" if errors else " on another rank (its log says why)"
            raise CheckpointWriteError(f"writing checkpoint {started.ckpt_dir} in the background failed{mine}; it is "
                                       "left without complete.json, so no resume picks it")
        self._finish(started)

    def _finish(self, started: engine_state.SaveInProgress) -> None:
        path = engine_state.finish_save(started, self.rank, self.barrier)
        self.on_complete(path, time.perf_counter() - started.began)

    def _agree(self, done: bool, failed: bool) -> tuple[bool, bool]:
        """(every rank done, any rank failed)."""
        if not torch.distributed.is_initialized():
            return done, failed
        flags = torch.tensor([0 if done else 1, 1 if failed else 0], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return flags[0].item() == 0, flags[1].item() == 1
