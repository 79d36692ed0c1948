"""Benchmark: training throughput of our stack vs Hugging Face GPTNeoXForCausalLM with the same optimizer, and MFU.

One process, one rank, fp32 on the CPU, torch's default thread count. Both sides train the same Pythia-70M-shaped
model (6 layers, hidden 512, 8 heads, rotary on 1/4 of each head, parallel residual, untied head, vocab 50304,
70.4M parameters) on the same random tokens, micro-batch 4 x seq 512, gradient clipping 1.0, AdamW (wd 0.1 on
matrices only):
  - ours: GPTNeoX in neox.train.engine.TrainEngine, the DeepSpeed engine (ZeRO 0, the DeepSpeed config built from
    our config) and optimizer step that neox/train/run.py trains with;
  - HF: transformers' GPTNeoXForCausalLM built from a config (random init, SDPA attention), loss from its
    `labels`, loss.backward(), clip_grad_norm_, optimizer step, zero_grad. Its optimizer is a second instance of
    ours: the same class with the same settings, fused kernel included (torch's default AdamW would run the slower
    per-tensor loop and charge HF for an optimizer choice, not for its model code);
  - a fp32 matmul probe (neox.train.flops.measure_peak_flops) before and after the rounds, the MFU denominator
    (the higher of the two, labelled as measured).
Each step is timed whole and in two parts, forward + backward and the optimizer step (clipping, step, zero_grad;
ours: DeepSpeed's engine.step), so a difference shows where it comes from. The sides alternate in rounds (ours
first in even rounds, HF first in odd ones) so a shared machine's load drifts onto both alike; every figure is the
median over the timed steps with its spread (quartiles, min, max). When ours is slower, one step of each is
profiled (torch.profiler) and the top ops are reported. JSON goes to --output (default stdout); --quick runs a
small model for a few rounds, to check that the benchmark works, not to measure.

    python benchmarks/train_throughput.py --output benchmarks/results/train_throughput.json
"""
from __future__ import annotations

import argparse
import inspect
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from spread import summary, write_json

VOCAB = 50304
SHAPE = {"num_layers": 6, "hidden_size": 512, "num_attention_heads": 8, "seq_length": 512, "micro_batch": 4}
QUICK_SHAPE = {"num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "seq_length": 128, "micro_batch": 2}
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 6.0e-4, (0.9, 0.95), 1.0e-8, 0.1, 1.0
RATIO_TARGET = 1.0
MFU_TARGET = 0.60


@dataclass
class StepTime:
    total: float  # wall seconds of the whole step
    optimizer: float  # of which the optimizer step: clipping, step, zero_grad
    cpu: float  # process CPU seconds of the whole step
    loss: float


Step = Callable[[dict[str, torch.Tensor]], StepTime]


def our_config(tmp_dir: Path, shape: dict):
    from neox.config import load_config

    values = {
        "num_layers": shape["num_layers"], "hidden_size": shape["hidden_size"],
        "num_attention_heads": shape["num_attention_heads"], "seq_length": shape["seq_length"],
        "max_position_embeddings": shape["seq_length"], "pos_emb": "rotary", "rotary_pct": 0.25,
        "gpt_j_residual": True, "no_weight_tying": True, "activation": "gelu", "norm": "layernorm",
        "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "optimizer": {"type": "Adam", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS}},
        "weight_decay": WEIGHT_DECAY, "gradient_clipping": CLIP, "lr_decay_style": "constant",
        "train_micro_batch_size_per_gpu": shape["micro_batch"], "gradient_accumulation_steps": 1,
        "num_gpus": 1, "train_iters": 1000, "zero_optimization": {"stage": 0}, "precision": "fp32",
    }
    path = tmp_dir / "bench_70m.yml"
    path.write_text(yaml.safe_dump(values))
    return load_config([path], vocab_size=VOCAB)


def build_ours(tmp_dir: Path, shape: dict) -> tuple[Step, torch.nn.Module, torch.optim.Optimizer]:
    from neox.model import GPTNeoX
    from neox.parallel.runtime import init_runtime
    from neox.train.engine import TrainEngine

    cfg = our_config(tmp_dir, shape)
    runtime = init_runtime("gloo")  # a world of one
    torch.manual_seed(0)
    model = GPTNeoX(cfg.model)
    train_engine = TrainEngine(cfg, model, runtime.device)  # what neox/train/run.py trains
    return timed_train_step(train_engine, LR), model, train_engine.engine.optimizer


def timed_train_step(train_engine, lr: float) -> Step:
    """One training step of a TrainEngine on one micro-batch, timed whole and in its optimizer part."""
    from neox.parallel.runtime import all_reduce_mean

    engine = train_engine.engine
    engine.train()
    # DeepSpeed's engine.step (clipping, optimizer step, zero_grad) is the optimizer part of our step.
    engine_step, optimizer_seconds = engine.step, [0.0]

    def timed_engine_step(*args, **kwargs):
        start = time.perf_counter()
        result = engine_step(*args, **kwargs)
        optimizer_seconds[0] = time.perf_counter() - start
        return result

    engine.step = timed_engine_step

    def step(batch: dict[str, torch.Tensor]) -> StepTime:
        wall, cpu = time.perf_counter(), time.process_time()
        # Trainer.train_step: one engine step over the micro-batches, then the loss averaged over ranks.
        loss, _ = train_engine.step(iter([batch]), grad_accum=1, lr=lr)
        loss = float(all_reduce_mean(loss))
        return StepTime(time.perf_counter() - wall, optimizer_seconds[0], time.process_time() - cpu, loss)

    return step


def same_optimizer(ours: torch.optim.Optimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
    """A second instance of our optimizer (class and every setting, e.g. fused) over `model`, with our grouping:
    weight decay on matrices only."""
    accepted = inspect.signature(type(ours).__init__).parameters
    settings = {k: v for k, v in ours.defaults.items() if k in accepted and k != "weight_decay"}
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return type(ours)([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                      **settings)


def build_hf(shape: dict, ours_optimizer: torch.optim.Optimizer) -> tuple[Step, torch.nn.Module, torch.optim.Optimizer]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_attention_heads"], intermediate_size=4 * shape["hidden_size"],
        max_position_embeddings=shape["seq_length"], rotary_pct=0.25, use_parallel_residual=True,
        hidden_act="gelu", tie_word_embeddings=False, attention_dropout=0.0, hidden_dropout=0.0)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    model.train()
    optimizer = same_optimizer(ours_optimizer, model)

    def step(batch: dict[str, torch.Tensor]) -> StepTime:
        wall, cpu = time.perf_counter(), time.process_time()
        loss = model(input_ids=batch["tokens"], labels=batch["tokens"]).loss
        loss.backward()
        loss = float(loss.detach())
        optimizer_start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        return StepTime(end - wall, end - optimizer_start, time.process_time() - cpu, loss)

    return step, model, optimizer


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict:
    settings = {k: v for k, v in optimizer.defaults.items()
                if k != "weight_decay" and isinstance(v, (bool, int, float, str, tuple, type(None)))}
    return {"class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}", **settings,
            "weight_decay_by_group": [(g["weight_decay"], sum(p.numel() for p in g["params"]))
                                      for g in optimizer.param_groups]}


def keep_freed_memory_in_heap() -> bool:
    """Ask glibc to serve every allocation from its heap and keep freed memory there (mallopt M_MMAP_MAX = 0,
    M_TRIM_THRESHOLD = 2 GiB); False where there is no glibc.

    By default glibc maps each block above 32 MB (logits, their gradient, the head's weight gradient: 100-400 MB
    here) fresh from the OS and unmaps it on free, so every step page-faults and zero-fills them again: about
    130 ms of CPU per 412 MB tensor on this machine, 8-12 % of a step. Process-wide and irreversible, so it is an
    option of this benchmark (applied to both sides alike) and not something the model does behind a caller's back.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(name)
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def random_batches(count: int, shape: dict, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    b, s = shape["micro_batch"], shape["seq_length"]
    batches = []
    for _ in range(count):
        text = torch.randint(0, VOCAB, (b, s + 1), generator=gen)
        batches.append({"tokens": text[:, :-1].contiguous(), "labels": text[:, 1:].contiguous(),
                        "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, s)})
    return batches


def profile_step(step: Step, batch: dict[str, torch.Tensor], top: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
             "share": round(e.self_cpu_time_total / total, 4)} for e in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="write the JSON here (default: stdout)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side per round (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small model ({QUICK_SHAPE}), 2 rounds of 1 step: checks the benchmark runs")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                        help="profile one step of each side: auto = only when ours is slower than HF")
    parser.add_argument("--heap-malloc", action="store_true",
                        help="glibc keeps freed memory in its heap (see keep_freed_memory_in_heap), for both sides")
    args = parser.parse_args(argv)
    shape = QUICK_SHAPE if args.quick else SHAPE
    if args.quick:
        args.rounds, args.steps = 2, 1
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        parser.error("--rounds and --steps must be >= 1, --warmup >= 0")
    heap_malloc = keep_freed_memory_in_heap() if args.heap_malloc else False

    from neox.train.flops import matmul_params, measure_peak_flops, mfu_peak, train_flops_per_token

    threads = torch.get_num_threads()
    probes = [measure_peak_flops(torch.float32)]
    with tempfile.TemporaryDirectory() as tmp:
        ours_step, ours_model, ours_optimizer = build_ours(Path(tmp), shape)
    hf_step, hf_model, hf_optimizer = build_hf(shape, ours_optimizer)
    params = sum(p.numel() for p in ours_model.parameters())
    hf_params = sum(p.numel() for p in hf_model.parameters())
    if params != hf_params:
        raise RuntimeError(f"the two models differ in size: ours {params} vs HF {hf_params} parameters")
    flops_per_token = train_flops_per_token(
        matmul_params(params, VOCAB, shape["hidden_size"], tied_head=False),
        shape["num_layers"], shape["hidden_size"], shape["seq_length"])

    batches = random_batches(4, shape)
    sides = {"ours": ours_step, "hf": hf_step}
    timings: dict[str, list[StepTime]] = {name: [] for name in sides}
    for name, step in sides.items():
        for i in range(args.warmup):
            step(batches[i % len(batches)])
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # ABBA: drift in the load falls on both
        for name in order:
            for i in range(args.steps):
                timings[name].append(sides[name](batches[(r * args.steps + i) % len(batches)]))
            recent = summary([t.total for t in timings[name][-args.steps:]])["median"]
            print(f"round {r + 1}/{args.rounds} {name}: {recent:.3f} s/step", file=sys.stderr, flush=True)
    probes.append(measure_peak_flops(torch.float32))
    # The higher probe: the machine's rate when least disturbed, so MFU is not flattered by a busy probe.
    peak = mfu_peak(None, "fp32", None, lambda dtype: max(probes))

    tokens_per_step = shape["micro_batch"] * shape["seq_length"]
    result: dict = {
        "benchmark": "train_throughput",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": threads,
                    "torch": torch.__version__, "load_avg_1m": os.getloadavg()[0],
                    "malloc": "glibc heap only (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2GiB)" if heap_malloc
                    else "default"},
        "model": {**shape, "vocab": VOCAB, "parameters": params, "flops_per_token": flops_per_token,
                  "precision": "fp32"},
        "optimizer": {"ours": describe_optimizer(ours_optimizer), "hf": describe_optimizer(hf_optimizer)},
        "method": {"rounds": args.rounds, "steps_per_round": args.steps, "warmup": args.warmup, "quick": args.quick,
                   "order": "ours first in even rounds, HF first in odd rounds",
                   "statistic": "median over the timed steps, with quartiles, min and max; tokens/s, MFU and the "
                                "ratios from the medians"},
        "mfu_peak": {"flops": peak.flops, "source": f"{peak.source}, the higher of a probe before and after the "
                                                    "rounds", "probes": probes},
    }
    for name in sides:
        steps = timings[name]
        total = summary([t.total for t in steps])
        tps = tokens_per_step / total["median"]
        result[name] = {"step_s": total,
                        "forward_backward_s": summary([t.total - t.optimizer for t in steps]),
                        "optimizer_step_s": summary([t.optimizer for t in steps]),
                        "step_cpu_s": summary([t.cpu for t in steps]),
                        "tokens_per_sec": tps, "achieved_flops": tps * flops_per_token,
                        "mfu": tps * flops_per_token / peak.flops, "losses": [t.loss for t in steps]}
    ours, hf = result["ours"], result["hf"]
    ratio = ours["tokens_per_sec"] / hf["tokens_per_sec"]
    result["ours_vs_hf"] = {
        "ratio": ratio, "target": RATIO_TARGET, "met": None if args.quick else ratio >= RATIO_TARGET,
        "forward_backward_ratio": hf["forward_backward_s"]["median"] / ours["forward_backward_s"]["median"],
        "optimizer_step_ratio": hf["optimizer_step_s"]["median"] / ours["optimizer_step_s"]["median"],
        "ratio_by_cpu_time": hf["step_cpu_s"]["median"] / ours["step_cpu_s"]["median"],
        "reading": "each ratio is HF time / our time (tokens/s ours / HF): above 1 means ours is faster",
    }
    result["mfu_target"] = {"ours": ours["mfu"], "target": MFU_TARGET,
                            "met": None if args.quick else ours["mfu"] >= MFU_TARGET}
    if args.profile == "always" or (args.profile == "auto" and ratio < RATIO_TARGET):
        result["profile_top_ops"] = {name: profile_step(step, batches[0]) for name, step in sides.items()}
    write_json(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
