"""`deepy plan` with expert parallelism (moe_expert_parallel_size): experts and model states per rank, and the
all-to-all bytes per step, against hand arithmetic and against the experts a rank keeps after the trainer's own
expert split (neox/parallel/expert_parallel.py:shard_experts)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from launcher import deepy
from neox.config import load_config
from neox.model import GPTNeoX
from neox.model.moe import MoE
from neox.parallel.expert_parallel import shard_experts
from neox.plan.plan import PlanOptions, build_plan
from neox.plan.report import format_plan

# 2 MoE layers of 8 SwiGLU experts (3 matrices of 64 x 96 each): 2 x 8 x 3 x 64 x 96 = 294,912 expert parameters.
# Tokens per micro-batch: 2 x 32 = 64; 3 micro-batches per step; bf16 (2 bytes).
MOE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "max_position_embeddings": 32,
       "pos_emb": "rotary", "padded_vocab_size": 128, "activation": "swiglu", "moe_num_experts": 8, "moe_top_k": 2,
       "moe_intermediate_size": 96, "moe_router_type": "topk", "moe_expert_interval": 1,
       "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3, "num_gpus": 8,
       "precision": "bfloat16", "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}
EXPERTS = 2 * 8 * 3 * 64 * 96
EXPERT = 3 * 64 * 96


def plan_for(tmp_path: Path, **extra):
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump({**MOE, **extra}))
    return build_plan(load_config([path], local_gpus=0), PlanOptions(accelerator="A100-40GB"))


def rank_params(model_cfg, ep: int) -> int:
    """Parameters of expert-parallel rank 0 of the built model, cut by the trainer's own expert split."""
    torch.manual_seed(0)
    model = GPTNeoX(model_cfg)
    for block in {m for m in model.modules() if isinstance(m, MoE)}:
        shard_experts(block.experts, 0, ep)
    return sum(p.numel() for p in model.parameters())


def test_a_ranks_experts_and_model_states_with_ep(tmp_path):
    """tp 1, dp 8, ZeRO 1: each rank holds E/ep experts of each MoE layer; ZeRO-1 partitions the experts' fp32
    gradients and Adam states over the dp/ep ranks that hold them and the rest over dp 8, so a rank's partition is
    the same size at every ep (the experts' states are 1/8 of all of them either way) while its bf16 weights and
    gradients shrink."""
    whole = plan_for(tmp_path)
    torch.manual_seed(0)
    model = GPTNeoX(whole.cfg.model)
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n) == EXPERTS
    others = total - EXPERTS
    assert whole.params.stages[0].params == total and whole.experts.ep == 1
    for ep in (2, 4):
        plan = plan_for(tmp_path, moe_expert_parallel_size=ep)
        stage, rank = plan.params.stages[0], plan.ranks[0]
        assert stage.params == rank_params(whole.cfg.model, ep) == others + EXPERTS // ep
        assert stage.expert_params == plan.params.experts_per_rank == 2 * (8 // ep) * EXPERT
        assert plan.experts.experts_per_rank == 8 // ep and plan.experts.expert_dp == 8 // ep
        p = others + EXPERTS // ep
        shard = math.ceil(others / 8) + EXPERTS // 8  # (EXPERTS / ep) / (8 / ep)
        assert rank.params == 2 * p
        assert rank.gradients == 2 * p + 4 * shard
        assert rank.optimizer == 12 * shard == whole.ranks[0].optimizer
    zero0 = plan_for(tmp_path, moe_expert_parallel_size=4, zero_optimization={"stage": 0})
    assert zero0.ranks[0].optimizer == 12 * (others + EXPERTS // 4)  # replicated: fp32 master + m + v of its experts


def test_experts_split_over_tp_and_ep(tmp_path):
    """tp 2 (dp 4), ep 2, ZeRO 1: every expert split over the 2 tp ranks, and 4 of the 8 on each rank."""
    tp_only = plan_for(tmp_path, model_parallel_size=2)
    plan = plan_for(tmp_path, model_parallel_size=2, moe_expert_parallel_size=2)
    on_tp_rank = EXPERTS // 2
    assert tp_only.params.experts_per_tp_rank == on_tp_rank
    assert plan.params.experts_per_rank == plan.params.stages[0].expert_params == on_tp_rank // 2 == 73_728
    others = tp_only.params.stages[0].params - on_tp_rank
    assert plan.params.stages[0].params == others + 73_728
    assert plan.ranks[0].optimizer == 12 * (math.ceil(others / 4) + 73_728 // 2)  # dp 4; dp/ep 2
    assert plan.experts.expert_dp == 2


@pytest.mark.parametrize(("ep", "extra", "expected"), [
    # 2 layers x 3 micro-batches x (4 exchanges x 64 tokens x top-2 x 64 hidden x 2 bytes + 8 int64 counts) x 1/2
    (2, {}, 2 * 3 * (4 * 64 * 2 * 64 * 2 + 8 * 8) // 2),
    (4, {}, 2 * 3 * (4 * 64 * 2 * 64 * 2 + 8 * 8) * 3 // 4),
    # the recomputed forward exchanges the rows twice and the counts once more
    (4, {"checkpoint_activations": True}, 2 * 3 * (6 * 64 * 2 * 64 * 2 + 2 * 8 * 8) * 3 // 4),
    # tp ranks each send their replica's tokens: the same per rank
    (2, {"model_parallel_size": 2}, 2 * 3 * (4 * 64 * 2 * 64 * 2 + 8 * 8) // 2),
    # fp32 activations: 4 bytes
    (2, {"precision": "fp32", "bf16": {"enabled": False}}, 2 * 3 * (4 * 64 * 2 * 64 * 4 + 8 * 8) // 2),
])
def test_all_to_all_bytes_per_rank_per_step(tmp_path, ep, extra, expected):
    plan = plan_for(tmp_path, moe_expert_parallel_size=ep, **extra)
    assert plan.experts.all_to_all_bytes == expected
    assert f"all-to-all   {expected:,} bytes" in format_plan(plan)


def test_pipeline_stages_send_for_their_own_moe_layers(tmp_path):
    plan = plan_for(tmp_path, moe_expert_parallel_size=2, pipe_parallel_size=2, pipe_partition_method="type:transformer",
                    num_gpus=4)
    per_layer = 3 * (4 * 64 * 2 * 64 * 2 + 8 * 8) // 2
    assert [s.moe_layers for s in plan.experts.stages] == [1, 1]
    assert [s.bytes_sent for s in plan.experts.stages] == [per_layer, per_layer]


def test_deepy_plan_prints_experts_per_rank_and_all_to_all(tmp_path, capsys):
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump({**MOE, "model_parallel_size": 2, "moe_expert_parallel_size": 2}))
    assert deepy.main(["plan", str(path), "--accelerator", "A100-40GB"]) == 0
    out = capsys.readouterr().out
    assert "dp 4 x tp 2 x pp 1; ep 2 (experts split over dp); ZeRO stage 1" in out
    assert ("73,728 per rank (E/ep = 4 of the 8 experts of each MoE layer on each rank, each split over the 2 tp "
            "ranks)") in out
    assert ("expert gradients are averaged over the dp/ep = 2 rank(s) holding the same experts, which also share "
            "their ZeRO-1 partition of gradients and optimizer states; the other parameters' over dp 4") in out
    sent = 2 * 3 * (4 * 64 * 2 * 64 * 2 + 8 * 8) // 2
    assert f"all-to-all   {sent:,} bytes (0 MiB) sent per rank per step under uniform routing" in out
    assert ("2 MoE layer(s) x 3 micro-batch(es) x [4 exchanges (tokens to their experts and back, forward and "
            "backward) x 64 tokens x top-2 x 64 hidden x 2 bytes + 1 x 8 int64 row counts] x 1/2") in out
    assert deepy.main(["plan", str(path), "--accelerator", "A100-40GB", "--moe_expert_parallel_size", "1"]) == 0
    assert "all-to-all   none (moe_expert_parallel_size 1: every rank holds all 8 experts)" in capsys.readouterr().out
