"""Megatron-style sequence parallelism on real gloo ranks: its collectives, the model, dropout, memory, training.

One 4-rank launch (neox.parallel.testing) does everything. As tp2 x dp2: each sequence-parallel collective's
forward and backward against the all-reduce math it replaces; loss and every gradient of tp2 + sequence_parallel
against one device and against plain tp2, over model variants that exercise every kind of norm, head, position
table and activation checkpointing (DeepSpeed's, with partition_activations asked for); hidden dropout per tp rank;
the bytes autograd keeps against neox/plan's count. Then training through ParallelTrainEngine, several optimizer
steps: tp2 x dp2 with and without sequence_parallel (ZeRO 0 and 1) and tp2 x pp2 with it (sharded activations
between stages, recomputed layers), whose losses and gradient norms must equal plain tp2's and one process's.
"""
from __future__ import annotations

import pytest

from neox.parallel.testing import run_distributed
from tests.distributed import sequence_checks as checks

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
VARIANTS = {
    "mha-tied-rotary-layernorm": {},
    "gqa-swiglu-rmsnorm-parallel-residual": {"num_kv_heads": 2, "activation": "swiglu", "norm": "rmsnorm",
                                             "gpt_j_residual": True},
    "gpt-j-tied-norm-untied-head-learned": {"gpt_j_residual": True, "gpt_j_tied": True, "no_weight_tying": True,
                                            "pos_emb": "learned"},
    "row-head-qk-layernorm-rpe-layer-scaling": {"no_weight_tying": True, "output_layer_parallelism": "row",
                                                "use_qk_layernorm": True, "pos_emb": "rpe", "num_kv_heads": 2,
                                                "apply_query_key_layer_scaling": True},
    "scalenorm-alibi-shared-layers-deepspeed-checkpointing": {
        "norm": "scalenorm", "pos_emb": "alibi", "num_layers": 4, "num_unique_layers": 2,
        "checkpoint_activations": True, "checkpoint_num_layers": 2, "partition_activations": True,
        "contiguous_checkpointing": True},
    "non-parametric-norm-no-biases-local-window": {
        "norm": "non_parametric_layernorm", "use_bias_in_attn_linear": False, "use_bias_in_mlp": False,
        "pos_emb": "sinusoidal", "sliding_window_width": 5, "attention_config": [[["local", "global"], 1]],
        "sparsity_config": {"block": 4, "num_local_blocks": 2}},
}
DROPOUT = {"hidden_dropout": 0.3, "attention_dropout": 0.2}
TP2 = {"model_parallel_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}
LAYOUTS = {
    "tp2xdp2": TP2,
    "tp2xdp2-sp": {**TP2, "sequence_parallel": True},
    "tp2xdp2-sp-zero1": {**TP2, "sequence_parallel": True, "zero_optimization": {"stage": 1}},
    "pp2xtp2-sp-checkpointed": {"model_parallel_size": 2, "pipe_parallel_size": 2, "sequence_parallel": True,
                                "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                                "pipe_partition_method": "uniform", "checkpoint_activations": True,
                                "partition_activations": True},
}


# LoRA shares this launch (tests/distributed/lora_checks.py): adapters on a GQA / SwiGLU model at tp2 and tp2 + sequence
# parallelism; training at tp2 x dp2 ZeRO-2, resumed after step 2 at tp2 x dp2 + sequence parallelism ZeRO-3 and at
# pp2 x dp2 ZeRO-1 (each pipeline stage trains its own layers' adapters).
LORA = {"variants": {"gqa-swiglu-rmsnorm": {"num_kv_heads": 2, "activation": "swiglu", "norm": "rmsnorm"}},
        "first": ("tp2xdp2-zero2", {**TP2, "zero_optimization": {"stage": 2}}),
        "resumed": [("tp2xdp2-sp-zero3", {**TP2, "sequence_parallel": True, "zero_optimization": {"stage": 3}}),
                    ("pp2xdp2-zero1", {"pipe_parallel_size": 2, "pipe_partition_method": "type:transformer",
                                       "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                                       "zero_optimization": {"stage": 1}})]}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("sp")
    return run_distributed(checks.everything, 4, str(work), VARIANTS, DROPOUT, LAYOUTS, LORA, timeout_s=300)[0]


def test_collectives_equal_the_all_reduce_math(results):
    r = results["collectives"]
    assert max(r["errs"].values()) < 1e-6, r["errs"]
    # gathered_linear keeps this rank's positions and the weight for backward, never the gathered input.
    assert r["linear_saved"] == sorted([r["shard_numel"], r["weight_numel"]])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sequence_parallel_model_equals_one_device_and_tp2(results, variant):
    r = results["models"][variant]
    assert r["sp_loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
    assert r["sp_loss"] == pytest.approx(r["tp_loss"], rel=1e-7)
    assert r["sp_grad_err"] < 1e-6 and r["tp_grad_err"] < 1e-6
    assert r["sp_vs_tp_grad_err"] < 1e-6


def test_hidden_dropout_draws_per_rank_and_replays_exactly(results):
    r = results["dropout"]
    # Without dropout both ranks' outputs agree to rounding; with it they differ as much as dropout changes them.
    assert r["plain_rank_diff"] < 1e-6 and r["dropout_effect"] > 1e-3 and r["dropped_rank_diff"] > 1e-3, r
    assert r["rng_in_step"] and r["same_state_same_loss"]
    assert r["recompute_loss_equal"] and r["recompute_err"] < 1e-6


def test_saved_activations_are_what_the_plan_counts(results):
    saved = results["saved"]
    for name, (measured, planned) in saved.items():
        assert planned == pytest.approx(measured, rel=0.10), (name, measured, planned)
    for variant in ("pythia", "llama"):  # what sequence parallelism saves: the replicated terms, less 1/tp of them
        (tp, tp_planned), (sp, sp_planned) = saved[f"{variant}-tp"], saved[f"{variant}-sp"]
        assert tp - sp == pytest.approx(tp_planned - sp_planned, rel=0.10) and tp - sp >= 1.5


def test_sequence_that_does_not_split_is_named(results):
    message = results["indivisible"]
    assert "sequence_parallel" in message and "15 positions" in message and "2 tensor-parallel ranks" in message


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def reference():
    return checks.reference_training({})


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if "-sp" in name])
def test_training_matches_tp2_and_one_process(results, reference, layout):
    records, tp2 = results["training"][layout]["records"], results["training"]["tp2xdp2"]["records"]
    assert len(records) == len(reference) == checks.STEPS
    worst_tp = max(max(_relative(a[0], b[0]), _relative(a[1], b[1])) for a, b in zip(records, tp2))
    worst_one = max(max(_relative(a[0], b[0]), _relative(a[1], b[1])) for a, b in zip(records, reference))
    print(f"{layout}: worst relative loss / grad_norm difference over {checks.STEPS} steps: vs tp2 {worst_tp:.1e}, "
          f"vs one process {worst_one:.1e}")
    assert worst_tp < TOLERANCE and worst_one < TOLERANCE
    assert reference[2][0] < reference[0][0]  # it trains: step 3 sees step 1's batch again


def test_checkpoint_holds_what_plain_tp2_holds(results):
    """Sequence parallelism adds no state: a checkpoint of it has tp2's names and shapes (evaluation and generation,
    which run without it, load it as they load tp2's), and after the same steps the same values."""
    plain, sp = results["training"]["tp2xdp2"]["state"], results["training"]["tp2xdp2-sp"]["state"]
    assert {k: v.shape for k, v in sp.items()} == {k: v.shape for k, v in plain.items()}
    assert max((sp[k] - plain[k]).abs().max().item() for k in plain) < 1e-5


def test_lora_adapters_split_with_their_base_layers_equal_one_device(results):
    for name, r in results["lora"]["layers"].items():
        assert r["tp_trainable"] == r["sp_trainable"] == r["ref_trainable"] and r["adapters"] == 2 * 5 * 2, name
        assert r["tp_frozen_grads"] == r["sp_frozen_grads"] == 0  # the base stays frozen once split
        assert r["tp_loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
        assert r["sp_loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
        assert r["tp_grad_err"] < 1e-6 and r["sp_grad_err"] < 1e-6, r


def test_lora_training_at_tp2_zero2_and_resumed_at_another_layout_equals_one_process(results, tmp_path):
    from tests.distributed import lora_checks

    trained, (first, _) = results["lora"]["training"], LORA["first"]
    reference = lora_checks.reference_training(str(tmp_path))
    # the layout-free state holds the adapters alone: the base comes from the checkpoint the run names
    assert trained["saved"] == sorted(reference["adapters"])
    assert reference["optimized"] == sum(t.numel() for t in reference["adapters"].values()) < reference["all_params"] / 5
    resumed = [(name, reference["records"][2:]) for name, _ in LORA["resumed"]]
    for layout, steps in [(first, reference["records"]), *resumed]:
        records = trained[layout]["records"]
        worst = max(max(_relative(a[0], b[0]), _relative(a[1], b[1])) for a, b in zip(records, steps))
        adapter_err = max((trained[layout]["adapters"][k] - v).abs().max().item()
                          for k, v in reference["adapters"].items())
        print(f"LoRA {layout}: worst relative loss / grad_norm difference vs one process {worst:.1e}, max |adapter "
              f"difference| {adapter_err:.1e}")
        assert len(records) == len(steps) and worst < TOLERANCE and adapter_err < 1e-5
    assert reference["records"][2][0] < reference["records"][0][0]
