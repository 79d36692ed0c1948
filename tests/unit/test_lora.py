"""LoRA on one process: the `lora` key, the adapter math against the dense W + (alpha/r) B A, what trains and what the
optimizer holds, and the export: PEFT (peft.PeftModel.from_pretrained on the Hugging Face base) and the merged model
give our logits for GPT-NeoX, Llama with grouped-query attention and GPT-2."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.lora_base import base_of, is_lora_checkpoint, write_base_record
from neox.config.errors import ConfigError
from neox.config.lora import check_lora_combinations, lora_settings
from neox.config.model import ModelConfig
from neox.config.optim import OptimConfig
from neox.config.train import TrainConfig
from neox.checkpoint.peft_export import CONFIG_FILE, WEIGHTS_FILE, write_peft_adapter
from neox.model import GPTNeoX
from neox.model.hf import model_cfg_to_hf_config, to_hf_state_dict
from neox.model.lora import LoraLinear, add_lora, adapter_state, merged_state
from neox.optim import configured_optimizer
from neox.parallel.lora import check_stage_trains
from neox.parallel.sharding import tp_split_dim

VOCAB = 96
ARCH_MODELS = {
    "gpt_neox": dict(pos_emb="rotary", rotary_pct=0.5, gpt_j_residual=True, activation="gelu"),
    "llama": dict(pos_emb="rotary", num_kv_heads=2, norm="rmsnorm", use_bias_in_norms=False, activation="swiglu",
                  use_bias_in_attn_linear=False, use_bias_in_mlp=False, no_weight_tying=True),
    "gpt2": dict(pos_emb="learned", activation="gelu_tanh"),
}


def _cfg(**changes) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, padded_vocab_size=VOCAB,
                       **changes)


def _adapted(cfg: ModelConfig, raw: dict) -> tuple[GPTNeoX, object]:
    settings = lora_settings(raw, cfg.gated_mlp)
    torch.manual_seed(0)
    model = add_lora(GPTNeoX(cfg), settings, seed=1)
    with torch.no_grad():  # as after training: B away from its zero start
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.2)
    return model.eval(), settings


@pytest.mark.parametrize(("raw", "message"), [
    ({"r": 0}, "lora.r"), ({"alpha": 0}, "lora.alpha"), ({"dropout": 1.0}, "lora.dropout"),
    ({"r": 2.5}, "lora.r"), ({"lora_alpha": 16}, "alpha"), ({"target_modules": ["q_proj", "v_proj"]}, "fused"),
    ({"target_modules": ["embed"]}, "not a linear layer"), ({"target_modules": []}, "non-empty"),
])
def test_bad_lora_settings_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        lora_settings(raw)


def test_target_names_map_to_our_linears():
    assert lora_settings({}).target_modules == ("query_key_value",)
    assert lora_settings({"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]}).target_modules \
        == ("query_key_value", "dense", "linear2")
    assert lora_settings({"target_modules": ["c_proj", "dense_h_to_4h"]}).target_modules == \
        ("dense", "linear1", "linear2")
    assert lora_settings({"target_modules": "all-linear"}, gated_mlp=False).target_modules == \
        ("query_key_value", "dense", "linear1", "linear2")
    with pytest.raises(ConfigError, match="not gated"):
        lora_settings({"target_modules": ["gate_proj"]}, gated_mlp=False)
    with pytest.raises(ConfigError, match="'load'"):
        TrainConfig(lora={"r": 4}).validate()
    whole = SimpleNamespace(train=TrainConfig(lora={"target_modules": ["gate"]}, load="base"), model=_cfg(),
                            mup=SimpleNamespace(use_mup=False))
    with pytest.raises(ConfigError, match="not gated"):  # the gate's existence, checked against the model
        check_lora_combinations(whole)
    whole.train, whole.mup.use_mup = TrainConfig(lora={}, load="base"), True
    with pytest.raises(ConfigError, match="use_mup"):
        check_lora_combinations(whole)


def test_adapter_adds_scaled_low_rank_product_and_only_adapters_train():
    cfg = _cfg(pos_emb="rotary", activation="swiglu")
    model, settings = _adapted(cfg, {"r": 4, "alpha": 16, "target_modules": ["all-linear"]})
    layer = model.blocks[0].mlp.gate
    assert isinstance(layer, LoraLinear) and layer.scaling == 4.0
    x = torch.randn(3, 5, 32)
    dense = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer(x), x @ dense.T + layer.bias, rtol=1e-5, atol=1e-6)
    # PEFT's kaiming-uniform(a=sqrt(5)) start: U(-1/sqrt(in), 1/sqrt(in)), drawn per layer from the seed alone
    fresh = add_lora(GPTNeoX(cfg), settings, seed=1).blocks[1].attention.dense
    assert fresh.lora_A.abs().max() <= 1 / math.sqrt(32) and fresh.lora_A.std() > 0.5 / math.sqrt(3 * 32)
    assert torch.count_nonzero(fresh.lora_B) == 0
    again = add_lora(GPTNeoX(cfg), settings, seed=1).blocks[1].attention.dense
    assert torch.equal(fresh.lora_A, again.lora_A)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if n.endswith(("lora_A", "lora_B"))}
    assert len(trainable) == 2 * 5 * 2  # two factors of five linears in two layers
    optimizer = configured_optimizer(model, OptimConfig(optimizer={"type": "adam", "params": {"lr": 1e-3}}), "cpu",
                                     None)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    adapter_numel = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    inner = cfg.mlp_inner_size  # r (in + out) per linear: qkv, dense, linear1, gate, linear2
    assert sum(p.numel() for p in held) == adapter_numel == 2 * 4 * ((32 + 96) + (32 + 32) + 2 * (32 + inner) +
                                                                     (inner + 32))
    model.train()
    model(torch.randint(0, VOCAB, (2, 8))).sum().backward()
    assert all((p.grad is not None) == (n in trainable) for n, p in model.named_parameters())


@pytest.fixture(scope="module", params=list(ARCH_MODELS))
def exported(request, tmp_path_factory):
    """(arch, our logits, PEFT's logits, the merged HF model's logits, the adapter dir) for one family."""
    from peft import PeftModel

    arch = request.param
    cfg = _cfg(**ARCH_MODELS[arch])
    raw = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["all-linear"]}
    model, settings = _adapted(cfg, raw)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(tokens)
    state = model.state_dict()
    base = {k: v for k, v in state.items() if k not in adapter_state(state)}
    out = tmp_path_factory.mktemp(arch) / "adapter"
    write_peft_adapter(out, cfg, settings, adapter_state(state), arch, "tiny-base")

    def hf_model(weights):
        hf = AutoModelForCausalLM.from_config(model_cfg_to_hf_config(cfg, arch))
        assert not hf.load_state_dict(to_hf_state_dict(cfg, weights, arch), strict=False).missing_keys
        return hf.eval()

    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(hf_model(base), str(out)).eval()(input_ids=tokens).logits
        merged_logits = hf_model(merged_state(base, adapter_state(state), settings))(input_ids=tokens).logits
        base_logits = hf_model(base)(input_ids=tokens).logits
    return arch, ours, peft_logits, merged_logits, base_logits, out


def test_peft_adapter_and_merged_export_give_our_logits(exported):
    arch, ours, peft_logits, merged_logits, base_logits, out = exported
    peft_diff = (peft_logits - ours).abs().max().item()
    merged_diff = (merged_logits - ours).abs().max().item()
    adapter_effect = (base_logits - ours).abs().max().item()
    print(f"{arch}: max |logit diff| PEFT {peft_diff:.2e}, merged {merged_diff:.2e} (the adapters move logits by "
          f"{adapter_effect:.2f})")
    assert adapter_effect > 0.1  # the comparison sees the adapters
    assert peft_diff < 1e-5 and merged_diff < 1e-5
    config = json.loads((out / CONFIG_FILE).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 4, 8.0, 0.1)
    assert config["base_model_name_or_path"] == "tiny-base" and (out / WEIGHTS_FILE).is_file()
    expected = {"gpt_neox": ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                             "mlp.dense_4h_to_h"],
                "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"],
                "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]}[arch]
    assert config["target_modules"] == expected


def test_adapters_split_with_their_base_layer_in_the_sharding_plan():
    assert tp_split_dim("blocks.0.attention.query_key_value.lora_A") is None  # column-parallel: A whole
    assert tp_split_dim("blocks.0.attention.query_key_value.lora_B") == 0  # B with W's output rows
    assert tp_split_dim("blocks.1.mlp.linear2.lora_A") == 1  # row-parallel: A with W's input columns
    assert tp_split_dim("blocks.1.mlp.linear2.lora_B") is None
    frozen_stage = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="type:transformer"):
        check_stage_trains(frozen_stage, 1, "uniform")


def test_checkpoint_names_its_base_and_a_missing_base_is_an_error(tmp_path):
    base, ckpt = tmp_path / "base", tmp_path / "run" / "global_step4"
    base.mkdir()
    ckpt.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="finetune: true"):
        base_of(ckpt)
    write_base_record(ckpt, base)
    assert is_lora_checkpoint(ckpt) and base_of(ckpt) == base
    base.rmdir()
    with pytest.raises(CheckpointError, match="is gone"):
        base_of(ckpt)
