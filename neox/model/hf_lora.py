"""Our LoRA adapters in PEFT's names for the exported Hugging Face class (GPTNeoXForCausalLM, LlamaForCausalLM,
GPT2LMHeadModel), so that peft.PeftModel.from_pretrained(base, adapter_dir) computes our logits.

PEFT keys are `base_model.model.<HF module path>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]) with
scaling lora_alpha / r, as ours. Our attention's fused query_key_value has one adapter; where the HF class has:
- one fused module in our layout (GPT-NeoX's query_key_value): the same A and B;
- three projections (Llama's q_proj, k_proj, v_proj): each the same A, and the q, k or v rows of B (the fused rows
  are a grouped interleave, neox/model/hf.py:split_qkv), since (B A) restricted to those rows is B_rows A;
- one fused module in another row order (GPT-2's c_attn, [q | k | v]): A, and B's rows in that order.
Each is exact: the exported adapter adds precisely our B A x to every output row.
"""
from __future__ import annotations

import torch

from neox.config.errors import ConfigError
from neox.config.lora import MODULE_PATHS, LoraSettings
from neox.config.model import ModelConfig
from neox.model.hf import check_exportable, hf_layer_names, split_qkv

_PREFIX = "base_model.model."
_QKV_HF = {"gpt_neox": ("attention.query_key_value",), "llama": ("self_attn.q_proj", "self_attn.k_proj",
                                                                 "self_attn.v_proj"), "gpt2": ("attn.c_attn",)}
_LAYER_PREFIX = {"gpt_neox": "gpt_neox.layers.{}.", "llama": "model.layers.{}.", "gpt2": "transformer.h.{}."}


def _check_adapter_arch(arch: str) -> None:
    if arch not in _LAYER_PREFIX:
        raise ConfigError(f"LoRA adapters export as PEFT adapters for {', '.join(_LAYER_PREFIX)} only, not {arch}; "
                          "export the model with the adapters merged in (--merge) instead")


def peft_target_modules(settings: LoraSettings, arch: str) -> list[str]:
    """The HF module names (layer-relative paths, which PEFT matches as suffixes) the adapters sit on."""
    _check_adapter_arch(arch)
    names = hf_layer_names(arch, 0)
    prefix = _LAYER_PREFIX[arch].format(0)
    targets: list[str] = []
    for target in settings.target_modules:
        if target == "query_key_value":
            targets += _QKV_HF[arch]
        else:
            targets.append(names[MODULE_PATHS[target]][len(prefix):])
    return targets


def to_peft_state_dict(cfg: ModelConfig, settings: LoraSettings, adapters: dict[str, torch.Tensor],
                       arch: str) -> dict[str, torch.Tensor]:
    """Our adapters (single-device names: blocks.N.attention.query_key_value.lora_A, ...) -> PEFT's state dict."""
    arch = check_exportable(cfg, arch)
    _check_adapter_arch(arch)
    out: dict[str, torch.Tensor] = {}

    def put(module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        out[f"{_PREFIX}{module}.lora_A.weight"] = a.contiguous().clone()
        out[f"{_PREFIX}{module}.lora_B.weight"] = b.contiguous().clone()

    for i in range(cfg.num_layers):
        names, prefix = hf_layer_names(arch, i), _LAYER_PREFIX[arch].format(i)
        for target in settings.target_modules:
            path = MODULE_PATHS[target]
            a, b = adapters[f"blocks.{i}.{path}.lora_A"], adapters[f"blocks.{i}.{path}.lora_B"]
            if target != "query_key_value":
                put(names[path], a, b)
            elif arch == "gpt_neox":
                put(prefix + _QKV_HF[arch][0], a, b)
            elif arch == "llama":
                for module, rows in zip(_QKV_HF[arch], split_qkv(b, cfg.kv_heads, cfg.head_dim)):
                    put(prefix + module, a, rows)
            else:
                put(prefix + _QKV_HF[arch][0], a, torch.cat(split_qkv(b, cfg.kv_heads, cfg.head_dim)))
    return out


def peft_config(settings: LoraSettings, arch: str, base_model_name_or_path: str) -> dict:
    """adapter_config.json: PEFT's LoraConfig fields for these adapters."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": settings.r, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": peft_target_modules(settings, arch), "bias": "none",
        "fan_in_fan_out": arch == "gpt2",  # GPT-2's Conv1D stores its weight [in, out]; the adapters are as ours
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
        "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {},
    }
