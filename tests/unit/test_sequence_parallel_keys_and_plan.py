"""sequence_parallel as a config key (gpt-neox's name, type and default), the checks that name the keys, the DeepSpeed
pipeline settings it needs, and `deepy plan`'s activation memory with and without it against hand arithmetic.
(The layers, the model and training on real ranks: tests/distributed/test_sequence_parallel.py.)"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from neox.config import ConfigError, load_config
from neox.config.deepspeed import deepspeed_config
from neox.config.gpt_neox_keys import MISSING_KEYS
from neox.plan.plan import PlanOptions, build_plan
from neox.plan.report import format_plan

MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "num_gpus": 4,
         "padded_vocab_size": 128}
CURRICULUM = {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": 8, "max_difficulty": 32,
              "schedule_type": "fixed_linear", "schedule_config": {"total_curriculum_step": 10, "difficulty_step": 8}}


def load(tmp_path: Path, extra: dict[str, Any]):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({**MODEL, **extra}))
    return load_config([path], local_gpus=0)


def test_sequence_parallel_is_a_parallel_key_with_no_effect_at_tp1(tmp_path):
    assert "sequence_parallel" not in MISSING_KEYS
    assert load(tmp_path, {}).parallel.sequence_parallel is False  # gpt-neox's default
    on = load(tmp_path, {"sequence_parallel": True, "model_parallel_size": 2}).parallel
    assert on.sequence_parallel and on.shards_sequence
    alone = load(tmp_path, {"sequence_parallel": True}).parallel
    assert alone.sequence_parallel and not alone.shards_sequence


@pytest.mark.parametrize(("extra", "named"), [
    ({"model_parallel_size": 4, "seq_length": 30}, "'seq_length' (30)"),
    ({"model_parallel_size": 2, "curriculum_learning": {**CURRICULUM, "schedule_config": {
        "total_curriculum_step": 10, "difficulty_step": 7}}}, "'curriculum_learning.schedule_config.difficulty_step'"),
    ({"model_parallel_size": 2, "curriculum_learning": {**CURRICULUM, "max_difficulty": 31}},
     "'curriculum_learning.max_difficulty' is 31"),
    ({"model_parallel_size": 2, "curriculum_learning": {**CURRICULUM, "schedule_type": "fixed_discrete",
                                                        "schedule_config": {"difficulty": [8, 15, 32],
                                                                            "max_step": [2, 4]}}},
     "'curriculum_learning.schedule_config.difficulty[1]' is 15"),
])
def test_sequences_that_do_not_split_over_tp_are_refused_naming_the_keys(tmp_path, extra, named):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, {"sequence_parallel": True, **extra})
    message = str(err.value)
    assert named in message and "'sequence_parallel'" in message and "'model_parallel_size'" in message
    load(tmp_path, {**extra, "sequence_parallel": False})  # the same without it is fine


def test_pipeline_sends_each_ranks_sequence_shard_whole(tmp_path):
    pipe = {"model_parallel_size": 2, "pipe_parallel_size": 2}
    assert deepspeed_config(load(tmp_path, {**pipe, "sequence_parallel": True}), cuda_available=False)[
        "pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
    assert "pipeline" not in deepspeed_config(load(tmp_path, pipe), cuda_available=False)


# A 350M-sized model at tp 4 (bf16, sequential residual, LayerNorm, 4h GELU MLP): T x h x 2 bytes = 4 x 2048 x 1024 x 2
# = 16 MiB per [tokens, hidden] activation.
PLAN_MODEL = {"num_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "seq_length": 2048,
              "max_position_embeddings": 2048, "padded_vocab_size": 51200, "train_micro_batch_size_per_gpu": 4,
              "gradient_accumulation_steps": 1, "num_gpus": 8, "model_parallel_size": 4, "precision": "bfloat16",
              "bf16": {"enabled": True}, "gpt_j_residual": False, "norm": "layernorm", "train_iters": 10}
TH = 4 * 2048 * 1024 * 2
LOGITS = 4 * 2048 * (51200 // 4) * (2 + 3 * 4 + 4 + 2)  # vocab_parallel_cross_entropy's per-logit bytes at bf16


def test_plan_shows_the_activation_memory_sequence_parallelism_saves(tmp_path):
    """Per block, without sequence parallelism: 4 replicated [T, h] tensors (block input, both norm outputs, x + attn)
    and 3 + 2 attention + 8 MLP ones split over tp: 4 + 13/4 = 7.25; with it all of them are split: 17/4 = 4.25.
    The replicated 4 x 2 bytes x sbh are Megatron's 10 sbh of LayerNorm and dropout activations without the two
    dropout masks (the plan counts a dropout-free run). The final norm's input and output are split too."""
    path = tmp_path / "c.yml"
    plans = {}
    for sp in (False, True):
        path.write_text(yaml.safe_dump({**PLAN_MODEL, "sequence_parallel": sp}))
        plans[sp] = build_plan(load_config([path], local_gpus=0), PlanOptions(accelerator="A100-40GB"))
    off, on = plans[False].ranks[0], plans[True].ranks[0]
    assert (off.activations.per_layer_elements, on.activations.per_layer_elements) == (7.25, 4.25)
    assert off.activations.without_checkpointing == 24 * 7.25 * TH + 2 * TH + LOGITS
    assert on.activations.without_checkpointing == 24 * 4.25 * TH + 2 * TH / 4 + LOGITS
    # Checkpointed: each block's input (a shard with sequence parallelism) plus one block recomputed.
    assert off.activations.with_checkpointing == 24 * TH + 7.25 * TH + 2 * TH + LOGITS
    assert on.activations.with_checkpointing == 24 * TH / 4 + 4.25 * TH + 2 * TH / 4 + LOGITS
    assert on.activations_other_sp == off.activations and off.activations_other_sp == on.activations
    saved = 24 * 3 * TH + 1.5 * TH  # 1,176 MiB
    assert off.activations.without_checkpointing - on.activations.without_checkpointing == saved
    text = format_plan(plans[True])
    assert "activations with sequence_parallel off      4.70 GiB" in text
    assert "sequence_parallel on: stage 0's activations are 3.55 GiB with it, 4.70 GiB without (it saves 1.15 GiB " \
           "per rank)" in text
    assert "activations with sequence_parallel on" in format_plan(plans[False])
