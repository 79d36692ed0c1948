"""Benchmark: start-up to the first training step of the 70M model at dp1, tp2 and pp2, and the model build in it.

Two CPU ranks on gloo (one for dp1), fp32, ZeRO 0, configs/70M.yml's shape (6 layers, hidden 512, untied head,
vocab 50304: the GPT-NeoX-20B tokenizer padded as Pythia pads it), measured in one run:
  1. end to end, `deepy train configs/70M.yml configs/cpu.yml` as a user starts it, one iteration, no evaluation,
     no checkpoint, `peak_flops` given (no 0.5 s matmul probe): seconds from the launch to the first step's metrics
     record, and that minus the step itself (the start-up proper: imports, process group, tokenizer, data, model,
     DeepSpeed engine);
  2. the model build a rank does, alone, each in a fresh process (seconds, and the peak host memory it adds):
       - single-device: GPTNeoX(cfg), what a dp1 rank builds;
       - tp2 rank 0 and each pp2 stage: the meta-device build, tensor parallelism and materialize() of this
         rank's shards (a stage: of its own layers only), the layout-free tiled draws of neox/model/init.py;
       - previous: the same ranks with the code this replaced (commit 0def898's neox/parallel/materialize.py and
         neox/model/init.py, loaded from git): every rank replayed the whole model's draws (the modules'
         reset_parameters and init_weights, one module at a time) and kept its slice.
Rounds interleave the measurements (reversed order in odd rounds) so a shared machine's load falls on all alike;
every figure is the median with its spread (quartiles, min, max). --config measures another model's shape,
--build-only skips part 1, --quick runs 2 rounds (to check that the benchmark works, or on a loaded machine). Without
git history (a shallow clone) the previous code is reported as not measured. JSON goes to --output.

    python benchmarks/startup.py --output benchmarks/results/startup.json [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from types import SimpleNamespace

from neox.parallel.testing import free_port
from spread import summary, write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
DEEPY = REPO_ROOT / "launcher" / "deepy.py"
CORPUS = REPO_ROOT / "data" / "corpora" / "kjv.jsonl.zst"
TOKENIZER = REPO_ROOT / "data" / "tokenizers" / "neox-20b" / "tokenizer.json"
PREVIOUS = "0def898"  # the last commit whose ranks replayed the whole model's initialisation
PADDED_VOCAB = 50304
# name -> (ranks, overrides): the layouts of the issue, ZeRO 0 (pipeline parallelism takes ZeRO 0 or 1).
LAYOUTS = {
    "dp1": (1, {}),
    "tp2": (2, {"model_parallel_size": 2}),
    "pp2": (2, {"pipe_parallel_size": 2}),
}
# name -> (tp size, pp stages, rank's tp rank, rank's stage, code)
BUILDS = {
    "single-device": (1, 1, 0, 0, "current"),
    "tp2 rank 0": (2, 1, 0, 0, "current"),
    "pp2 stage 0": (1, 2, 0, 0, "current"),
    "pp2 stage 1": (1, 2, 0, 1, "current"),
    "previous tp2 rank 0": (2, 1, 0, 0, "previous"),
    "previous pp2 stage 0": (1, 2, 0, 0, "previous"),
}


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


# --------------------------------------------------------------------------------------------- 1. end to end

def prepare_data(work: Path) -> Path:
    prefix = work / "kjv"
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "preprocess_data.py"), "--input", str(CORPUS),
                    "--output-prefix", str(prefix), "--tokenizer-type", "HFTokenizer", "--vocab-file", str(TOKENIZER),
                    "--append-eod"], cwd=REPO_ROOT, check=True, capture_output=True, env=_clean_env())
    return Path(f"{prefix}_text_document")


def start_to_first_step(work: Path, config: Path, data: Path, layout: str, timeout_s: float = 600) -> dict:
    """One `deepy train` launch: seconds to the first step's metrics record, and that step's own time."""
    ranks, overrides = LAYOUTS[layout]
    run_dir = Path(tempfile.mkdtemp(prefix=f"{layout}-", dir=work))
    values = {"num_gpus": ranks, "zero_optimization.stage": 0, "train_iters": 1, "eval_iters": 0, "log_interval": 1,
              "data_path": str(data), "vocab_file": str(TOKENIZER), "padded_vocab_size": PADDED_VOCAB,
              "peak_flops": 1.0e11, "master_port": free_port(), "log_dir": str(run_dir / "logs"), **overrides}
    argv = [sys.executable, str(DEEPY), "train", str(config), str(REPO_ROOT / "configs" / "cpu.yml")]
    for key, value in values.items():
        argv += [f"--{key}", str(value)]
    metrics = run_dir / "logs" / "metrics.jsonl"
    start = time.perf_counter()
    with open(run_dir / "output.txt", "w") as out:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=_clean_env())
        first = None
        while first is None and time.perf_counter() - start < timeout_s:
            if metrics.is_file():
                records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
                first = next((r for r in records if r.get("iteration") == 1 and "lm_loss" in r), None)
            if first is None:
                if proc.poll() is not None:
                    break
                time.sleep(0.05)
        seen = time.perf_counter() - start
        code = proc.wait(timeout=timeout_s)
    if first is None or code != 0:
        tail = (run_dir / "output.txt").read_text()[-3000:]
        raise RuntimeError(f"{layout}: deepy train exited {code} without a first step record:\n{tail}")
    return {"to_first_step_s": seen, "first_step_s": first["step_time_s"],
            "startup_s": seen - first["step_time_s"], "total_s": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------- 2. model build

def _rank_topology(tp_rank: int, tp_size: int, stage: int, stages: int):
    """A rank's place in the grid without a process group: building and materialising communicate nothing."""
    from neox.parallel.topology import Topology

    grid = SimpleNamespace(get_slice_parallel_rank=lambda: tp_rank, get_slice_parallel_group=lambda: None,
                           get_stage_id=lambda: stage)
    return Topology(tp_size=tp_size, pp_size=stages, dp_size=1, use_pipeline=stages > 1, ds_topology=None, grid=grid)


def previous_materialize():
    """Commit PREVIOUS's materialize module, wired to that commit's init_weights (both loaded from git)."""
    def source(path: str) -> str:
        return subprocess.run(["git", "show", f"{PREVIOUS}:{path}"], cwd=REPO_ROOT, check=True, capture_output=True,
                              text=True).stdout

    old_init = types.ModuleType("previous_init")
    exec(compile(source("neox/model/init.py"), f"{PREVIOUS}:neox/model/init.py", "exec"), old_init.__dict__)
    text = source("neox/parallel/materialize.py").replace("from neox.model.init import init_weights\n", "")
    old = types.ModuleType("previous_materialize")
    old.__dict__["init_weights"] = old_init.init_weights
    exec(compile(text, f"{PREVIOUS}:neox/parallel/materialize.py", "exec"), old.__dict__)
    return old


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def build_once(config: str, vocab: int, build: str) -> dict:
    """In this (fresh) process: one rank's model build; seconds and the peak host memory it added."""
    import torch

    from neox.config import load_config
    from neox.model import GPTNeoX
    from neox.parallel.materialize import materialize, meta_model
    from neox.parallel.parallelize import apply_tensor_parallel
    from neox.parallel.pipeline import stage_parameters

    torch.set_num_threads(1)
    full = load_config([Path(config)], ["--padded_vocab_size", str(vocab)], local_gpus=0)
    cfg = full.model
    tp, stages, tp_rank, stage, code = BUILDS[build]
    topo = _rank_topology(tp_rank, tp, stage, stages)
    old = previous_materialize() if code == "previous" else None
    # What a rank has imported by then (DeepSpeed; torch's lazy imports on a first meta-device build): not timed.
    tiny = dataclasses.replace(cfg, num_layers=2, hidden_size=64, num_attention_heads=tp * 2, padded_vocab_size=64,
                               intermediate_size=None)
    stage_parameters(apply_tensor_parallel(meta_model(tiny), _rank_topology(0, tp, 0, 2)), _rank_topology(0, tp, 0, 2),
                     "uniform")
    torch.manual_seed(1234)
    before = _rss_bytes()
    start = time.perf_counter()
    if tp * stages == 1:
        model = GPTNeoX(cfg)
    elif old is not None:
        model = apply_tensor_parallel(old.meta_model(cfg), topo)
        old.materialize(model, topo)  # every layer: it did not know the stages
    else:
        model = apply_tensor_parallel(meta_model(cfg), topo)
        own = stage_parameters(model, topo, full.parallel.pipe_partition_method) if stages > 1 else None
        materialize(model, topo.tp_rank, topo.tp_size, own)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    real = sum(p.numel() for p in model.parameters() if not p.is_meta)
    return {"seconds": seconds, "peak_added_bytes": max(peak - before, 0), "real_params": real}


def run_build(config: Path, vocab: int, build: str) -> dict:
    code = ("import json, sys; sys.path.insert(0, %r); import startup; "
            "print('RESULT', json.dumps(startup.build_once(%r, %d, %r)))" % (str(Path(__file__).parent), str(config),
                                                                            vocab, build))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=_clean_env(), timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"build {build!r} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


# --------------------------------------------------------------------------------------------- rounds

def interleaved(names: list[str], rounds: int, measure) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else list(reversed(names))):
            results[name].append(measure(name))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return results


def summarised(samples: list[dict], keys: list[str]) -> dict:
    return {key: summary([s[key] for s in samples], digits=3) for key in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="write the JSON here (default: stdout)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="2 rounds: checks that the benchmark runs")
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "70M.yml",
                        help="the model's shape (default configs/70M.yml)")
    parser.add_argument("--build-only", action="store_true", help="part 2 only (the model build)")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    result: dict = {
        "benchmark": "start-up to the first step, and the model build",
        "config": str(args.config.relative_to(REPO_ROOT) if args.config.is_relative_to(REPO_ROOT) else args.config),
        "padded_vocab_size": PADDED_VOCAB, "rounds": rounds, "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_start": os.getloadavg()},
    }
    has_previous = subprocess.run(["git", "cat-file", "-e", f"{PREVIOUS}^{{commit}}"], cwd=REPO_ROOT,
                                  capture_output=True).returncode == 0
    names = [name for name, spec in BUILDS.items() if has_previous or spec[4] != "previous"]
    builds = interleaved(names, rounds, lambda name: run_build(args.config, PADDED_VOCAB, name))
    result["model_build"] = {name: {"real_params": samples[0]["real_params"],
                                    **summarised(samples, ["seconds", "peak_added_bytes"])}
                             for name, samples in builds.items()}
    for layout in ("tp2 rank 0", "pp2 stage 0"):
        now, before = result["model_build"][layout], result["model_build"].get(f"previous {layout}")
        now["speedup_vs_previous"] = (round(before["seconds"]["median"] / now["seconds"]["median"], 2) if before
                                      else f"not measured: commit {PREVIOUS} is not in this clone")
    if not args.build_only:
        with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
            work = Path(tmp)
            data = prepare_data(work)
            runs = interleaved(list(LAYOUTS), rounds, lambda name: start_to_first_step(work, args.config, data, name))
        result["start_to_first_step"] = {
            name: {"ranks": LAYOUTS[name][0], **summarised(samples, ["to_first_step_s", "startup_s", "first_step_s"])}
            for name, samples in runs.items()}
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    write_json(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
