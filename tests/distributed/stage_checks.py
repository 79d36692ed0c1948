"""Per-rank functions for tests/distributed/test_stage_split.py (module level: spawned ranks import them)."""
from __future__ import annotations

import torch

from neox.config.model import ModelConfig
from neox.model import GPTNeoX, causal_lm_loss

BASE = dict(hidden_size=32, num_attention_heads=4, seq_length=32, pos_emb="rotary", padded_vocab_size=512,
            init_method_std=0.3, hidden_dropout=0.0, attention_dropout=0.0)


def _model(changes: dict) -> GPTNeoX:
    torch.manual_seed(0)
    return GPTNeoX(ModelConfig(**{**BASE, **changes})).eval()


def stage_splits(cases: list[tuple[str, dict]]) -> list[dict]:
    """For each (pipe_partition_method, model changes) at pp 2: the layers DeepSpeed's PipelineModule (what training
    builds) gives this rank's stage, the layers eval's and generate's stages hold, and how far their logits are from
    the single-device model's."""
    import deepspeed

    from neox.eval.parallel_runner import ShardedRunner
    from neox.generate.parallel_model import ParallelDecoder
    from neox.parallel.parallelize import apply_tensor_parallel
    from neox.parallel.pipeline import build_pipeline_module
    from neox.parallel.topology import build_topology

    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's topology grid asks its own comm for ranks
    topo = build_topology(1, 2)
    tokens = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(3))
    out = []
    for method, changes in cases:
        with torch.no_grad():
            reference = _model(changes)(tokens)
        training = apply_tensor_parallel(_model(changes), topo)
        parts = [int(b) for b in build_pipeline_module(training, topo, causal_lm_loss, method, False).partitions()]
        runner = ShardedRunner(_model(changes), topo, 512, partition_method=method)
        decoder = ParallelDecoder(_model(changes), topo, partition_method=method)
        with torch.no_grad():
            last = decoder(tokens)
        out.append({
            "deepspeed": (parts[topo.pp_rank], parts[topo.pp_rank + 1]), "parts": parts,
            "eval": (runner.stage.layers.start, runner.stage.layers.stop),
            "generate": (decoder.stage.layers.start, decoder.stage.layers.stop),
            "blocks": list(decoder.layers),
            "eval_error": float((runner.logits(tokens) - reference).abs().max()),
            "generate_error": None if last is None else float((last[:, -1] - reference[:, -1]).abs().max()),
        })
    return out
