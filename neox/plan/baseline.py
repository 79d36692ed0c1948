"""The memory a rank uses besides its model: measured on this machine, or a stated constant on a GPU.

On a CPU the rank's RSS is the whole story: python, torch, DeepSpeed and neox imports, the gloo process group,
the tokenizer, the allocator's arenas and thread pools. They are measured once per plan by running
neox/plan/baseline_probe.py (what a rank runs, with a model too small to count) in a fresh process and reading
its VmHWM. On a GPU only device memory counts: the CUDA context plus NCCL and cuBLAS workspaces, which a plan made
without the GPU cannot measure; GPU_FRAMEWORK_BYTES states what is assumed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from neox.config.neox_config import NeoXConfig

GIB = 1024 ** 3
# CUDA context (~0.3-0.5 GiB on an A100 with PyTorch's kernels loaded), NCCL communicator buffers for the dp, tp
# and pp groups and cuBLAS workspaces (a few hundred MiB), and caching-allocator slack: 1.5 GiB, an assumption.
GPU_FRAMEWORK_BYTES = int(1.5 * GIB)
PROBE_TIMEOUT_S = 300


class BaselineError(RuntimeError):
    """The baseline probe could not run or measure."""


@dataclass(frozen=True)
class Baseline:
    bytes: int
    how: str  # one line for the report


def gpu_baseline() -> Baseline:
    return Baseline(GPU_FRAMEWORK_BYTES, "assumed: CUDA context + NCCL/cuBLAS workspaces + allocator slack")


def probe_spec(cfg: NeoXConfig) -> dict:
    return {
        "tokenizer_type": cfg.data.tokenizer_type,
        "vocab_file": cfg.data.vocab_file,
        "merge_file": cfg.data.merge_file,
        "precision": cfg.optim.precision,
        "zero_stage": cfg.optim.zero_stage,
        "measures_peak_flops": cfg.log.peak_flops is None,
    }


def measure_cpu_baseline(cfg: NeoXConfig) -> Baseline:
    """Peak RSS of a fresh process running what a rank runs around a negligible model (a few seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    argv = [sys.executable, "-m", "neox.plan.baseline_probe", json.dumps(probe_spec(cfg))]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BaselineError(f"the baseline probe ({' '.join(argv[:3])}) did not finish: {err}") from None
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise BaselineError(f"the baseline probe failed (exit {result.returncode}): {tail}; pass --baseline_mb "
                            "to state the per-rank framework memory instead of measuring it")
    measured = int(json.loads(lines[-1])["peak_rss_bytes"])
    return Baseline(measured, "measured here: peak RSS of a process running a rank's imports, gloo group, "
                              "tokenizer and DeepSpeed engine around a negligible model")
