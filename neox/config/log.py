"""Logging keys: console cadence, log/tensorboard directories, wandb and Comet, per-parameter diagnostics, the
gradient noise scale, profiling, MFU reference."""
from __future__ import annotations

import netrc
import os
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlparse

from neox.config.deepspeed_sections import check_sections
from neox.config.errors import ConfigError
from neox.config.fields import option

DEFAULT_WANDB_PROJECT = "neox"  # gpt-neox's default
DEFAULT_WANDB_HOST = "https://api.wandb.ai"


@dataclass
class LogConfig:
    log_interval: int = option(100, "Print and record training metrics every this many iterations.")
    log_dir: str | None = option(
        None, "Directory of the metrics log (jsonl); the resolved config goes to save, or here."
    )
    tensorboard_dir: str | None = option(None, "Write TensorBoard scalars here; None disables TensorBoard.")
    use_wandb: bool | None = option(
        None, "Weights & Biases, as gpt-neox decides it: false = off; unset or true = on (rank 0) when wandb imports "
              "and credentials are found (WANDB_API_KEY, WANDB_LOCAL, WANDB_MODE=offline, or a ~/.netrc entry for "
              "wandb_host from `wandb login`), else off (true says so in one line)."
    )
    wandb_project: str = option(DEFAULT_WANDB_PROJECT, "wandb project the run is logged to.")
    wandb_group: str | None = option(
        None, "wandb group gathering runs; unset with wandb_init_all_ranks: one generated group per launch."
    )
    wandb_team: str | None = option(None, "wandb team (entity) owning the project; unset: your default entity.")
    wandb_run_name: str | None = option(
        None, "wandb run name; unset: the name of the save (or log_dir) directory. Other ranks add -rank<N>."
    )
    wandb_host: str = option(
        DEFAULT_WANDB_HOST, "wandb server URL: where runs are sent and whose ~/.netrc entry counts as credentials."
    )
    wandb_init_all_ranks: bool = option(
        False, "Start a wandb run on every rank (same group; each records its process's system metrics); the "
               "training metrics still go to rank 0's run."
    )
    git_hash: str | None = option(
        None, "Informational: unset = this neox checkout's `git describe --always`, recorded with the run "
              "(first metrics.jsonl line, wandb config, Comet other)."
    )
    use_comet: bool | None = option(
        None, "Send metrics to Comet (comet_ml) from rank 0; unset = off. Comet's own settings apply (COMET_API_KEY; "
              "COMET_START_ONLINE=false + COMET_OFFLINE_DIRECTORY for an offline archive)."
    )
    comet_workspace: str | None = option(None, "Comet workspace; unset: your default workspace.")
    comet_project: str | None = option(None, "Comet project; unset: Comet's 'Uncategorized Experiments'.")
    comet_experiment_name: str | None = option(None, "Comet experiment name; unset: a random name.")
    comet_tags: list | None = option(None, "Tags (strings) attached to the Comet experiment.")
    comet_others: dict | None = option(None, "Extra metadata logged as the Comet experiment's 'others'.")
    comet_experiment: Any = option(
        None, "gpt-neox's run-time slot for the live Comet experiment object: only null is accepted (use_comet "
              "starts the experiment)."
    )
    log_grad_norm: bool = option(
        False, "Every step, log each parameter's gradient L2 norm (gradient_norms/<name>; before clipping, "
               "gathered over ZeRO partitions, tp shards and pipeline stages)."
    )
    log_param_norm: bool = option(
        False, "Every step, log each parameter's L2 norm after the update (parameter_norms/<name>, fp32 weights)."
    )
    log_grad_pct_zeros: bool = option(
        False, "Every step, log the percentage of exact zeros in each parameter's gradient (pct_grad_zeros/<name>)."
    )
    log_optimizer_states: bool = option(
        False, "Every step, log the L2 norm of each optimizer state of each parameter "
               "(optimizer_state_norms/<name>_exp_avg, ..._exp_avg_sq for Adam)."
    )
    log_gradient_noise_scale: bool = option(
        False, "Log the gradient noise scale B_simple (noise_scale; arXiv:1812.06162) estimated as gpt-neox does: "
               "B_small = train_batch_size, B_big = n_batches x that, EMA 0.99. Any ZeRO stage, tp and pp."
    )
    gradient_noise_scale_n_batches: int = option(
        5, "Steps whose gradients are averaged into the large-batch gradient of the noise scale (>= 2)."
    )
    gradient_noise_scale_cpu_offload: bool = option(
        False, "Keep the noise scale's gradient buffer in CPU memory instead of on the device."
    )
    memory_profiling: bool = option(
        False, "Memory profile of steps [profile_step_start, profile_step_stop). GPU: CUDA allocator history, "
               "snapshot mem_snapshot.pickle (rank 0; others .rank<N>) as gpt-neox. CPU (no allocator history): "
               "process RSS and torch CPU allocations per step, cpu_memory.rank<N>.json."
    )
    memory_profiling_path: str | None = option(
        None, "Directory of the memory snapshot / CPU memory record; unset: <log_dir or run dir>/memory."
    )
    profile: bool = option(
        False, "torch.profiler Chrome trace of steps [profile_step_start, profile_step_stop) (0-based, so logged "
               "iterations start+1..stop), CPU + CUDA activities, <log_dir or run dir>/profile/rank<N>.trace.json; "
               "on GPU also NVTX ranges and cudaProfilerStart/Stop for nsys."
    )
    profile_step_start: int = option(10, "First profiled step (0-based: the step after `start` finished steps).")
    profile_step_stop: int = option(12, "Profiling stops before this step (0-based, exclusive).")
    peak_flops: float | None = option(
        None, "Peak FLOP/s of one device, MFU's denominator. Unset: on a GPU its datasheet dense peak for 'precision' "
              "(neox/train/accelerators.py, found by torch.cuda.get_device_name); on the CPU, or a GPU that table "
              "does not list, a 0.5 s 1024x1024 matmul probe at start. metrics.jsonl records which (mfu_peak_source)."
    )
    steps_per_print: int = option(10, "DeepSpeed's own progress print interval (steps_per_print).")
    wall_clock_breakdown: bool = option(False, "DeepSpeed forward/backward/step timing breakdown.")
    dump_state: bool = option(False, "DeepSpeed prints its whole engine configuration after it starts (dump_state).")
    flops_profiler: dict | None = option(
        None, "DeepSpeed's flops profiler section, e.g. {enabled: true, profile_step: 1, module_depth: -1, "
              "top_modules: 1, detailed: true, output_file: null}: a per-module FLOPs/latency report of the step "
              "after profile_step finished steps (1: the second)."
    )
    comms_logger: dict | None = option(
        None, "DeepSpeed's communication logger section, e.g. {enabled: true, verbose: false, prof_all: true}: "
              "records every collective's size and latency."
    )
    csv_monitor: dict | None = option(
        None, "DeepSpeed's CSV monitor {enabled, output_path, job_name}: DeepSpeed writes its own per-step scalars "
              "(learning rate, loss scale; losses under pipeline parallelism) as CSV files there."
    )
    tensorboard: dict | None = option(
        None, "DeepSpeed's TensorBoard monitor {enabled, output_path, job_name} (DeepSpeed's own scalars; neox's "
              "metrics go to tensorboard_dir)."
    )
    wandb: dict | None = option(
        None, "DeepSpeed's wandb monitor {enabled, group, team, project} (DeepSpeed's own scalars; neox's metrics "
              "follow use_wandb)."
    )

    def active_wandb_project(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The wandb project metrics go to, or None when wandb is off (gpt-neox's rule, see use_wandb's help)."""
        if self.use_wandb is False:
            return None
        return self.wandb_project if wandb_credentials_found(self.wandb_host, environ) else None

    def per_step_diagnostics(self) -> bool:
        return self.log_grad_norm or self.log_param_norm or self.log_grad_pct_zeros or self.log_optimizer_states

    def validate(self) -> None:
        check_sections({key: getattr(self, key) for key in ("flops_profiler", "comms_logger", "csv_monitor",
                                                             "tensorboard", "wandb")})
        for key in ("log_interval", "steps_per_print"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"'peak_flops' must be positive, got {self.peak_flops}")
        if self.log_gradient_noise_scale and self.gradient_noise_scale_n_batches < 2:
            raise ConfigError(
                f"'gradient_noise_scale_n_batches' must be >= 2 with log_gradient_noise_scale (got "
                f"{self.gradient_noise_scale_n_batches}): the estimate compares one step's gradient with the mean "
                "of n_batches steps' gradients, which needs at least two")
        if self.profile or self.memory_profiling:
            if self.profile_step_start < 0 or self.profile_step_stop <= self.profile_step_start:
                raise ConfigError(
                    f"'profile_step_start' ({self.profile_step_start}) and 'profile_step_stop' "
                    f"({self.profile_step_stop}) must satisfy 0 <= start < stop: steps [start, stop) are profiled")
        if not urlparse(self.wandb_host).scheme in ("http", "https") or not urlparse(self.wandb_host).hostname:
            raise ConfigError(f"'wandb_host' must be an http(s) URL such as {DEFAULT_WANDB_HOST}, "
                              f"got {self.wandb_host!r}")
        if self.comet_experiment is not None:
            raise ConfigError("'comet_experiment' is where gpt-neox keeps the running Comet experiment object; a "
                              "config cannot set it: remove it and use use_comet with comet_workspace, comet_project, "
                              "comet_experiment_name, comet_tags, comet_others")
        if self.comet_tags is not None and not all(isinstance(t, str) for t in self.comet_tags):
            raise ConfigError(f"'comet_tags' must be a list of strings, got {self.comet_tags!r}")


def wandb_credentials_found(host: str, environ: Mapping[str, str] | None = None) -> bool:
    """gpt-neox's test (WANDB_LOCAL, WANDB_API_KEY, a netrc entry for the host), plus wandb's offline mode, which
    writes the run locally and needs no key."""
    env = os.environ if environ is None else environ
    if "WANDB_LOCAL" in env or env.get("WANDB_API_KEY"):
        return True
    if env.get("WANDB_MODE", "").lower() in ("offline", "dryrun"):
        return True
    hostname = urlparse(host).hostname
    path = env.get("NETRC") or os.path.join(env.get("HOME", os.path.expanduser("~")), ".netrc")
    try:
        return hostname is not None and netrc.netrc(path).authenticators(hostname) is not None
    except (OSError, netrc.NetrcParseError):
        return False
