"""Chat SFT (train_impl normal + label datasets) against TRL's SFTTrainer, across layouts, and the loss normalisation.

One shared set-up (tests/distributed/sft_checks.py: a tiny random Llama, imported; eight chats preprocessed with a
chat template; AdamW, constant LR, no clipping, fp32) and three processes' worth of runs: TRL in a process of its own
while our one-rank run goes on in another, then one 2-rank launch for every multi-rank layout.

- SFT: 5 steps of global batch 4 (micro 2 x accumulation 2) by the Trainer of `deepy train` (the objective chosen
  from train_label_data_paths, metrics.jsonl read back): its per-step losses equal TRL's completion-only loss (which
  divides each micro-batch's summed loss by the trained tokens of the whole accumulated batch) within 1e-5 relative;
  dp2 with ZeRO-2, tp2 and pp2 (the engines on the same loader) equal that one-rank run within 1e-5.
- Normalisation: one global batch of 4 sequences whose trained token counts are 5, 60, 1 and 30 gives the same loss,
  gradient norm and gradients (1e-6) at micro 4 x accum 1 x dp1, micro 1 x accum 2 x dp2, micro 2 x accum 1 x
  dp2, pp2 with micro 1 x accum 4 and tp2 with micro 2 x accum 2 (both engines), and these equal the mean over all
  96 trained tokens; a mean of per-micro-batch means (the arithmetic before) is far off.
- Unmasked pre-training batches keep exactly the old numbers: the loss bit for bit, the gradients too.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from neox.parallel.testing import run_distributed
from tests.distributed import sft_checks as checks

pytestmark = pytest.mark.slow

SFT_TOLERANCE = 1e-5
NORM_TOLERANCE = 1e-6


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    paths = checks.prepare(tmp_path_factory.mktemp("sft"))
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        trl = pool.submit(checks.trl_losses, paths)  # its own process: TRL and accelerate keep global state
        one = run_distributed(checks.one_rank, 1, paths, timeout_s=300)[0]
        trl_result = trl.result(timeout=300)
    two = run_distributed(checks.two_ranks, 2, paths, timeout_s=400)[0]
    return {"paths": paths, "trl": trl_result, "one": one, "two": two}


def test_chat_sft_steps_equal_trl_sft_trainer(runs):
    ours, trl = runs["one"]["sft"], runs["trl"]  # ours: the Trainer's metrics.jsonl, a record per step
    assert ours["iterations"] == list(range(1, checks.STEPS + 1))
    assert "mean_token_accuracy" in ours["record_keys"] and "loss" not in ours["record_keys"]  # SFT, not a preference
    diffs = [_relative(a, b) for a, b in zip(ours["losses"], trl["losses"])]
    print(f"SFT vs TRL {trl['optimizer']}: per-step relative loss differences {diffs}")
    assert len(trl["losses"]) == checks.STEPS and max(diffs) < SFT_TOLERANCE, (ours["losses"], trl["losses"])
    assert len(set(ours["losses"])) == checks.STEPS  # it trains: the loss moves every step
    assert all(0.0 <= a <= 1.0 for a in ours["accuracy"])


@pytest.mark.parametrize("layout", list(checks.SFT_LAYOUTS))
def test_chat_sft_layout_equals_one_rank(runs, layout):
    one, other = runs["one"]["sft"], runs["two"]["sft"][layout]
    diffs = [_relative(a, b) for a, b in zip(other["losses"], one["losses"])]
    print(f"SFT {layout} vs one rank: {diffs}")
    assert other["objective"] == "SFTObjective" and max(diffs) < SFT_TOLERANCE, (other["losses"], one["losses"])
    assert max(abs(a - b) for a, b in zip(other["accuracy"], one["accuracy"])) < 1e-9


def _max_relative_gradient_error(got: dict, expected: dict) -> float:
    return max(float((got[n] - g).abs().max() / g.abs().max().clamp(min=1e-30)) for n, g in expected.items())


@pytest.mark.parametrize("layout", list(checks.NORM_LAYOUTS))
def test_loss_is_the_mean_over_the_global_batch_whatever_the_split(runs, layout):
    base, other = runs["one"]["norm"], runs["two"]["norm"][layout]
    assert _relative(other["loss"], base["loss"]) < NORM_TOLERANCE, (other["loss"], base["loss"])
    assert _relative(other["grad_norm"], base["grad_norm"]) < NORM_TOLERANCE, (other["grad_norm"], base["grad_norm"])
    if "gradient" in other:
        assert _max_relative_gradient_error(other["gradient"], base["gradient"]) < NORM_TOLERANCE


def test_global_mean_is_what_the_engines_compute_and_a_mean_of_micro_means_is_not(runs):
    reference = checks.per_micro_mean_reference(runs["paths"], micro=1)
    base = runs["one"]["norm"]
    right, wrong = reference["global_mean"], reference["mean_of_micro_means"]
    assert _relative(base["loss"], right["loss"]) < NORM_TOLERANCE
    assert _max_relative_gradient_error(base["gradient"], right["gradient"]) < NORM_TOLERANCE
    # What micro 1 x accum 2 x dp2 trained on before this change (DeepSpeed's mean of each micro-batch's mean).
    loss_gap = _relative(wrong["loss"], right["loss"])
    difference = torch.stack([(wrong["gradient"][n] - g).square().sum() for n, g in right["gradient"].items()])
    norm = torch.stack([g.square().sum() for g in right["gradient"].values()])
    gradient_gap = float(difference.sum().sqrt() / norm.sum().sqrt())
    print(f"mean of per-micro-batch means vs global token mean: loss {wrong['loss']:.6f} vs {right['loss']:.6f} "
          f"({loss_gap:.2%}), gradient ||difference|| / ||gradient|| = {gradient_gap:.2%}")
    assert loss_gap > 1e-3 and gradient_gap > 1e-2


def test_unmasked_pretraining_numbers_are_unchanged(runs):
    unmasked = runs["one"]["unmasked"]
    assert unmasked["bitwise_loss"], unmasked
    assert unmasked["bitwise_gradients"] or unmasked["max_gradient_error"] < 1e-7, unmasked
    assert torch.isfinite(torch.tensor(unmasked["loss"]))
