"""Hugging Face <-> neox for the mixture-of-experts layers of MixtralForCausalLM and Qwen2MoeForCausalLM: the config
keys of the router and experts, and one MoE layer's weights (neox/model/hf.py maps the rest of the model).

Weights (our stacked [experts, inner, hidden] tensors, neox/model/moe.py):
- files (hub checkpoints and what save_pretrained writes) hold one matrix per expert: Mixtral
  block_sparse_moe.experts.{e}.w1 / w3 / w2 = gate[e] / linear1[e] / linear2[e].T, router block_sparse_moe.gate;
  Qwen2-MoE mlp.experts.{e}.gate_proj / up_proj / down_proj the same, router mlp.gate, and its shared expert
  mlp.shared_expert.{gate,up,down}_proj and mlp.shared_expert_gate. Export writes this form;
- transformers 5 holds the experts fused in memory (mlp.experts.gate_up_proj [E, 2I, H] = cat(gate, up),
  mlp.experts.down_proj [E, H, I], router mlp.gate): a state_dict() taken from a live model imports too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from neox.config.errors import ConfigError
from neox.config.model import ModelConfig

MOE_ARCHES = ("mixtral", "qwen2_moe")


@dataclass(frozen=True)
class _Names:
    block: str  # the layer's MoE module path, after model.layers.{i}.
    gate: str  # per-expert module names of our gate / linear1 / linear2
    up: str
    down: str
    shared: bool  # a sigmoid-gated shared expert (mlp.shared_expert, mlp.shared_expert_gate)


_NAMES = {
    "mixtral": _Names("block_sparse_moe", "w1", "w3", "w2", shared=False),
    "qwen2_moe": _Names("mlp", "gate_proj", "up_proj", "down_proj", shared=True),
}
_SHARED = (("gate", "gate_proj"), ("linear1", "up_proj"), ("linear2", "down_proj"))


# ------------------------------------------------------------------------------------------ configs
def check_moe_exportable(cfg: ModelConfig, arch: str, need) -> None:
    """need(ok, key, why) for every MoE option `arch` cannot express (arch is a canonical name)."""
    if arch not in MOE_ARCHES:
        need(not cfg.moe_layer_indices, "moe_num_experts", f"{arch} has dense MLPs; MoE models export to "
             "mixtral (routed experts only) or qwen2_moe (with a shared expert)")
        return
    label = "Mixtral" if arch == "mixtral" else "Qwen2-MoE"
    need(bool(cfg.moe_layer_indices), "moe_num_experts", f"{label} is a mixture-of-experts model")
    need(cfg.moe_router_type == "topk", "moe_router_type", f"{label} routes by softmax top-k")
    need(cfg.gated_mlp, "activation", f"{label}'s experts are gated: one of swiglu, geglu, reglu, glu, bilinear")
    if arch == "mixtral":
        need(len(cfg.moe_layer_indices) == cfg.num_layers,
             "moe_layers" if cfg.moe_layers is not None else "moe_expert_interval",
             "every Mixtral layer is a MoE layer (set moe_expert_interval 1, moe_layers null; a model with dense "
             "layers exports to qwen2_moe)")
        need(cfg.moe_norm_topk_prob, "moe_norm_topk_prob", "Mixtral renormalises the top-k weights")
        need(cfg.moe_num_shared_experts == 0, "moe_num_shared_experts", "Mixtral has no shared expert; "
             "export to qwen2_moe")
    else:
        need(cfg.moe_num_shared_experts > 0, "moe_num_shared_experts", "Qwen2-MoE always adds its shared expert; "
             "export to mixtral")
        need(cfg.moe_shared_expert_gate, "moe_shared_expert_gate", "Qwen2-MoE gates its shared expert")


def moe_hf_config_kwargs(cfg: ModelConfig, arch: str) -> dict:
    """The MoE keys of `arch`'s HF config describing cfg (already vetted by check_moe_exportable)."""
    common = dict(num_experts_per_tok=cfg.moe_top_k, router_aux_loss_coef=cfg.moe_aux_loss_coeff)
    if arch == "mixtral":
        return dict(common, num_local_experts=cfg.moe_num_experts, intermediate_size=cfg.expert_inner_size,
                    router_jitter_noise=cfg.moe_jitter_eps or 0.0)
    moe_layers = set(cfg.moe_layer_indices)
    return dict(common, num_experts=cfg.moe_num_experts, moe_intermediate_size=cfg.expert_inner_size,
                norm_topk_prob=cfg.moe_norm_topk_prob, shared_expert_intermediate_size=cfg.shared_expert_inner_size,
                decoder_sparse_step=1, mlp_only_layers=[i for i in range(cfg.num_layers) if i not in moe_layers])


def moe_model_cfg_kwargs(hf_config, arch: str) -> dict:
    """The ModelConfig MoE keys of an HF Mixtral / Qwen2-MoE config."""
    common = dict(moe_router_type="topk", moe_top_k=hf_config.num_experts_per_tok,
                  moe_aux_loss_coeff=float(hf_config.router_aux_loss_coef))
    if arch == "mixtral":
        return dict(common, moe_num_experts=hf_config.num_local_experts, moe_norm_topk_prob=True,
                    moe_intermediate_size=hf_config.intermediate_size,
                    moe_jitter_eps=float(hf_config.router_jitter_noise) or None)
    skipped = set(hf_config.mlp_only_layers or ())
    layers = [i for i in range(hf_config.num_hidden_layers)
              if i not in skipped and (i + 1) % hf_config.decoder_sparse_step == 0]
    return dict(common, moe_num_experts=hf_config.num_experts, moe_norm_topk_prob=bool(hf_config.norm_topk_prob),
                moe_intermediate_size=hf_config.moe_intermediate_size, moe_num_shared_experts=1,
                moe_shared_expert_gate=True,
                moe_shared_expert_intermediate_size=hf_config.shared_expert_intermediate_size,
                moe_layers=None if len(layers) == hf_config.num_hidden_layers else layers)


# ------------------------------------------------------------------------------------------ weights
def moe_layer_to_hf(get, cfg: ModelConfig, arch: str, i: int) -> dict[str, torch.Tensor]:
    """Layer i's MoE weights in `arch`'s file form; get(neox key) reads our state dict."""
    names, ours, out = _NAMES[arch], f"blocks.{i}.mlp.", {}
    p = f"model.layers.{i}.{names.block}."
    out[p + "gate.weight"] = get(ours + "router.weight").clone()
    stacks = {name: get(f"{ours}experts.{name}.weight") for name in ("gate", "linear1", "linear2")}
    for e in range(cfg.moe_num_experts):
        out[f"{p}experts.{e}.{names.gate}.weight"] = stacks["gate"][e].clone()
        out[f"{p}experts.{e}.{names.up}.weight"] = stacks["linear1"][e].clone()
        out[f"{p}experts.{e}.{names.down}.weight"] = stacks["linear2"][e].t().contiguous()
    if names.shared:
        for mine, theirs in _SHARED:
            out[f"{p}shared_expert.{theirs}.weight"] = get(f"{ours}shared_expert.{mine}.weight").clone()
        out[p + "shared_expert_gate.weight"] = get(ours + "shared_expert_gate.weight").clone()
    return out


def moe_layer_from_hf(src, cfg: ModelConfig, arch: str, i: int) -> dict[str, torch.Tensor]:
    """Layer i's MoE weights from an HF state dict in file or fused (in-memory) form; src is neox.model.hf's
    _Source (keys read once each)."""
    names, ours, out = _NAMES[arch], f"blocks.{i}.mlp.", {}
    fused = f"model.layers.{i}.mlp.experts.gate_up_proj" in src.state_dict
    p = f"model.layers.{i}.mlp." if fused else f"model.layers.{i}.{names.block}."
    out[ours + "router.weight"] = src.get(p + "gate.weight").clone()
    if fused:
        gate_up = src.get(p + "experts.gate_up_proj")
        inner = gate_up.shape[1] // 2
        out[ours + "experts.gate.weight"] = gate_up[:, :inner].clone()
        out[ours + "experts.linear1.weight"] = gate_up[:, inner:].clone()
        out[ours + "experts.linear2.weight"] = src.get(p + "experts.down_proj").transpose(1, 2).contiguous()
    else:
        experts = range(cfg.moe_num_experts)
        for mine, theirs, transpose in (("gate", names.gate, False), ("linear1", names.up, False),
                                        ("linear2", names.down, True)):
            rows = [src.get(f"{p}experts.{e}.{theirs}.weight") for e in experts]
            out[f"{ours}experts.{mine}.weight"] = torch.stack([r.t() if transpose else r for r in rows]).contiguous()
    if names.shared:
        for mine, theirs in _SHARED:
            out[f"{ours}shared_expert.{mine}.weight"] = src.get(f"{p}shared_expert.{theirs}.weight").clone()
        out[ours + "shared_expert_gate.weight"] = src.get(p + "shared_expert_gate.weight").clone()
    expected = (cfg.moe_num_experts, cfg.expert_inner_size, cfg.hidden_size)
    if tuple(out[ours + "experts.linear1.weight"].shape) != expected:
        raise ConfigError(f"{arch} layer {i} experts have shape {tuple(out[ours + 'experts.linear1.weight'].shape)}, "
                          f"the config says {expected}: the weights do not match the config")
    return out
