"""Benchmark: how long training stalls for a checkpoint save, synchronous vs checkpoint_async, on the 70M model.

One CPU rank (ZeRO 0, fp32) trains configs/70M.yml's shape (6 layers, hidden 512, untied head, vocab 50304, 70.4M
parameters: a checkpoint is DeepSpeed's ~1.1 GB of weights + Adam state plus the ~0.85 GB layout-free shard) through
`deepy train` as a user starts it, saving every SAVE_INTERVAL steps, once with checkpoint_async false and once with
true, the two interleaved in rounds (reversed order in odd rounds) so a shared machine's load falls on both alike.
From the run's own records (metrics.jsonl: each step's step_time_s and elapsed_s since the loop began; rank 0's
output lines), for each save:
  - blocking_s: the time the loop spent outside training steps around the save (the gap between the saving step's
    record and the next one, less that next step's own time), minus the same gap for steps without a save (logging,
    the per-step flag all-reduce): what the save itself held training up for;
  - overlap_s (async): how much longer the steps that ran while the background write was going took than the
    median step without one (on a CPU the writer thread competes with training for cores and memory bandwidth);
  - stall_s = blocking_s + overlap_s: training time lost to the save;
  - durable_s: from the save's start until complete.json is written (the log line "durable ... after").
Every figure is the median over all saves of all rounds with its spread (quartiles, min, max). The full run needs a
quiet machine (on a loaded one the step times and the write times swing by more than the difference); --quick runs a
2-layer model for 1 round, to check that the benchmark works, not to measure. JSON goes to --output.

    python benchmarks/checkpoint_stall.py --output benchmarks/results/checkpoint_stall.json [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from neox.parallel.testing import free_port
from spread import summary, write_json
# The same launch and data as the start-up benchmark's.
from startup import DEEPY, PADDED_VOCAB, REPO_ROOT, TOKENIZER, _clean_env, prepare_data

SAVE_INTERVAL = 4
FULL = {"rounds": 2, "train_iters": 4 * SAVE_INTERVAL, "overrides": {"seq_length": 256}}
QUICK = {"rounds": 1, "train_iters": 3 * SAVE_INTERVAL,
         "overrides": {"num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "seq_length": 64}}
_DURABLE = re.compile(r"checkpoint global_step(\d+) durable ([0-9.]+) s after its save began")
_SAVED = re.compile(r"^saved checkpoint .*global_step(\d+)$")


def train_run(work: Path, data: Path, asynchronous: bool, spec: dict, timeout_s: float = 3600) -> dict:
    """One launch: each save's figures (see the module docstring) and the step times."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{'async' if asynchronous else 'sync'}-", dir=work))
    values = {"num_gpus": 1, "zero_optimization.stage": 0, "train_iters": spec["train_iters"],
              "save_interval": SAVE_INTERVAL, "keep_last_n_checkpoints": 1, "checkpoint_async": asynchronous,
              "eval_interval": 100000, "eval_iters": 0, "log_interval": 1, "data_path": str(data),
              "vocab_file": str(TOKENIZER), "padded_vocab_size": PADDED_VOCAB, "peak_flops": 1.0e11,
              "master_port": free_port(), "save": str(run_dir / "ckpt"), "log_dir": str(run_dir / "logs"),
              **spec["overrides"]}
    argv = [sys.executable, str(DEEPY), "train", str(REPO_ROOT / "configs" / "70M.yml"),
            str(REPO_ROOT / "configs" / "cpu.yml")]
    for key, value in values.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, env=_clean_env(), timeout=timeout_s)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"deepy train exited {done.returncode}:\n{output[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    shutil.rmtree(run_dir, ignore_errors=True)
    return save_figures(records, output, asynchronous)


def save_figures(records: list[dict], output: str, asynchronous: bool) -> dict:
    steps = {r["iteration"]: r for r in records if "lm_loss" in r}
    saves = sorted(int(m.group(1)) for line in output.splitlines() if (m := _SAVED.search(line)))
    durable = {int(m.group(1)): float(m.group(2)) for m in _DURABLE.finditer(output)}
    last = max(steps)

    def gap(i: int) -> float:  # time outside steps between record i and record i + 1
        return steps[i + 1]["elapsed_s"] - steps[i]["elapsed_s"] - steps[i + 1]["step_time_s"]

    quiet = [i for i in steps if i < last and i not in saves and i - 1 not in saves and i > 1]
    base_gap = statistics.median(gap(i) for i in quiet)
    base_step = statistics.median(steps[i]["step_time_s"] for i in quiet)
    per_save = []
    for it in saves:
        if it >= last:
            continue  # the final save: no step after it to time
        blocking = gap(it) - base_gap
        overlap = 0.0
        if asynchronous and it in durable:
            began = steps[it]["elapsed_s"]
            overlapped = [i for i in steps if i > it and steps[i]["elapsed_s"] - steps[i]["step_time_s"] < began + durable[it]]
            overlap = sum(max(steps[i]["step_time_s"] - base_step, 0.0) for i in overlapped)
        per_save.append({"iteration": it, "blocking_s": blocking, "overlap_s": overlap,
                         "stall_s": blocking + overlap, "durable_s": durable.get(it)})
    return {"saves": per_save, "step_s": base_step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="2-layer model, 1 round: checks the benchmark works")
    args = parser.parse_args(argv)
    spec = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="ckpt-stall-"))
    try:
        data = prepare_data(work)
        runs: dict[str, list[dict]] = {"sync": [], "async": []}
        for round_ in range(spec["rounds"]):
            order = ("sync", "async") if round_ % 2 == 0 else ("async", "sync")
            for mode in order:
                start = time.perf_counter()
                runs[mode].append(train_run(work, data, mode == "async", spec))
                print(f"round {round_ + 1}/{spec['rounds']} {mode}: {time.perf_counter() - start:.0f} s",
                      file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "checkpoint_stall",
        "model": "configs/70M.yml" + (" (quick: 2 layers, hidden 128)" if args.quick else ""),
        "overrides": spec["overrides"], "save_interval": SAVE_INTERVAL, "train_iters": spec["train_iters"],
        "rounds": spec["rounds"], "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
        "note": ("one CPU rank, fp32, ZeRO 0; figures need a quiet machine (the step and write times swing with the "
                 "load); --quick only checks that the benchmark works"),
    }
    for mode, per_run in runs.items():
        saves = [s for run in per_run for s in run["saves"]]
        entry = {"step_s": summary([run["step_s"] for run in per_run]), "saves": len(saves)}
        for key in ("blocking_s", "overlap_s", "stall_s"):
            entry[key] = summary([s[key] for s in saves])
        durable = [s["durable_s"] for s in saves if s["durable_s"] is not None]
        if durable:
            entry["durable_s"] = summary(durable)
        result[mode] = entry
    result["stall_ratio_async_to_sync"] = round(result["async"]["stall_s"]["median"] /
                                                max(result["sync"]["stall_s"]["median"], 1e-9), 4)
    write_json(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
