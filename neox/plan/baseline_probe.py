"""Measure what a training rank costs before its model does: `python -m neox.plan.baseline_probe SPEC_JSON`.

Runs what a rank runs, at a size whose tensors are negligible: the imports of neox.train.run and DeepSpeed, a
process group of one (gloo), the config's tokenizer, a DeepSpeed engine over a one-layer model with hidden size 8
and the config's ZeRO stage and precision, two optimizer steps, and the matmul peak probe when the run will do it.
Prints one JSON line: {"peak_rss_bytes": VmHWM of this process}.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import yaml


def peak_rss_bytes() -> int:
    """VmHWM (the high-water mark of resident memory) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line: peak RSS cannot be measured on this system")


def probe_config(spec: dict) -> dict:
    """A trainable config of a one-layer, hidden-8 model with the planned run's engine settings."""
    return {
        "num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "seq_length": 8, "max_position_embeddings": 8,
        "pos_emb": "rotary", "padded_vocab_size": 128, "tokenizer_type": spec["tokenizer_type"],
        "vocab_file": spec["vocab_file"], "merge_file": spec["merge_file"],
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_iters": 2,
        "num_gpus": 1, "distributed_backend": "gloo", "precision": spec["precision"],
        "zero_optimization": {"stage": spec["zero_stage"]},
    }


def run_probe(spec: dict) -> int:
    import torch

    from neox.config import load_config
    from neox.model import GPTNeoX
    from neox.parallel.runtime import init_runtime
    from neox.tokenizer import build_tokenizer
    from neox.train import run  # noqa: F401  (the rank's imports, whatever they pull in)
    from neox.train.engine import TrainEngine
    from neox.train.flops import measure_peak_flops

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.yml"
        path.write_text(yaml.safe_dump(probe_config(spec)))
        cfg = load_config([path], local_gpus=0)
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
    runtime = init_runtime("gloo")
    if cfg.data.vocab_file is not None or cfg.data.tokenizer_type == "CharLevelTokenizer":
        build_tokenizer(cfg.data.tokenizer_type, cfg.data.vocab_file, cfg.data.merge_file)
    engine = TrainEngine(cfg, GPTNeoX(cfg.model), runtime.device)
    tokens = torch.randint(0, 128, (2, 9))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 8),
             "position_ids": torch.arange(8).expand(2, 8)}
    for _ in range(2):
        engine.step(iter([batch]), 1, 1.0e-3)
    if spec["measures_peak_flops"]:
        dtype = {"bfloat16": torch.bfloat16, "fp16": torch.float16}.get(spec["precision"], torch.float32)
        measure_peak_flops(dtype=dtype, seconds=0.05)
    torch.distributed.destroy_process_group()
    return peak_rss_bytes()


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    print(json.dumps({"peak_rss_bytes": run_probe(spec)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
