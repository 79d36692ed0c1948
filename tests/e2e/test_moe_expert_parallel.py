"""Expert parallelism through `deepy train` as a user runs it: a MoE model (both layers MoE, 4 experts, top-2, gated
experts, load-balancing and z losses) trains at ep2 (2 ranks, ZeRO 0), at ep2 x dp2 (4 ranks, ZeRO 2) and at tp2
like one rank for 20 steps: lm_loss, the router losses and the clipped gradient norm within 1e-5 relative. An ep
run's checkpoints are layout-free only (whole experts, written by the ranks that hold them) and resume at another
layout: ep2's step 10 continues at tp2 (experts split by hidden units instead), and tp2's step 10 continues at ep2
under ZeRO 1, each like the run that never stopped."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from neox.checkpoint.layout_state import consolidated_weights
from tests.e2e.train_helpers import Launch, deepy_train, preprocess_kjv, write_config

pytestmark = pytest.mark.slow  # six launches, ~75 s on a quiet machine

TOLERANCE = 1e-5
MOE = {"moe_num_experts": 4, "moe_top_k": 2, "moe_router_type": "topk", "activation": "swiglu",
       "moe_aux_loss_coeff": 0.01, "moe_z_loss_coeff": 0.001, "moe_norm_topk_prob": True}
EP2 = {"moe_expert_parallel_size": 2}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe-ep")


@pytest.fixture(scope="module")
def model_config(work) -> Path:
    return write_config(work / "tiny_moe.yml", preprocess_kjv(work / "data"), **MOE)


@pytest.fixture(scope="module")
def reference(work, model_config) -> Launch:
    """One rank, ZeRO 0, 20 steps, a checkpoint at 10."""
    return deepy_train(work / "reference", model_config, num_gpus=1, zero_stage=0, extra={"save_interval": 10})


@pytest.fixture(scope="module")
def ep2(work, model_config) -> Launch:
    return deepy_train(work / "ep2", model_config, num_gpus=2, zero_stage=0,
                       extra={**EP2, "gradient_accumulation_steps": 2, "save_interval": 10})


def _steps(launch: Launch) -> dict[int, dict]:
    return {r["iteration"]: r for r in launch.records() if "lm_loss" in r}


def _worst(reference: Launch, other: Launch, key: str) -> float:
    ref, got = _steps(reference), _steps(other)
    assert sorted(got) and set(got) <= set(ref)
    return max(abs(got[i][key] - ref[i][key]) / abs(ref[i][key]) for i in got)


def _assert_trains_like(reference: Launch, other: Launch, name: str, steps: list[int]) -> None:
    assert sorted(_steps(other)) == steps, name
    worst = {key: _worst(reference, other, key) for key in ("lm_loss", "moe_aux_loss", "moe_z_loss", "grad_norm")}
    print(f"{name}: worst relative difference vs one rank over steps {steps[0]}-{steps[-1]}: "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    assert all(v < TOLERANCE for v in worst.values()), worst


def test_ep2_trains_like_one_rank(reference, ep2):
    _assert_trains_like(reference, ep2, "ep2 (ZeRO 0)", list(range(1, 21)))
    # grad_norm is clipped at 1.0 in these runs: the norm the clipping used is the whole model's
    assert max(r["grad_norm"] for r in _steps(ep2).values()) > 1.0


@pytest.fixture(scope="module")
def ep2xdp2(work, model_config) -> Launch:
    return deepy_train(work / "ep2xdp2", model_config, num_gpus=4, zero_stage=2,
                       extra={**EP2, "gradient_accumulation_steps": 1, "save_interval": 10})


def test_ep2_x_dp2_zero2_trains_like_one_rank(reference, ep2xdp2):
    _assert_trains_like(reference, ep2xdp2, "ep2 x dp2 (ZeRO 2)", list(range(1, 21)))


@pytest.mark.parametrize("layout", ["ep2", "ep2xdp2"])
def test_ep_checkpoints_are_layout_free_with_whole_experts(request, reference, layout):
    """ep2 at ZeRO 0 (each expert-parallel rank writes its experts) and ep2 x dp2 at ZeRO 2 (the two ranks holding
    the same experts each write their ZeRO partition of them)."""
    launch = request.getfixturevalue(layout)
    ckpt = launch.save_dir / "global_step10"
    ranks = 2 if layout == "ep2" else 4
    assert sorted(p.name for p in (ckpt / "layout_free").glob("rank*.safetensors")) == [
        f"rank{r:05d}.safetensors" for r in range(ranks)]
    assert not list(ckpt.glob("*model_states.pt")) and not list(ckpt.glob("*optim_states.pt"))
    weights = consolidated_weights(ckpt, tied_head=False)
    ref_weights = consolidated_weights(reference.save_dir / "global_step10", tied_head=False)
    assert weights.keys() == ref_weights.keys()
    assert tuple(weights["blocks.0.mlp.experts.linear1.weight"].shape)[0] == 4  # every expert, from every rank
    worst = max(float((weights[k] - ref_weights[k]).abs().max() / ref_weights[k].abs().max().clamp(min=1e-12))
                for k in weights)
    print(f"{layout} vs one rank at step 10: worst weight difference {worst:.2e} of the tensor's largest entry")
    # Adam divides each update by its own gradient's running scale, so reduction-order differences (1e-7) in
    # near-zero gradients become update differences of a fraction of lr (2e-3): ~2e-4 of the weights' scale here,
    # while the losses agree to 1e-7 (above) and the resumes below continue like the reference.
    assert worst < 1e-3


def _step10(launch: Launch, load_dir: Path) -> Path:
    """A load folder whose latest checkpoint is the run's step 10."""
    shutil.copytree(launch.save_dir / "global_step10", load_dir / "global_step10")
    (load_dir / "latest").write_text("global_step10\n")
    return load_dir


def test_ep2_checkpoint_resumes_at_tp2(work, model_config, reference, ep2):
    resumed = deepy_train(work / "ep2-to-tp2", model_config, num_gpus=2, zero_stage=1,
                          extra={"model_parallel_size": 2, "load": str(_step10(ep2, work / "ep2-step10"))})
    assert "loaded its layout-free state" in resumed.output and "fresh optimizer" not in resumed.output
    _assert_trains_like(reference, resumed, "ep2 step 10 -> tp2 (ZeRO 1)", list(range(11, 21)))


def test_tp2_trains_like_one_rank_and_resumes_at_ep2(work, model_config, reference):
    """tp2 (every expert split by hidden units) for 20 steps; its step 10 continues at ep2 under ZeRO 1."""
    tp2 = deepy_train(work / "tp2", model_config, num_gpus=2, zero_stage=0,
                      extra={"model_parallel_size": 2, "save_interval": 10})
    _assert_trains_like(reference, tp2, "tp2 (ZeRO 0)", list(range(1, 21)))
    resumed = deepy_train(work / "tp2-to-ep2", model_config, num_gpus=2, zero_stage=1,
                          extra={**EP2, "gradient_accumulation_steps": 2,
                                 "load": str(_step10(tp2, work / "tp2-step10"))})
    assert "loaded its layout-free state" in resumed.output and "fresh optimizer" not in resumed.output
    _assert_trains_like(reference, resumed, "tp2 step 10 -> ep2 (ZeRO 1)", list(range(11, 21)))
