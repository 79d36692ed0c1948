"""Per-rank functions for tests/distributed/test_hf_parallel_logits.py (module level: spawned ranks import them)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def imported_logits(neox_dirs: list[str], tokens: torch.Tensor) -> dict:
    """Each imported model as `deepy eval` shards it for the launch its model.yml describes (eval's load_runner),
    and through generation's ParallelDecoder: full logits of every position, and of the last one."""
    import deepspeed

    from neox.checkpoint import load_model
    from neox.config.load import load_config
    from neox.eval.run import load_runner
    from neox.generate.parallel_model import ParallelDecoder
    from neox.parallel.runtime import Runtime
    from neox.parallel.topology import build_topology

    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's topology grid asks its own comm for ranks
    runtime = Runtime(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=dist.get_rank(),
                      device=torch.device("cpu"))
    out = {}
    for neox_dir in map(Path, neox_dirs):
        cfg = load_config([neox_dir / "model.yml"], ["--num_gpus", str(runtime.world_size),
                                                      "--train_micro_batch_size_per_gpu", "1"])
        runner, _, tokenizer, _ = load_runner(cfg, runtime)
        full = runner.logits(tokens)
        tp, pp = cfg.parallel.model_parallel_size, cfg.parallel.pipe_parallel_size
        decoder = ParallelDecoder(load_model(neox_dir)[0], build_topology(tp, pp),
                                  partition_method=cfg.parallel.pipe_partition_method)
        with torch.no_grad():
            last = decoder(tokens)
        out[neox_dir.name] = {
            "layout": (tp, pp, type(runner).__name__),
            "logits": full,
            "last": None if last is None else last[..., : tokenizer.vocab_size].float(),
        }
    return out
