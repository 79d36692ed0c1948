"""`profile` and `memory_profiling`: what happens in training steps [profile_step_start, profile_step_stop).

Steps are counted from 0 as gpt-neox counts them (step k takes the run from k to k+1 finished iterations, so it
is logged as iteration k+1); a resumed run profiles the steps of the window it still runs.

- profile: a torch.profiler Chrome trace (CPU, plus CUDA activities on GPU; shapes, memory, FLOPs, modules and
  stacks as gpt-neox records them), one `train_step#k` annotation per step, written when the window closes to
  <dir>/profile/rank<N>.trace.json. On GPU each step is also an NVTX range and the window is bracketed by
  cudaProfilerStart/Stop, so `nsys profile --capture-range=cudaProfilerApi` captures it as in gpt-neox.
- memory_profiling on GPU: gpt-neox's CUDA allocator history (recorded from start-up, 100,000 events), dumped at
  the end of the window as mem_snapshot.pickle (rank 0; other ranks mem_snapshot.rank<N>.pickle), for
  pytorch.org/memory_viz.
- memory_profiling on CPU, which has no allocator history: per step, the process's resident memory at its start
  and end, the process's peak resident memory so far, and the peak and final bytes of torch CPU tensors allocated
  since the window opened (from the profiler's memory events), in cpu_memory.rank<N>.json.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from neox.config.log import LogConfig

CUDA_HISTORY_ENTRIES = 100_000  # gpt-neox's trace_alloc_max_entries
STEP_ANNOTATION = "train_step#{}"


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class StepProfiler:
    """Does nothing unless profile or memory_profiling is on."""

    def __init__(self, log: LogConfig, rank: int, device: torch.device, out_dir: Path):
        self.trace = log.profile
        self.memory = log.memory_profiling
        self.start, self.stop = log.profile_step_start, log.profile_step_stop
        if not (self.trace or self.memory):
            self.start = self.stop = -1  # no step is in the window
        self.rank, self.cuda = rank, device.type == "cuda"
        self.trace_path = out_dir / "profile" / f"rank{rank}.trace.json"
        memory_dir = Path(log.memory_profiling_path) if log.memory_profiling_path else out_dir / "memory"
        if self.cuda:
            name = "mem_snapshot.pickle" if rank == 0 else f"mem_snapshot.rank{rank}.pickle"
        else:
            name = f"cpu_memory.rank{rank}.json"
        self.memory_path = memory_dir / name
        self._profiler: torch.profiler.profile | None = None
        self._steps: list[dict[str, Any]] = []
        self._first_step: int | None = None
        if self.memory and self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=CUDA_HISTORY_ENTRIES)

    @property
    def active(self) -> bool:
        return self._first_step is not None

    @contextlib.contextmanager
    def step(self, k: int) -> Iterator[None]:
        """Wraps training step k (0-based)."""
        if not self.start <= k < self.stop:
            yield
            return
        if not self.active:
            self._open(k)
        rss_start = _rss_bytes()
        if self.cuda:
            torch.cuda.nvtx.range_push(STEP_ANNOTATION.format(k))
        try:
            with torch.profiler.record_function(STEP_ANNOTATION.format(k)):
                yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_pop()
            self._steps.append({"step": k, "iteration": k + 1, "rss_bytes_start": rss_start,
                                "rss_bytes_end": _rss_bytes(), "peak_rss_bytes": _peak_rss_bytes()})
        if k == self.stop - 1:
            self.close()

    def _open(self, k: int) -> None:
        self._first_step = k
        if self.cuda and self.trace:
            torch.cuda.cudart().cudaProfilerStart()
        # CPU memory figures come from the profiler's memory events, so memory_profiling alone also runs it.
        if self.trace or (self.memory and not self.cuda):
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            full = self.trace
            self._profiler = torch.profiler.profile(activities=activities, record_shapes=full, profile_memory=True,
                                                    with_flops=full, with_modules=full, with_stack=full)
            self._profiler.start()

    def close(self) -> list[str]:
        """End the window (if open) and write its files; rank 0 prints (and returns) one line per file."""
        if not self.active:
            return []
        lines = []
        first, last = self._first_step, self._steps[-1]["step"] if self._steps else self._first_step
        self._first_step = None
        if self.cuda and self.trace:
            torch.cuda.cudart().cudaProfilerStop()
        trace_file = None
        if self._profiler is not None:
            self._profiler.stop()
            if self.trace:
                self.trace_path.parent.mkdir(parents=True, exist_ok=True)
                trace_file = self.trace_path
            else:
                handle, tmp = tempfile.mkstemp(suffix=".trace.json")
                os.close(handle)
                trace_file = Path(tmp)
            self._profiler.export_chrome_trace(str(trace_file))
            self._profiler = None
            if self.trace:
                lines.append(f"profile: torch.profiler trace of steps {first}..{last} -> {self.trace_path}")
        if self.memory:
            self.memory_path.parent.mkdir(parents=True, exist_ok=True)
            if self.cuda:
                torch.cuda.memory._dump_snapshot(str(self.memory_path))
                torch.cuda.memory._record_memory_history(enabled=None)
                lines.append(f"memory_profiling: CUDA allocator snapshot after step {last} -> {self.memory_path}")
            else:
                self._write_cpu_memory(trace_file)
                lines.append(f"memory_profiling (CPU, which has no CUDA allocator history): process RSS and torch CPU "
                             f"allocations of steps {first}..{last} -> {self.memory_path}")
        if trace_file is not None and not self.trace:
            trace_file.unlink(missing_ok=True)
        if self.rank == 0:
            for line in lines:
                print(line, flush=True)
        return lines

    def _write_cpu_memory(self, trace_file: Path) -> None:
        events = json.loads(trace_file.read_text(encoding="utf-8"))["traceEvents"]
        spans = {e["name"]: (e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                 if e.get("name", "").startswith("train_step#") and e.get("ph") == "X"}
        memory = sorted((e["ts"], e["args"].get("Total Allocated", 0)) for e in events
                        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0)
        for step in self._steps:
            begin, end = spans.get(STEP_ANNOTATION.format(step["step"]), (None, None))
            inside = [total for ts, total in memory if begin is not None and begin <= ts <= end]
            step["torch_cpu_allocated_peak_bytes"] = max(inside) if inside else None
            step["torch_cpu_allocated_end_bytes"] = inside[-1] if inside else None
        payload = {
            "device": "cpu",
            "recorded": "CPU has no CUDA-style allocator history. Per step: resident set size (RSS) of this process at "
                        "the step's start and end (/proc/self/statm), the process's peak RSS so far (the kernel's "
                        "high-water mark, getrusage ru_maxrss, counted a little differently), and the peak and final "
                        "bytes of torch CPU tensors allocated since the profiled window opened and still live "
                        "(torch.profiler memory events).",
            "rank": self.rank,
            "steps": self._steps,
        }
        self.memory_path.write_text(json.dumps(payload, indent=1), encoding="utf-8")


def build_step_profiler(log: LogConfig, rank: int, device: torch.device, run_dir: Path) -> StepProfiler:
    """Files go under log_dir, else tensorboard_dir (where gpt-neox puts its trace), else the run directory."""
    out_dir = Path(log.log_dir or log.tensorboard_dir or run_dir)
    return StepProfiler(log, rank, device, out_dir)
