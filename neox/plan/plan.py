"""A plan of a training run from its resolved config: per-rank memory, batch arithmetic, FLOPs and step time."""
from __future__ import annotations

import os
from dataclasses import dataclass

from neox.config.derive import detect_local_gpus
from neox.config.errors import ConfigError
from neox.config.neox_config import NeoXConfig
from neox.train.accelerators import Accelerator, find_accelerator, peak_for
from neox.plan.baseline import Baseline, gpu_baseline, measure_cpu_baseline
from neox.plan.experts import ExpertLayout, expert_layout
from neox.plan.memory import RankMemory, rank_memory
from neox.plan.params import ModelParams, model_params
from neox.plan.throughput import Throughput, throughput

DEFAULT_MFU = 0.40
MB = 1024 ** 2


@dataclass(frozen=True)
class PlanOptions:
    accelerator: str | None = None  # a name from neox/train/accelerators.py; None plans for this machine's CPU
    mfu: float = DEFAULT_MFU
    nodes: int | None = None  # hypothetical node count (the plan writes no hostfile to disk for the run)
    baseline_mb: float | None = None  # per-rank framework memory to use instead of measuring it

    def validate(self) -> None:
        if not 0.0 < self.mfu <= 1.0:
            raise ConfigError(f"--mfu is a fraction of the peak in (0, 1], got {self.mfu}")
        if self.nodes is not None and self.nodes < 1:
            raise ConfigError(f"--nodes must be >= 1, got {self.nodes}")
        if self.baseline_mb is not None and self.baseline_mb < 0:
            raise ConfigError(f"--baseline_mb must be >= 0, got {self.baseline_mb}")
        if self.accelerator is not None:
            find_accelerator(self.accelerator)


@dataclass(frozen=True)
class Peak:
    flops: float
    source: str


@dataclass(frozen=True)
class Plan:
    cfg: NeoXConfig
    params: ModelParams
    ranks: tuple[RankMemory, ...]  # one per pipeline stage (every tp/dp rank of a stage is alike)
    accelerator: Accelerator | None
    capacity_bytes: int  # device memory, or this machine's RAM per rank on it
    capacity_source: str
    baseline: Baseline
    peak: Peak
    throughput: Throughput
    experts: ExpertLayout | None = None  # a MoE model: experts per rank and the all-to-all volume per step

    @property
    def largest_stage_params(self) -> int:
        return max(stage.params for stage in self.params.stages)

    @property
    def largest(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.peak)


def build_plan(cfg: NeoXConfig, options: PlanOptions) -> Plan:
    options.validate()
    if cfg.model.padded_vocab_size is None:
        raise ConfigError("the plan needs the vocabulary size: point 'vocab_file' (and 'merge_file') at the "
                          "run's tokenizer, e.g. --vocab_file data/tokenizers/neox-20b/tokenizer.json, or set "
                          "'padded_vocab_size'")
    if cfg.train.train_micro_batch_size_per_gpu is None:
        raise ConfigError("the plan is of a training run and needs its batch: set 'train_micro_batch_size_per_gpu' "
                          "(or 'train_batch_size')")
    par, derived = cfg.parallel, cfg.derived
    tp, pp, dp = par.model_parallel_size, par.pipe_stages, derived.data_parallel_size
    params = model_params(cfg.model, tp, pp if par.pipe_parallel_size >= 1 else 1, par.pipe_partition_method,
                          par.moe_expert_parallel_size)
    accelerator = find_accelerator(options.accelerator) if options.accelerator else None
    if accelerator is not None:
        baseline = gpu_baseline()
        capacity, capacity_source = accelerator.memory_bytes, f"{accelerator.name} device memory"
    else:
        check_cpu_plan(cfg)
        if options.baseline_mb is not None:
            baseline = Baseline(int(options.baseline_mb * MB), "given by --baseline_mb")
        else:
            baseline = measure_cpu_baseline(cfg)
        ranks_here = max(1, derived.world_size // max(derived.node_count, 1))
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        capacity, capacity_source = ram // ranks_here, f"this machine's RAM / {ranks_here} rank(s) per node"
    ranks = tuple(rank_memory(cfg, stage, tp, len(params.stages), dp, on_gpu=accelerator is not None,
                              framework_bytes=baseline.bytes, total_params=params.total) for stage in params.stages)
    peak = choose_peak(cfg, accelerator)
    return Plan(cfg, params, ranks, accelerator, capacity, capacity_source, baseline, peak,
                throughput(cfg, params.total, peak.flops, options.mfu), expert_layout(cfg, params.stages))


def check_cpu_plan(cfg: NeoXConfig) -> None:
    """A plan without --accelerator is for this machine's CPU ranks; say so when the run cannot be one."""
    if cfg.optim.precision == "fp16":
        raise ConfigError("'precision' fp16 runs on GPUs only (DeepSpeed's fp16 optimizer needs CUDA): name the GPU "
                          "the run is for with --accelerator (e.g. --accelerator A100-40GB), or plan a CPU run with "
                          "--precision bfloat16 or fp32")
    if detect_local_gpus() > 0:
        raise ConfigError("this machine has GPUs, which the ranks will use: name them with --accelerator "
                          "(A100-40GB, A100-80GB, H100-SXM, H100-PCIe, V100-32GB) to plan their memory")


def choose_peak(cfg: NeoXConfig, accelerator: Accelerator | None) -> Peak:
    precision = cfg.optim.precision
    if accelerator is not None:
        return Peak(peak_for(accelerator, precision), f"{accelerator.name} {precision} ({accelerator.source})")
    if cfg.log.peak_flops is not None:
        return Peak(cfg.log.peak_flops, f"'peak_flops' from the config ({cfg.provenance.get('peak_flops', '?')})")
    return Peak(measured_cpu_peak(precision), f"measured here, {precision} 1024x1024 matmuls on one thread as a "
                                              "rank runs (neox/train/flops.py)")


def measured_cpu_peak(precision: str) -> float:
    import torch

    from neox.train.flops import measure_peak_flops

    dtype = {"bfloat16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # deepy gives every rank one thread
    try:
        return measure_peak_flops(dtype=dtype)
    finally:
        torch.set_num_threads(threads)
