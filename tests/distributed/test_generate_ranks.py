"""Generation on real gloo ranks: every rank adopts the sampled tokens, and tp / pp layouts decode exactly what
one device decodes."""
from __future__ import annotations

import pytest

from neox.parallel.testing import run_distributed
from tests.distributed import generate_checks


def test_all_ranks_adopt_the_tokens_of_the_sampling_rank():
    results = run_distributed(generate_checks.sampled_with_and_without_sync, 2)
    assert results[0]["alone"] != results[1]["alone"]  # different seeds per rank: they would diverge
    for r in results:
        assert r["synced"] == results[0]["alone"]


LAYOUTS = {
    "tp2": (2, 0, 2, {}),
    "pp2": (1, 2, 2, {}),
    "pp2-untied-gqa": (1, 2, 2, {"no_weight_tying": True, "num_kv_heads": 2}),
    "tp2-pp2": (2, 2, 4, {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parallel_layouts_decode_like_one_device(layout: str):
    tp, pp, world, changes = LAYOUTS[layout]
    results = run_distributed(generate_checks.parallel_layout, world, tp, pp, changes)
    reference = results[0]["reference"]
    for rank, r in enumerate(results):
        for use_cache, out in r["out"].items():
            assert out["greedy"] == reference["greedy"], (rank, use_cache)
            assert out["sampled"] == reference["sampled"], (rank, use_cache)
            for ours, ref in zip(out["logits"], results[0]["reference_logits"]):
                assert ours == pytest.approx(ref, abs=1e-4)
    # 4 blocks cut by 'type:transformer|mlp' as DeepSpeed's PipelineModule cuts them (see test_stage_split.py)
    assert {tuple(r["layers"]) for r in results} == ({(0, 1), (2, 3)} if pp == 2 else {(0, 1, 2, 3)})


@pytest.mark.parametrize("tp, world", [(1, 2), (2, 4)], ids=["dp2", "dp2-tp2"])
def test_data_parallel_replicas_share_the_batches(tp: int, world: int):
    results = run_distributed(generate_checks.replicas_share_the_prompts, world, tp)
    for r in results:
        assert r["samples"] == r["reference"]  # every rank ends with every sample, as one device made them
        assert r["prompts"][0] == "In the beginning"
    # 5 prompts sorted by length in batches of 2 -> batches of 2, 2, 1 prompts; replica 0 takes the 1st and 3rd
    assert {r["replica"] for r in results} == {0, 1}
    for r in results:
        assert r["prefill_batches"] == ([2, 1] if r["replica"] == 0 else [2])
