"""Where training metrics go: console, {log_dir}/metrics.jsonl, TensorBoard and wandb.

The loop builds one dict per log line and hands it to `MetricsSinks.write`; each sink decides its format.
Only the rank that owns the loss (rank 0, or the last pipeline stage's first rank) creates sinks.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Protocol, TextIO


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line, flushed each line so a killed run keeps everything logged so far."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


_CONSOLE_KEYS = (("iteration", "{}"), ("lm_loss", "{:.4f}"), ("valid_loss", "{:.4f}"), ("valid_ppl", "{:.2f}"),
                 ("test_loss", "{:.4f}"), ("lr", "{:.3e}"), ("grad_norm", "{:.3f}"),
                 ("tokens_per_sec", "{:.0f}"), ("tflops", "{:.4f}"), ("mfu", "{:.1%}"))


class ConsoleSink:
    def __init__(self, stream: TextIO = sys.stdout):
        self._stream = stream

    def write(self, record: dict[str, Any]) -> None:
        parts = [f"{key} {fmt.format(record[key])}" for key, fmt in _CONSOLE_KEYS
                 if key in record and record[key] is not None]
        print(" | ".join(parts), file=self._stream, flush=True)

    def close(self) -> None:
        pass


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # imported only when asked for: slow import
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("iteration", 0)
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    def __init__(self, project: str, run_name: str | None, config: dict[str, Any]):
        try:
            import wandb
        except ImportError as err:
            raise RuntimeError("wandb_project is set but the wandb package is not installed: "
                               "`pip install wandb`, or remove wandb_project from the config") from err
        self._run = wandb.init(project=project, name=run_name, config=config)

    def write(self, record: dict[str, Any]) -> None:
        self._run.log({k: v for k, v in record.items() if k != "iteration"}, step=record.get("iteration"))

    def close(self) -> None:
        self._run.finish()


class MetricsSinks:
    def __init__(self, sinks: list[Sink]):
        self._sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for sink in self._sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()


def build_sinks(log_dir: str | Path | None, tensorboard_dir: str | Path | None = None,
                wandb_project: str | None = None, run_name: str | None = None,
                run_config: dict[str, Any] | None = None, console: bool = True) -> MetricsSinks:
    sinks: list[Sink] = []
    if console:
        sinks.append(ConsoleSink())
    if log_dir:
        sinks.append(JsonlSink(Path(log_dir) / "metrics.jsonl"))
    if tensorboard_dir:
        sinks.append(TensorBoardSink(Path(tensorboard_dir)))
    if wandb_project:
        sinks.append(WandbSink(wandb_project, run_name, run_config or {}))
    return MetricsSinks(sinks)
