"""Helpers for the end-to-end training tests: a tiny test config, `deepy train` as a subprocess, metrics readers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from neox.parallel import rank_status
from neox.parallel.testing import free_port
from tests.conftest import CORPORA, REPO_ROOT

DEEPY = REPO_ROOT / "launcher" / "deepy.py"
CPU_LAUNCH_CONFIG = REPO_ROOT / "configs" / "cpu.yml"
PREPROCESS = REPO_ROOT / "tools" / "preprocess_data.py"
KJV = CORPORA / "kjv.jsonl.zst"
LAUNCH_TIMEOUT_S = 150
# Every collective and the rendezvous give up after this (distributed_timeout_minutes): a rank that hangs ends the job,
# with deepy's report naming each rank's phase and collective (DeepSpeed's launcher adds up to 30 s before it kills a
# rank that ignores its SIGTERM). The longest legitimate wait of these tiny runs (rank 0 building the index caches or
# writing a checkpoint while the others wait) is seconds, even on a busy machine.
TEST_COLLECTIVE_TIMEOUT_MINUTES = 1.0
# run_launch gives up on a job whose ranks have written nothing (log line, phase) for this long: longer than a hang in
# a collective takes to end the job by itself (above), and than start-up (imports) on a loaded machine. A job that
# still progresses runs on, up to LAUNCH_CAP_S: three 2-rank tiny runs (10 s each alone) sharing 0.3 of a core all took
# over 150 s, and were then exiting normally.
STALL_S = 120.0
LAUNCH_CAP_S = 600.0

# 2 layers, hidden 64, 4 heads, seq 64, char-level vocab (512): one optimizer step of 8 sequences takes ~10 ms.
TINY_MODEL: dict = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "seq_length": 64,
    "max_position_embeddings": 64,
    "pos_emb": "rotary",
    "rotary_pct": 0.25,
    "norm": "layernorm",
    "gpt_j_residual": True,
    "activation": "gelu",
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "optimizer": {"type": "Adam", "params": {"lr": 2.0e-3, "betas": [0.9, 0.95], "eps": 1.0e-8}},
    "min_lr": 2.0e-4,
    "lr_decay_style": "cosine",
    "warmup": 0.1,
    # Explicit, so a run stopped at 10 of 20 steps follows the same schedule as the uninterrupted one.
    "lr_decay_iters": 20,
    "weight_decay": 0.1,
    "gradient_clipping": 1.0,
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 4,
    "train_iters": 20,
    "eval_interval": 10,
    "eval_iters": 2,
    "log_interval": 1,
    "split": "949,50,1",
    "tokenizer_type": "CharLevelTokenizer",
    "precision": "fp32",
    # The peak is measured by every run otherwise (0.5 s of matmuls); MFU only needs some denominator here.
    "peak_flops": 1.0e11,
}


def preprocess_kjv(out_dir: Path) -> Path:
    """Tokenize the bundled KJV corpus char-level; returns the data_path prefix (..._text_document)."""
    prefix = out_dir / "kjv"
    result = subprocess.run(
        [sys.executable, str(PREPROCESS), "--input", str(KJV), "--output-prefix", str(prefix),
         "--tokenizer-type", "CharLevelTokenizer", "--append-eod"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"preprocess_data failed:\n{result.stderr}")
    return Path(f"{prefix}_text_document")


def write_config(path: Path, data_path: Path, **overrides) -> Path:
    config = {**TINY_MODEL, "data_path": str(data_path), **overrides}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Launch:
    """One finished `deepy train` run."""
    run_dir: Path
    result: subprocess.CompletedProcess
    seconds: float

    @property
    def save_dir(self) -> Path:
        return self.run_dir / "ckpt"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def output(self) -> str:
        return self.result.stdout + self.result.stderr

    def records(self) -> list[dict]:
        return read_metrics(self.log_dir)

    def losses(self) -> dict[int, float]:
        return train_losses(self.records())


def deepy_train(run_dir: Path, model_config: Path, *, num_gpus: int = 1, zero_stage: int = 0,
                extra: dict | None = None, check: bool = True) -> Launch:
    """`deepy.py train model.yml configs/cpu.yml --key value ...` as a user types it, with its own master port."""
    overrides = {"num_gpus": num_gpus, "zero_optimization.stage": zero_stage, "master_port": free_port(),
                 "distributed_timeout_minutes": TEST_COLLECTIVE_TIMEOUT_MINUTES,
                 "save": str(run_dir / "ckpt"), "log_dir": str(run_dir / "logs"), **(extra or {})}
    argv = [sys.executable, str(DEEPY), "train", str(model_config), str(CPU_LAUNCH_CONFIG)]
    for key, value in overrides.items():
        argv += [f"--{key}", _cli_value(value)]
    start = time.perf_counter()
    result = run_launch(argv, run_dir / "logs" / "ranks", world_size=num_gpus)
    launch = Launch(run_dir, result, time.perf_counter() - start)
    if check and result.returncode != 0:
        raise AssertionError(f"deepy train failed ({result.returncode}):\n{launch.output[-6000:]}")
    return launch


def launch_env() -> dict[str, str]:
    """This environment without the rank variables of an enclosing launch; PYTHONFAULTHANDLER makes every Python
    process of the job print all its threads' stacks on SIGABRT (run_launch sends it to a job that overstays)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    return {**env, "PYTHONFAULTHANDLER": "1"}


def run_launch(argv: list, ranks_dir: Path, world_size: int) -> subprocess.CompletedProcess:
    """Run a deepy command in its own session, for as long as its ranks progress. One stuck for STALL_S (or running
    past LAUNCH_CAP_S) fails the test with where it was stuck: each rank's phase (its rank{R}.status), every process
    still in the session, and the Python stacks of all of them (SIGABRT); then the whole session is killed, so no
    rank outlives the test and slows the next."""
    started = time.time()
    proc = subprocess.Popen([str(a) for a in argv], cwd=REPO_ROOT, env=launch_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=5)  # a timeout here loses no output
            return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            now = time.time()
            stalled = now - _last_progress(ranks_dir, started) > STALL_S
            if stalled or now - started > LAUNCH_CAP_S:
                break
    processes = _session_processes(proc.pid)
    _signal_session(proc.pid, signal.SIGABRT)
    time.sleep(3)  # the stacks are written
    _signal_session(proc.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate()
    phases = [f"rank {rank}: {phase.text} for {time.time() - phase.since:.0f} s" if phase else
              f"rank {rank}: no status" for rank, phase in
              ((rank, rank_status.read(ranks_dir, rank, started)) for rank in range(world_size))]
    why = f"its ranks wrote nothing for {STALL_S:.0f} s" if stalled else f"it ran past {LAUNCH_CAP_S:.0f} s"
    raise AssertionError(
        f"{' '.join(map(str, argv[1:3]))} was stopped after {time.time() - started:.0f} s: {why}. Where each rank "
        f"was: {'; '.join(phases)}.\nProcesses of the job then:\n{processes}\n"
        f"Output (with each process's Python stacks at the end):\n{(stdout + stderr)[-12000:]}")


def _last_progress(ranks_dir: Path, started: float) -> float:
    """When a rank last wrote a log line or entered a phase (the launch's start until one has)."""
    times = [started]
    for path in ranks_dir.glob("rank*"):
        try:
            times.append(path.stat().st_mtime)
        except OSError:  # replaced meanwhile (an exit record)
            continue
    return max(times)


def _session_processes(session: int) -> str:
    lines = []
    for process in psutil.process_iter(["pid", "ppid", "status", "cmdline"]):
        try:
            if os.getsid(process.info["pid"]) == session:
                cmd = " ".join(process.info["cmdline"] or [])[:200]
                lines.append(f"  {process.info['pid']} (parent {process.info['ppid']}) {process.info['status']}: {cmd}")
        except (OSError, psutil.Error):
            continue
    return "\n".join(lines) or "  (none: the launch ended, but something it started still held its output open)"


def _signal_session(session: int, sig: int) -> None:
    try:
        os.killpg(session, sig)
    except ProcessLookupError:
        pass


def _cli_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def read_metrics(log_dir: Path) -> list[dict]:
    path = log_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_losses(records: list[dict]) -> dict[int, float]:
    return {r["iteration"]: r["lm_loss"] for r in records if "lm_loss" in r}


def max_relative_diff(reference: dict[int, float], other: dict[int, float]) -> float:
    assert sorted(reference) == sorted(other), (sorted(reference), sorted(other))
    return max(abs(other[i] - reference[i]) / abs(reference[i]) for i in reference)
