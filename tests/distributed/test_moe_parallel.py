"""MoE layers under every layout of one rank's model: tensor parallelism (each expert split as the dense MLP is),
the meta-device build, and real DeepSpeed steps at tp2, pp2 and dp2 x ZeRO-1, on 2 gloo ranks; expert parallelism
with tp2 and with a two-stage pipeline on 4."""
from __future__ import annotations

import pytest

from neox.parallel.testing import run_distributed
from tests.distributed import moe_checks


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return run_distributed(moe_checks.moe_layouts, 2, str(tmp_path_factory.mktemp("moe")), timeout_s=300)


def test_tensor_parallel_moe_block_matches_single_device(results):
    for rank in results:
        for variant, r in zip(moe_checks.TP_VARIANTS, rank["tp_model"]):
            assert r["state_matches"] and r["same_names"], variant
            assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6), variant
            assert r["grad_err"] < 1e-6, variant


def test_meta_build_materialises_the_expert_shards(results):
    for rank in results:
        for r in rank["meta"]:
            assert r["same_keys"] and not r["mismatched"] and r["marks_kept"] and r["rng_equal"]


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory) -> list[dict]:
    return run_distributed(moe_checks.moe_ep_layouts, 4, str(tmp_path_factory.mktemp("moe-ep")), timeout_s=300)


@pytest.mark.parametrize("layout", list(moe_checks.LAYOUTS) + list(moe_checks.EP_LAYOUTS))
def test_training_step_with_aux_losses_matches_the_reference(request, layout):
    """Gradient accumulation 2: the aux losses get the loss's 1/2 backward scale at every layout, pipeline stages
    and expert-parallel all-to-alls included; the logged loss is the LM loss alone; the router statistics cover
    every layer once."""
    results = request.getfixturevalue("ep_results" if layout in moe_checks.EP_LAYOUTS else "results")
    for rank in results:
        r, ref = rank[layout], rank[layout]["reference"]
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        assert r["metrics"]["moe_aux_loss"] == pytest.approx(ref["moe_aux_loss"], rel=1e-5)
        assert r["metrics"]["moe_z_loss"] == pytest.approx(ref["moe_z_loss"], rel=1e-5)
        assert sorted(r["metrics"]["moe_expert_load"]) == ["0", "1"]
