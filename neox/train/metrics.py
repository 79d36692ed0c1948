"""Where training metrics go: console, {log_dir}/metrics.jsonl, TensorBoard, wandb and Comet.

The loop builds one dict per log line and hands it to `MetricsSinks.write`; each sink decides its format. Facts about
the run itself (the git hash) go once through `write_run_info`. Only the rank that owns the loss (rank 0) writes
metrics; with wandb_init_all_ranks the other ranks open a wandb run too (see sinks_for_run).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol, TextIO

from neox.config.errors import ConfigError
from neox.config.log import LogConfig


class SinkError(ConfigError, RuntimeError):
    """A requested sink cannot start (package missing, not logged in): reported like a config error."""


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...
    def write_run_info(self, info: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items()
            if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class JsonlSink:
    """One JSON object per line, flushed each line so a killed run keeps everything logged so far."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()

    def write_run_info(self, info: dict[str, Any]) -> None:
        self.write(info)

    def close(self) -> None:
        self._file.close()


_CONSOLE_KEYS = (("iteration", "{}"), ("lm_loss", "{:.4f}"), ("valid_loss", "{:.4f}"), ("valid_ppl", "{:.2f}"),
                 ("test_loss", "{:.4f}"), ("moe_aux_loss", "{:.4f}"), ("lr", "{:.3e}"), ("grad_norm", "{:.3f}"),
                 ("tokens_per_sec", "{:.0f}"), ("tflops", "{:.4f}"), ("mfu", "{:.1%}"))


class ConsoleSink:
    def __init__(self, stream: TextIO = sys.stdout):
        self._stream = stream

    def write(self, record: dict[str, Any]) -> None:
        parts = [f"{key} {fmt.format(record[key])}" for key, fmt in _CONSOLE_KEYS
                 if key in record and record[key] is not None]
        if len(parts) > 1 or "iteration" not in record:  # per-parameter records: files and dashboards only
            print(" | ".join(parts), file=self._stream, flush=True)

    def write_run_info(self, info: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # imported only when asked for: slow import
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("iteration", 0)
        for key, value in _scalars(record).items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def write_run_info(self, info: dict[str, Any]) -> None:
        step = info.get("iteration", 0)
        for key, value in info.items():
            if key != "iteration":
                self._writer.add_text(key, str(value), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbStartError(RuntimeError):
    pass


class WandbSink:
    """One wandb run; gpt-neox's wandb.init arguments (project, group, name, entity) plus the server URL."""

    def __init__(self, project: str, run_name: str | None, config: dict[str, Any], group: str | None = None,
                 entity: str | None = None, host: str | None = None):
        try:
            import wandb
        except ImportError as err:
            raise SinkError("wandb is requested (use_wandb) but the wandb package is not installed: "
                               "`pip install wandb`, or set use_wandb: false") from err
        settings = wandb.Settings(base_url=host) if host else None
        try:
            self.run = wandb.init(project=project, name=run_name, group=group, entity=entity, config=config,
                                  save_code=False, settings=settings)
        except wandb.errors.Error as err:
            raise WandbStartError(f"wandb could not start a run ({type(err).__name__}: {err})") from err

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=record.get("iteration"))

    def write_run_info(self, info: dict[str, Any]) -> None:
        self.run.config.update({k: v for k, v in info.items() if k != "iteration"}, allow_val_change=True)

    def close(self) -> None:
        self.run.finish()


class CometSink:
    """A Comet experiment set up as gpt-neox does (comet_ml.start, config as parameters, then name, tags, others).
    Comet's own settings decide online or offline (COMET_START_ONLINE, COMET_OFFLINE_DIRECTORY) and the API key."""

    def __init__(self, workspace: str | None, project: str | None, name: str | None, tags: list[str] | None,
                 others: dict[str, Any] | None, config: dict[str, Any]):
        try:
            import comet_ml
        except ImportError as err:
            raise SinkError("use_comet is true but the comet_ml package is not installed: `pip install comet_ml` "
                               "(or `pip install .[comet]`), or set use_comet: false") from err
        try:
            # Console capture off, as gpt-neox sets it (the rank log already tees the output), and no end-of-run
            # summary (hundreds of lines: every config key) in the rank log.
            settings = comet_ml.ExperimentConfig(auto_output_logging=False, display_summary_level=0)
            self.experiment = comet_ml.start(workspace=workspace, project_name=project, experiment_config=settings)
        except Exception as err:
            raise SinkError(f"Comet could not start an experiment ({type(err).__name__}: {err}). Set COMET_API_KEY "
                               "(or run `comet login`), or COMET_START_ONLINE=false to write an offline archive, or "
                               "use_comet: false") from err
        self.experiment.log_parameters(config)
        if name:
            self.experiment.set_name(name)
        if tags:
            self.experiment.add_tags(list(tags))
        if others:
            self.experiment.log_others(others)

    def write(self, record: dict[str, Any]) -> None:
        self.experiment.log_metrics(_scalars(record), step=record.get("iteration"))

    def write_run_info(self, info: dict[str, Any]) -> None:
        self.experiment.log_others({k: v for k, v in info.items() if k != "iteration"})

    def close(self) -> None:
        self.experiment.end()


class MetricsSinks:
    """record_metrics False: a non-zero rank's wandb run (wandb_init_all_ranks), kept open for its system metrics."""

    def __init__(self, sinks: list[Sink], record_metrics: bool = True):
        self._sinks = sinks
        self._record = record_metrics

    def write(self, record: dict[str, Any]) -> None:
        if self._record:
            for sink in self._sinks:
                sink.write(record)

    def write_run_info(self, info: dict[str, Any]) -> None:
        if self._record:
            for sink in self._sinks:
                sink.write_run_info(info)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()


def build_sinks(log_dir: str | Path | None, tensorboard_dir: str | Path | None = None,
                wandb_project: str | None = None, run_name: str | None = None,
                run_config: dict[str, Any] | None = None, console: bool = True,
                extra: list[Sink] | None = None) -> MetricsSinks:
    sinks: list[Sink] = []
    if console:
        sinks.append(ConsoleSink())
    if log_dir:
        sinks.append(JsonlSink(Path(log_dir) / "metrics.jsonl"))
    if tensorboard_dir:
        sinks.append(TensorBoardSink(Path(tensorboard_dir)))
    if wandb_project:
        sinks.append(WandbSink(wandb_project, run_name, run_config or {}))
    return MetricsSinks(sinks + list(extra or []))


def _wandb_importable() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def sinks_for_run(log: LogConfig, rank: int, run_name: str, run_config: dict[str, Any], iteration: int,
                  wandb_group: str | None = None) -> MetricsSinks | None:
    """This rank's sinks: all of them on rank 0 (which also records the run's git hash once, at `iteration`), a
    wandb run alone elsewhere with wandb_init_all_ranks, else None. wandb_group: the group every rank's run joins
    when wandb_group is unset (shared_wandb_group generates it)."""
    wandb_project = log.active_wandb_project()
    if log.use_wandb is None and wandb_project and not _wandb_importable():
        wandb_project = None  # gpt-neox's default-on applies only where wandb is installed
    if log.use_wandb and not wandb_project and rank == 0:
        print("use_wandb is true but no wandb credentials were found (WANDB_API_KEY, `wandb login` for "
              f"{log.wandb_host}, WANDB_LOCAL, or WANDB_MODE=offline): continuing without wandb, as gpt-neox does",
              flush=True)
    git_hash = log.git_hash or neox_git_hash()
    run_config = {**run_config, "git_hash": git_hash}
    wandb_sink = None
    if wandb_project and (rank == 0 or log.wandb_init_all_ranks):
        name = log.wandb_run_name or run_name
        try:
            wandb_sink = WandbSink(wandb_project, name if rank == 0 else f"{name}-rank{rank}",
                                   {**run_config, "rank": rank}, group=wandb_group or log.wandb_group,
                                   entity=log.wandb_team,
                                   host=log.wandb_host)
        except WandbStartError as err:  # gpt-neox too trains on when wandb refuses (e.g. not logged in)
            print(f"rank {rank}: {err}; continuing without wandb", flush=True)
    if rank != 0:
        return MetricsSinks([wandb_sink], record_metrics=False) if wandb_sink is not None else None
    extra: list[Sink] = [wandb_sink] if wandb_sink is not None else []
    if log.use_comet:
        extra.append(CometSink(log.comet_workspace, log.comet_project, log.comet_experiment_name, log.comet_tags,
                               log.comet_others, run_config))
    sinks = build_sinks(log.log_dir, log.tensorboard_dir, run_config=run_config, extra=extra)
    if git_hash:
        sinks.write_run_info({"iteration": iteration, "git_hash": git_hash})
    return sinks


def shared_wandb_group(log: LogConfig) -> str | None:
    """Collective when wandb_init_all_ranks is on and wandb_group unset: one group for all ranks' runs, generated per
    launch on rank 0 and broadcast (gpt-neox generates one too)."""
    if log.use_wandb is False or not log.wandb_init_all_ranks or log.wandb_group is not None:
        return log.wandb_group
    import secrets

    import torch

    group = [f"neox_{secrets.token_hex(4)}"]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(group, src=0)
    return group[0]


def flat_run_config(groups: dict[str, Any]) -> dict[str, Any]:
    """Every config key with its value, flat as users write them (the groups are only our filing)."""
    import dataclasses

    return {key: value for group in groups.values() for key, value in dataclasses.asdict(group).items()}


def neox_git_hash() -> str | None:
    """`git describe --always` of this neox checkout (gpt-neox records its own the same way); None outside git."""
    try:
        out = subprocess.run(["git", "describe", "--always"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None
