"""neox/plan pieces against references: the model's own parameters, autograd's saved tensors, option parsing."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from neox.config import ConfigError
from neox.config.model import ModelConfig
from neox.model import GPTNeoX
from neox.plan.cli import pull_plan_options
from neox.plan.memory import layer_activation_elements
from neox.plan.params import BLOCK_LAYER, model_params

VARIANTS = {
    "pythia": dict(pos_emb="rotary", rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True),
    "gpt2-tied-learned": dict(pos_emb="learned", gpt_j_residual=False, no_weight_tying=False),
    "llama-gqa-swiglu": dict(pos_emb="rotary", num_kv_heads=2, activation="swiglu", norm="rmsnorm",
                             use_bias_in_norms=False, use_bias_in_attn_linear=False, use_bias_in_mlp=False,
                             no_weight_tying=True, intermediate_size=352),
}


def model_config(variant: str, **extra) -> ModelConfig:
    base = dict(num_layers=3, hidden_size=64, num_attention_heads=8, seq_length=32, max_position_embeddings=48,
                padded_vocab_size=256)
    return ModelConfig(**{**base, **VARIANTS[variant], **extra})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_count_equals_the_model(variant):
    cfg = model_config(variant)
    built = sum(p.numel() for p in GPTNeoX(cfg).parameters())
    assert model_params(cfg, tp=1, pp=1, partition_method="parameters").total == built


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pipeline_stages_hold_every_layer_once(variant):
    cfg = model_config(variant, num_layers=6)
    plan = model_params(cfg, tp=2, pp=3, partition_method="type:transformer")
    assert [s.blocks for s in plan.stages] == [2, 2, 2]
    assert plan.stages[0].is_first and plan.stages[-1].is_last
    kinds = [layer.kind for s in plan.stages for layer in s.layers]
    assert kinds.count(BLOCK_LAYER) == 6 and len(kinds) == 6 + 3
    # tp 2 halves the tables and the split matrices; the tied head is a second table copy on the last stage.
    table = cfg.padded_vocab_size * cfg.hidden_size
    assert plan.stages[-1].layers[-1].per_tp_rank == table // 2


def saved_bytes(model: torch.nn.Module, forward: Callable[[], object]) -> int:
    """Bytes of the storages autograd saves for backward while `forward` runs, model's weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def saved_elements_per_token(cfg: ModelConfig) -> float:
    """Bytes autograd saves for one block's backward (weights excluded), per token per hidden unit per element."""
    torch.manual_seed(0)
    model = GPTNeoX(cfg).train()
    batch, seq = 4, cfg.seq_length
    x = torch.randn(batch, seq, cfg.hidden_size, requires_grad=True)
    position_ids = torch.arange(seq).expand(batch, seq)
    return saved_bytes(model, lambda: model.blocks[0](x, position_ids)) / (batch * seq * cfg.hidden_size * 4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_activation_count_matches_autograd(variant):
    cfg = model_config(variant)
    assert layer_activation_elements(cfg, tp=1) == pytest.approx(saved_elements_per_token(cfg), rel=0.10)


def test_plan_options_come_out_of_the_overrides():
    options, rest = pull_plan_options(["--accelerator", "A100-80GB", "--num_gpus", "8", "--mfu=0.3",
                                       "--nodes", "2", "--baseline-mb", "400"])
    assert (options.accelerator, options.mfu, options.nodes, options.baseline_mb) == ("A100-80GB", 0.3, 2, 400.0)
    assert rest == ["--num_gpus", "8"]


@pytest.mark.parametrize("argv, message", [
    (["--mfu", "lots"], "--mfu expects a float"),
    (["--nodes"], "--nodes needs a value"),
])
def test_bad_plan_options_name_the_option(argv, message):
    with pytest.raises(ConfigError, match=message):
        pull_plan_options(argv)
