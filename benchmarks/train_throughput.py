"""Benchmark: training throughput of our stack vs Hugging Face GPTNeoXForCausalLM + plain torch AdamW, and MFU.

One process, one rank, fp32 on the CPU, torch's default thread count. Both sides train the same Pythia-70M-shaped
model (6 layers, hidden 512, 8 heads, rotary on 1/4 of each head, parallel residual, untied head, vocab 50304,
70.4M parameters) on the same random tokens, micro-batch 4 x seq 512, gradient clipping 1.0, AdamW (wd 0.1):
  - ours: GPTNeoX in neox.train.engine.TrainEngine, the DeepSpeed engine (ZeRO 0, the DeepSpeed config built from
    our config) and optimizer step that neox/train/run.py trains with;
  - HF: transformers' GPTNeoXForCausalLM built from a config (random init, SDPA attention), loss from its
    `labels`, loss.backward(), clip_grad_norm_, torch AdamW step, zero_grad;
  - a fp32 matmul probe (neox.train.flops.measure_peak_flops) before and after, the MFU denominator.
Steps of the two sides are interleaved in rounds so a shared machine's load drifts onto both alike; tokens/s come
from the fastest step of each side (the median is reported too). When ours is slower, one step of each is
profiled (torch.profiler) and the top ops are reported. JSON goes to --output (default stdout).

    python benchmarks/train_throughput.py --output benchmarks/results/train_throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

VOCAB = 50304
SHAPE = {"num_layers": 6, "hidden_size": 512, "num_attention_heads": 8, "seq_length": 512, "micro_batch": 4}
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 6.0e-4, (0.9, 0.95), 1.0e-8, 0.1, 1.0
RATIO_TARGET = 1.0
MFU_TARGET = 0.60

Step = Callable[[dict[str, torch.Tensor]], float]


def our_config(tmp_dir: Path):
    from neox.config import load_config

    values = {
        "num_layers": SHAPE["num_layers"], "hidden_size": SHAPE["hidden_size"],
        "num_attention_heads": SHAPE["num_attention_heads"], "seq_length": SHAPE["seq_length"],
        "max_position_embeddings": SHAPE["seq_length"], "pos_emb": "rotary", "rotary_pct": 0.25,
        "gpt_j_residual": True, "no_weight_tying": True, "activation": "gelu", "norm": "layernorm",
        "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "optimizer": {"type": "Adam", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS}},
        "weight_decay": WEIGHT_DECAY, "gradient_clipping": CLIP, "lr_decay_style": "constant",
        "train_micro_batch_size_per_gpu": SHAPE["micro_batch"], "gradient_accumulation_steps": 1,
        "num_gpus": 1, "train_iters": 1000, "zero_optimization": {"stage": 0}, "precision": "fp32",
    }
    path = tmp_dir / "bench_70m.yml"
    path.write_text(yaml.safe_dump(values))
    return load_config([path], vocab_size=VOCAB)


def build_ours(tmp_dir: Path) -> tuple[Step, torch.nn.Module, object]:
    from neox.model import GPTNeoX
    from neox.parallel.runtime import all_reduce_mean, init_runtime
    from neox.train.engine import TrainEngine

    cfg = our_config(tmp_dir)
    runtime = init_runtime("gloo")  # a world of one
    torch.manual_seed(0)
    model = GPTNeoX(cfg.model)
    train_engine = TrainEngine(cfg, model, runtime.device)  # what neox/train/run.py trains
    train_engine.engine.train()

    def step(batch: dict[str, torch.Tensor]) -> float:
        # Trainer.train_step: one engine step over the micro-batches, then the loss averaged over ranks.
        loss, _ = train_engine.step(iter([batch]), grad_accum=1, lr=LR)
        return float(all_reduce_mean(loss))

    return step, model, cfg


def build_hf() -> tuple[Step, torch.nn.Module]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=SHAPE["hidden_size"], num_hidden_layers=SHAPE["num_layers"],
        num_attention_heads=SHAPE["num_attention_heads"], intermediate_size=4 * SHAPE["hidden_size"],
        max_position_embeddings=SHAPE["seq_length"], rotary_pct=0.25, use_parallel_residual=True,
        hidden_act="gelu", tie_word_embeddings=False, attention_dropout=0.0, hidden_dropout=0.0)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS)

    def step(batch: dict[str, torch.Tensor]) -> float:
        loss = model(input_ids=batch["tokens"], labels=batch["tokens"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, model


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


def random_batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    b, s = SHAPE["micro_batch"], SHAPE["seq_length"]
    batches = []
    for _ in range(count):
        text = torch.randint(0, VOCAB, (b, s + 1), generator=gen)
        batches.append({"tokens": text[:, :-1].contiguous(), "labels": text[:, 1:].contiguous(),
                        "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, s)})
    return batches


def timed(step: Step, batch: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, loss) of one step."""
    wall, cpu = time.perf_counter(), time.process_time()
    loss = step(batch)
    return time.perf_counter() - wall, time.process_time() - cpu, loss


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
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side per round (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (default 1)")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                        help="profile one step of each side: auto = only when ours is slower than HF")
    parser.add_argument("--heap-malloc", action="store_true",
                        help="glibc keeps freed memory in its heap (see keep_freed_memory_in_heap), for both sides")
    args = parser.parse_args(argv)
    heap_malloc = keep_freed_memory_in_heap() if args.heap_malloc else False

    from neox.train.flops import matmul_params, measure_peak_flops, train_flops_per_token

    threads = torch.get_num_threads()
    peak_before = measure_peak_flops(torch.float32, seconds=2.0)
    with tempfile.TemporaryDirectory() as tmp:
        ours_step, ours_model, cfg = build_ours(Path(tmp))
    hf_step, hf_model = build_hf()
    params = sum(p.numel() for p in ours_model.parameters())
    hf_params = sum(p.numel() for p in hf_model.parameters())
    if params != hf_params:
        raise RuntimeError(f"the two models differ in size: ours {params} vs HF {hf_params} parameters")
    flops_per_token = train_flops_per_token(
        matmul_params(params, VOCAB, SHAPE["hidden_size"], tied_head=False),
        SHAPE["num_layers"], SHAPE["hidden_size"], SHAPE["seq_length"])

    batches = random_batches(4)
    sides = {"ours": ours_step, "hf": hf_step}
    times: dict[str, list[float]] = {name: [] for name in sides}
    cpu_times: dict[str, list[float]] = {name: [] for name in sides}
    losses: dict[str, list[float]] = {name: [] for name in sides}
    for name, step in sides.items():
        for i in range(args.warmup):
            step(batches[i % len(batches)])
    for r in range(args.rounds):
        for name, step in sides.items():
            for i in range(args.steps):
                seconds, cpu_seconds, loss = timed(step, batches[(r * args.steps + i) % len(batches)])
                times[name].append(seconds)
                cpu_times[name].append(cpu_seconds)
                losses[name].append(loss)
            print(f"round {r + 1}/{args.rounds} {name}: {statistics.median(times[name][-args.steps:]):.2f} s/step",
                  file=sys.stderr, flush=True)
    peak_after = measure_peak_flops(torch.float32, seconds=2.0)
    peak = max(peak_before, peak_after)

    tokens_per_step = SHAPE["micro_batch"] * SHAPE["seq_length"]
    result: dict = {
        "benchmark": "train_throughput",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": threads,
                    "torch": torch.__version__, "load_avg_1m": os.getloadavg()[0],
                    "malloc": "glibc heap only (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2GiB)" if heap_malloc
                    else "default"},
        "model": {**SHAPE, "vocab": VOCAB, "parameters": params, "flops_per_token": flops_per_token,
                  "precision": "fp32"},
        "method": {"rounds": args.rounds, "steps_per_round": args.steps, "warmup": args.warmup,
                   "statistic": "fastest step (least disturbed by other load on a shared machine); median and "
                                "process CPU time per step are reported too"},
        "peak_fp32_flops": {"before": peak_before, "after": peak_after, "used": peak},
    }
    for name in sides:
        fastest = min(times[name])
        tps = tokens_per_step / fastest
        result[name] = {"step_times_s": [round(t, 4) for t in times[name]],
                        "step_cpu_times_s": [round(t, 4) for t in cpu_times[name]],
                        "fastest_step_s": fastest, "median_step_s": statistics.median(times[name]),
                        "tokens_per_sec": tps,
                        "tokens_per_sec_median": tokens_per_step / statistics.median(times[name]),
                        "achieved_flops": tps * flops_per_token, "mfu": tps * flops_per_token / peak,
                        "losses": losses[name]}
    ratio = result["ours"]["tokens_per_sec"] / result["hf"]["tokens_per_sec"]
    cpu_ratio = min(cpu_times["hf"]) / min(cpu_times["ours"])
    result["ours_vs_hf"] = {"ratio": ratio, "ratio_by_cpu_time": cpu_ratio, "target": RATIO_TARGET,
                            "met": ratio >= RATIO_TARGET}
    result["mfu_target"] = {"ours": result["ours"]["mfu"], "target": MFU_TARGET,
                            "met": result["ours"]["mfu"] >= MFU_TARGET}
    if args.profile == "always" or (args.profile == "auto" and ratio < RATIO_TARGET):
        result["profile_top_ops"] = {name: profile_step(step, batches[0]) for name, step in sides.items()}

    text = json.dumps(result, indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = args.output.with_name(f".{args.output.name}.tmp-{os.getpid()}")
        tmp_out.write_text(text)
        os.replace(tmp_out, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
