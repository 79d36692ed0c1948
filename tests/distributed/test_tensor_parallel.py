"""Tensor-parallel layers, vocab-parallel cross entropy and the sharding plan on 2 real gloo ranks."""
from __future__ import annotations

import pytest
import torch

from neox.model import GPTNeoX
from neox.parallel.sharding import ShardingError, merge_state_dicts, shard_state_dict, tp_split_dim
from neox.parallel.testing import DistributedRunError, run_distributed
from tests.distributed import tp_checks


def test_column_then_row_parallel_equals_single_device_mlp():
    results = run_distributed(tp_checks.mlp_column_row, 2)
    for r in results:
        assert r["out_err"] < 1e-6 and r["x_grad_err"] < 1e-6
    ref = results[0]["ref"]
    for rank_result in results:
        torch.testing.assert_close(rank_result["col_w_grad"], ref["col_w"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank_result["col_b_grad"], ref["col_b"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank_result["row_w_grad"], ref["row_w"], rtol=1e-5, atol=1e-6)
        # the replicated row bias gets the full (identical) gradient on every rank
        torch.testing.assert_close(rank_result["row_b_grad"], ref["row_b"], rtol=1e-5, atol=1e-6)


def test_vocab_parallel_embedding_head_and_cross_entropy_match_torch():
    results = run_distributed(tp_checks.vocab_embedding_head_ce, 2)
    for r in results:
        assert r["local_vocab"] == tp_checks.VOCAB // 2  # each rank only ever held half the logits
        assert r["tok_err"] < 1e-5
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
        torch.testing.assert_close(r["grad"], r["ref_grad"], rtol=1e-5, atol=1e-7)


MODEL_VARIANTS = {
    "mha-tied-rotary": {},
    "gqa-swiglu-rmsnorm-parallel-residual": {"num_kv_heads": 2, "activation": "swiglu", "norm": "rmsnorm",
                                             "gpt_j_residual": True},
    "alibi-untied": {"pos_emb": "alibi", "no_weight_tying": True},
    "learned-no-attn-bias": {"pos_emb": "learned", "no_weight_tying": True, "use_bias_in_attn_linear": False},
    # gpt-neox options: qk norms (LayerNorm statistics span the tp ranks' heads), the T5 bias split by heads, the
    # untied head split over the hidden dim, DeepSpeed's activation checkpointing with partitioned activations.
    "qk-layernorm-gqa-rpe-layer-scaling": {"num_kv_heads": 2, "use_qk_layernorm": True, "pos_emb": "rpe",
                                           "apply_query_key_layer_scaling": True},
    "row-head-qk-rmsnorm-local-window": {"no_weight_tying": True, "output_layer_parallelism": "row",
                                         "use_qk_layernorm": True, "norm": "rmsnorm", "sliding_window_width": 5,
                                         "attention_config": [[["local", "global"], 1]],
                                         "sparsity_config": {"block": 4, "num_local_blocks": 2}},
    "scalenorm-qk-sinusoidal-shared-checkpointed": {
        "norm": "scalenorm", "use_qk_layernorm": True, "pos_emb": "sinusoidal", "num_layers": 4,
        "num_unique_layers": 2, "checkpoint_activations": True, "checkpoint_num_layers": 2,
        "partition_activations": True, "contiguous_checkpointing": True, "checkpoint_in_cpu": True,
        "synchronize_each_layer": True},
}


def test_tensor_parallel_model_matches_single_device():
    results = run_distributed(tp_checks.full_model_tp, 2, list(MODEL_VARIANTS.values()))
    for rank_results in results:
        for name, r in zip(MODEL_VARIANTS, rank_results):
            assert r["state_matches"] and r["same_names"], name
            assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6), name
            assert r["grad_err"] < 1e-6, name


def test_indivisible_kv_heads_is_a_clear_error():
    messages = run_distributed(tp_checks.size_errors, 2)
    assert all("model_parallel_size 2 must divide num_kv_heads" in m for m in messages)


def test_failing_rank_is_reported():
    with pytest.raises(DistributedRunError, match="ZeroDivisionError"):
        run_distributed(_divide_by_zero, 2)


def _divide_by_zero():
    return 1 / 0


def test_shard_and_merge_round_trip_and_split_dims():
    torch.manual_seed(0)
    full = GPTNeoX(tp_checks.model_cfg(num_kv_heads=2, activation="swiglu", no_weight_tying=True)).state_dict()
    assert tp_split_dim("blocks.0.attention.query_key_value.weight") == 0
    assert tp_split_dim("blocks.1.attention.dense.weight") == 1
    assert tp_split_dim("blocks.1.attention.dense.bias") is None
    assert tp_split_dim("blocks.0.mlp.gate.bias") == 0
    assert tp_split_dim("head.weight") == 0
    assert tp_split_dim("final_norm.weight") is None
    shards = [shard_state_dict(full, r, 2) for r in range(2)]
    assert shards[1]["blocks.0.attention.query_key_value.weight"].shape[0] == \
        full["blocks.0.attention.query_key_value.weight"].shape[0] // 2
    merged = merge_state_dicts(shards)
    assert list(merged) == list(full)
    for name, tensor in full.items():
        assert torch.equal(merged[name], tensor), name
    shards[1]["final_norm.weight"] += 1.0
    with pytest.raises(ShardingError, match="final_norm.weight"):
        merge_state_dicts(shards)
    with pytest.raises(ShardingError, match="does not split"):
        shard_state_dict({"blocks.0.mlp.linear1.weight": torch.zeros(3, 4)}, 0, 2)


def test_dropout_keeps_tp_replicated_activations_identical():
    for r in run_distributed(tp_checks.dropout_stays_replicated, 2):
        assert r["dropout_active"]
        assert r["replicated"] and r["same_loss"]


def test_attention_dropout_masks_differ_per_tp_rank_and_hidden_dropout_masks_do_not():
    for r in run_distributed(tp_checks.attention_dropout_per_tp_rank, 2):
        assert r["heads_identical_without_dropout"]
        assert r["attention_masks_differ"]
        assert r["hidden_masks_equal"] and r["rng_in_step"]
        assert r["recompute_same_mask"]


META_VARIANTS = [
    {},
    {"num_kv_heads": 2, "activation": "swiglu", "norm": "rmsnorm", "no_weight_tying": True},
    {"pos_emb": "alibi", "init_method": "small_init", "output_layer_init_method": "wang_init"},
    {"pos_emb": "learned", "use_bias_in_attn_linear": False, "init_method": "orthogonal"},
    {"pos_emb": "rpe", "use_qk_layernorm": True, "norm": "scalenorm", "num_layers": 4, "num_unique_layers": 2},
    {"no_weight_tying": True, "output_layer_parallelism": "row", "use_qk_layernorm": True, "gpt_j_residual": True,
     "gpt_j_tied": True},
]


def test_meta_build_materialises_the_full_builds_shards():
    for rank_results in run_distributed(tp_checks.meta_build_matches_full_build, 2, META_VARIANTS):
        for changes, r in zip(META_VARIANTS, rank_results):
            assert r["same_keys"] and not r["mismatched"], (changes, r["mismatched"])
            assert r["tied_kept"] and r["marks_kept"] and r["buffers_equal"] and r["rng_equal"], (changes, r)
