"""One stage split for every pipelined run: on 2 real gloo ranks at pp 2, the layers eval's ShardedRunner and
generate's ParallelDecoder hold are those DeepSpeed's PipelineModule (training) gives the same rank, for each
pipe_partition_method, and the sharded forward still gives the single-device logits."""
from __future__ import annotations

from neox.parallel.testing import run_distributed
from tests.distributed import stage_checks

CASES = [
    # 'uniform' counts all 9 layers (embedding, 6 blocks, norm, head): stage 0 takes 5 of them, 4 blocks, where an
    # even split of the blocks alone would give each stage 3.
    ("uniform", {"num_layers": 6}),
    ("parameters", {"num_layers": 5, "no_weight_tying": True, "pos_emb": "learned"}),
    ("type:transformer|mlp", {"num_layers": 5}),
]


def test_eval_and_generate_hold_the_stages_deepspeed_gives_training():
    results = run_distributed(stage_checks.stage_splits, 2, CASES)
    for rank, per_case in enumerate(results):
        for (method, _), got in zip(CASES, per_case):
            assert got["eval"] == got["generate"] == got["deepspeed"], (rank, method, got)
            assert got["eval_error"] < 1e-5, (rank, method)
            if got["generate_error"] is not None:  # the last stage
                assert got["generate_error"] < 1e-5, (rank, method)
    uniform = [per_case[0] for per_case in results]
    assert uniform[0]["parts"] == [0, 5, 9]
    assert [r["blocks"] for r in uniform] == [[0, 1, 2, 3], [4, 5]]
    assert [r["generate_error"] is None for r in results[0] + results[1]].count(False) == len(CASES)
