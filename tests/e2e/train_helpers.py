"""Helpers for the end-to-end training tests: a tiny test config, `deepy train` as a subprocess, metrics readers."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.conftest import CORPORA, REPO_ROOT

DEEPY = REPO_ROOT / "launcher" / "deepy.py"
CPU_LAUNCH_CONFIG = REPO_ROOT / "configs" / "cpu.yml"
PREPROCESS = REPO_ROOT / "tools" / "preprocess_data.py"
KJV = CORPORA / "kjv.jsonl.zst"
LAUNCH_TIMEOUT_S = 150

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
                 "save": str(run_dir / "ckpt"), "log_dir": str(run_dir / "logs"), **(extra or {})}
    argv = [sys.executable, str(DEEPY), "train", str(model_config), str(CPU_LAUNCH_CONFIG)]
    for key, value in overrides.items():
        argv += [f"--{key}", _cli_value(value)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)
    launch = Launch(run_dir, result, time.perf_counter() - start)
    if check and result.returncode != 0:
        raise AssertionError(f"deepy train failed ({result.returncode}):\n{launch.output[-6000:]}")
    return launch


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
