"""The GPU check's working directory and the product commands it runs there.

The data is the bundled KJV corpus tokenized with the GPT-2 BPE (tools/preprocess_data.py, about a second); the
model is configs/125M.yml exactly as shipped, with one overlay for the data, tokenizer and launch (run.yml) and one
for the precision. The --device cpu stand-in adds a third overlay that shrinks the model, everything else staying
125M.yml's (ZeRO-1, DeepSpeed's pipeline engine, activation checkpointing, rotary, untied head).

Every launch runs in its own process group with the running check's remaining time as its timeout; on a timeout
(or any interruption) the whole group, ranks included, is killed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tools.gpu_check.runner import CheckTimeout, Context

REPO = Path(__file__).resolve().parents[2]
DEEPY = REPO / "launcher" / "deepy.py"
MODEL_CONFIG = REPO / "configs" / "125M.yml"
CORPUS = REPO / "data" / "corpora" / "kjv.jsonl.zst"
GPT2_VOCAB = REPO / "data" / "tokenizers" / "gpt2" / "vocab.json"
GPT2_MERGES = REPO / "data" / "tokenizers" / "gpt2" / "merges.txt"
TOKENIZER_TYPE = "HFGPT2Tokenizer"
MARKER = ".gpu_check"  # a directory holding it is ours to clear at the next run

PRECISIONS = {
    "bf16": {"fp16": {"enabled": False}, "bf16": {"enabled": True}},
    "fp16": {},  # 125M.yml's own section: fp16 with dynamic loss scaling (loss_scale 0)
}
STANDIN_MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 128,
                 "max_position_embeddings": 128, "train_micro_batch_size_per_gpu": 2, "distributed_backend": "gloo"}


class WorkspaceError(RuntimeError):
    """The work directory cannot be used (it holds something that is not an earlier GPU check's)."""


@dataclass
class Launch:
    argv: list[str]
    code: int
    stdout: str
    stderr: str
    seconds: float
    log: Path

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def tail(self, lines: int = 6) -> str:
        """The last lines of its output in one line, for a table row (the log file has it all)."""
        kept = [ln.strip() for ln in self.output.strip().splitlines() if ln.strip()][-lines:]
        return " | ".join(kept) + f" (full output: {self.log})"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Everything the checks read is on this machine (PIQA ships with neox): no Hugging Face network calls or waits.
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def child_env() -> dict[str, str]:
    """This environment without a parent launcher's rank variables, offline for Hugging Face."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OFFLINE_ENV)
    return env


def cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Workspace:
    def __init__(self, root: Path, standin: bool):
        self.root = root
        self.standin = standin
        self._data: Path | None = None
        self._configs: dict[str, Any] = {}
        self._tokenizer = None

    @classmethod
    def fresh(cls, root: str | Path, standin: bool) -> Workspace:
        """An empty work directory: a previous GPU check's is cleared, anything else is refused."""
        root = Path(root).expanduser().absolute()
        if root.exists():
            if not root.is_dir() or (any(root.iterdir()) and not (root / MARKER).is_file()):
                raise WorkspaceError(f"--work-dir {root} exists and is not an earlier GPU check's work directory "
                                     f"(no {MARKER} file in it); choose another directory")
            shutil.rmtree(root)
        root.mkdir(parents=True)
        (root / MARKER).write_text("tools/gpu_check.sh work directory: cleared by the next run\n")
        return cls(root, standin)

    def dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # --- data and configs ----------------------------------------------------------------------------------

    def data_prefix(self, ctx: Context) -> Path:
        """The KJV corpus as GPT-2 BPE tokens (built once per run)."""
        if self._data is None:
            prefix = self.dir("data") / "kjv"
            launch = self.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(CORPUS),
                               "--output-prefix", str(prefix), "--tokenizer-type", TOKENIZER_TYPE,
                               "--vocab-file", str(GPT2_VOCAB), "--merge-file", str(GPT2_MERGES), "--append-eod"],
                              ctx, "preprocess_data")
            if launch.code != 0:
                raise RuntimeError(f"tools/preprocess_data.py exited {launch.code}: {launch.tail()}")
            self._data = Path(f"{prefix}_text_document")
        return self._data

    def config_files(self, ctx: Context, precision: str) -> list[Path]:
        """configs/125M.yml, then run.yml (data, tokenizer, one rank, every step logged), then the precision (and,
        for the stand-in, the small model)."""
        run = {"data_path": str(self.data_prefix(ctx)), "tokenizer_type": TOKENIZER_TYPE,
               "vocab_file": str(GPT2_VOCAB), "merge_file": str(GPT2_MERGES), "num_gpus": 1, "log_interval": 1,
               # no validation during the few steps (its batches are not training throughput); one test batch at the end
               "eval_interval": 100000, "eval_iters": 1}
        files = [MODEL_CONFIG, self._write("run.yml", run), self._write(f"{precision}.yml", PRECISIONS[precision])]
        if self.standin:
            files.append(self._write("standin.yml", STANDIN_MODEL))
        return files

    def _write(self, name: str, values: dict) -> Path:
        path = self.dir("configs") / name
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        return path

    def model_config(self, ctx: Context, precision: str):
        """The resolved config of the training run (vocabulary padded for the GPT-2 tokenizer)."""
        from neox.config import load_config

        if precision not in self._configs:
            self._configs[precision] = load_config([str(f) for f in self.config_files(ctx, precision)],
                                                   vocab_size=self.tokenizer().vocab_size, local_gpus=0)
        return self._configs[precision]

    def tokenizer(self):
        """The run's tokenizer, as deepy and the ranks build it."""
        from neox.tokenizer import build_tokenizer

        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(TOKENIZER_TYPE, GPT2_VOCAB, GPT2_MERGES)
        return self._tokenizer

    def held_out_tokens(self, ctx: Context, count: int) -> list[int]:
        """`count` tokens from the end of the corpus (its test split), without end-of-document tokens."""
        from neox.data.indexed import IndexedDataset

        data = IndexedDataset(self.data_prefix(ctx))
        tokens: list[int] = []
        for i in reversed(range(len(data))):
            tokens = [int(t) for t in data.get(i)[:-1]] + tokens  # each document ends with the EOD token
            if len(tokens) >= count:
                return tokens[-count:]
        raise RuntimeError(f"the corpus holds fewer than {count} tokens")

    # --- launches ------------------------------------------------------------------------------------------

    def deepy(self, command: str, files: list[Path], overrides: dict[str, Any], ctx: Context, name: str) -> Launch:
        """`deepy.py COMMAND a.yml b.yml --key value ...` as a user types it, on a free master port."""
        argv = [sys.executable, str(DEEPY), command, *map(str, files)]
        for key, value in {"master_port": free_port(), **overrides}.items():
            argv += [f"--{key}", cli_value(value)]
        return self.run(argv, ctx, name)

    def run(self, argv: list[str], ctx: Context, name: str) -> Launch:
        """Run argv from the repository root within the check's remaining time; its output goes to logs/NAME.log."""
        log = self.dir("logs") / f"{name}.log"
        start = time.monotonic()
        proc = subprocess.Popen(argv, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            left = ctx.remaining()  # a second early, so the check itself can still report
            stdout, stderr = proc.communicate(timeout=None if left == float("inf") else max(left - 1.0, 0.5))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            log.write_text(f"$ {' '.join(argv)}\n(stopped: the check's time limit ran out)\n")
            raise CheckTimeout() from None
        except BaseException:
            _kill_group(proc)
            raise
        log.write_text(f"$ {' '.join(argv)}\n(exit {proc.returncode})\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
        return Launch(argv, proc.returncode, stdout, stderr, time.monotonic() - start, log)


def _kill_group(proc: subprocess.Popen) -> None:
    """The launch and every process it started (deepy -> DeepSpeed's launcher -> ranks share its group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def read_metrics(log_dir: Path) -> list[dict]:
    path = log_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
