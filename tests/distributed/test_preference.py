"""DPO, KTO and the reward model (train_impl dpo / kto / rm) against TRL's DPOTrainer, KTOTrainer and RewardTrainer,
then on dp2 (ZeRO-2), tp2 and pp2 against the one-rank run, and DPO and KTO (their frozen reference swapped into ZeRO-3's
partitions) on dp2 ZeRO-3; and DPO reading reference log-probs that `deepy generate` precomputed.

One shared set-up (tests/distributed/preference_checks.py: a tiny random GPT-NeoX, 20 examples, AdamW, constant LR, no
clipping, fp32): our three one-rank runs, three runs of the training loop on data shards, then TRL's three runs in one
spawned process, then one 2-rank launch runs every (objective, layout). 5 steps of a global batch of 4 (pairs /
samples) each.

Tolerance 1e-5, relative to max(1, |value|): the losses and log-probs (|x| > 0.4) relative, the rewards (which start at
exactly 0) absolute.
"""
from __future__ import annotations

import math
import pytest

from neox.parallel.testing import run_distributed
from tests.distributed import preference_checks as checks

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
OBJECTIVES = ["dpo", "kto", "rm"]


def _difference(a: float, b: float) -> float:
    return abs(a - b) / max(1.0, abs(b))


@pytest.fixture(scope="module")
def runs() -> dict:
    runs = run_distributed(checks.one_rank_and_trl, 1, OBJECTIVES, timeout_s=300)[0]
    runs["two"] = run_distributed(checks.layouts_on_two_ranks, 2, checks.LAYOUTS, OBJECTIVES, timeout_s=400)[0]
    return runs


def _trl_values(objective: str, record: dict) -> dict[str, float]:
    """TRL's step record under our names. RewardTrainer logs the mean reward and the margin, not the sides: chosen and
    rejected follow from them (mean +- margin / 2)."""
    values = {ours: float(record[theirs]) for theirs, ours in checks.TRL_NAMES[objective].items()}
    if objective == "rm":
        mean, margin = float(record["mean_reward"]), float(record["margin"])
        values["rewards_chosen"], values["rewards_rejected"] = mean + margin / 2, mean - margin / 2
    return values


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_steps_equal_trl(runs, objective):
    ours, trl = runs["one"][objective], runs["trl"][objective]
    assert len(ours) == len(trl) == checks.STEPS
    worst: dict[str, float] = {}
    for step, (mine, theirs) in enumerate(zip(ours, trl)):
        for name, value in _trl_values(objective, theirs).items():
            assert math.isfinite(mine[name]), (step, name, mine)
            worst[name] = max(worst.get(name, 0.0), _difference(mine[name], value))
    print(f"{objective} vs TRL, largest difference over {checks.STEPS} steps: {worst}")
    assert max(worst.values()) < TOLERANCE, worst
    assert len({round(r["loss"], 9) for r in ours}) == checks.STEPS  # it trains: the loss moves every step
    assert {"rewards_chosen", "rewards_rejected", "rewards_accuracy", "rewards_margin"} <= set(ours[0])
    if objective != "rm":
        assert {"logps_chosen", "logps_rejected"} <= set(ours[0])
    if objective == "kto":  # the KL reference point leaves 0 once the policy moves: its path is exercised
        assert max(r["kl"] for r in ours) > 1e-3


@pytest.mark.parametrize("objective, layout", checks.layout_runs(OBJECTIVES))
def test_layout_equals_one_rank(runs, objective, layout):
    one, other = runs["one"][objective], runs["two"][f"{objective}/{layout}"]
    worst = max(_difference(o[name], r[name]) for o, r in zip(other, one) for name in r)
    print(f"{objective} {layout} vs one rank: largest difference {worst:.3g}")
    assert len(other) == checks.STEPS and set(other[0]) == set(one[0])
    assert worst < TOLERANCE


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_training_loop_on_data_shards_writes_the_same_first_step_to_metrics_jsonl(runs, objective):
    """The user's path (shards -> datasets -> loader -> Trainer -> metrics.jsonl) on the first global batch's examples
    gives the first step the objective computed from the batches TRL was matched on."""
    loop, one = runs["loop"][objective], runs["one"][objective][0]
    assert [r["iteration"] for r in loop] == list(range(1, checks.LOOP_STEPS + 1))
    worst = max(_difference(loop[0][name], value) for name, value in one.items())
    print(f"{objective} training loop step 1 vs the engine's: largest difference {worst:.3g}")
    assert set(one) <= set(loop[0]) and worst < 1e-6
    assert loop[1]["loss"] != loop[0]["loss"]


def test_dpo_reads_reference_log_probs_precomputed_by_deepy_generate(runs):
    """`deepy generate` with text_gen_type precompute on a checkpoint of the starting weights writes one document of
    per-token log-probs per data document; the training loop reading them (precompute_model_name, no live reference)
    makes the steps of the loop with the live reference: the second one too, after the policy moved."""
    precomputed, live = runs["precomputed"], runs["loop"]["dpo"]
    assert all(data == written for data, written in precomputed["counts"].values()), precomputed["counts"]
    records = precomputed["records"]
    assert [r["iteration"] for r in records] == list(range(1, checks.LOOP_STEPS + 1))
    worst = max(_difference(mine[name], theirs[name]) for mine, theirs in zip(records, live)
                for name in checks.TRL_NAMES["dpo"].values())
    print(f"dpo with precomputed reference log-probs vs the live reference: largest difference {worst:.3g}")
    assert worst < TOLERANCE and records[1]["loss"] != records[0]["loss"]
