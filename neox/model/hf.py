"""Hugging Face <-> neox: configs and weights for GPTNeoXForCausalLM, LlamaForCausalLM, GPT2LMHeadModel, and the
Llama family's MistralForCausalLM (sliding window), MixtralForCausalLM and Qwen2MoeForCausalLM (their MoE layers:
neox/model/hf_moe.py).

Conventions:
- Vocabulary: the neox embedding and head have `padded_vocab_size` rows, HF has `vocab_size`. Import pads
  with zero rows (a padded id is never produced by the tokenizer; its logit is 0, so slice logits to the
  tokenizer's vocab before sampling). Export trims to `vocab_size` (default: keep all padded rows).
- Biases neox leaves out but the HF class always has (GPT-NeoX MLP/norms, every GPT-2 bias) export as
  zeros, which computes the same function; biases HF leaves out (Llama norms) are a ConfigError.
- Tied heads: the state dicts carry both the embedding and the head key, sharing one tensor, as
  `nn.Module.state_dict()` does; a tied HF checkpoint missing its head key is accepted.
- Qwen2-MoE's o_proj has no bias while its q/k/v have one (qkv_bias): import gives attention.dense a zero bias;
  export refuses a non-zero one.
- Training-only options (dropout, init, activation checkpointing, MoE capacity and jitter) do not stop an export.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, MixtralConfig, PretrainedConfig,
                          Qwen2MoeConfig)

from neox.config.errors import ConfigError
from neox.config.model import ModelConfig
from neox.model.hf_moe import (MOE_ARCHES, check_moe_exportable, moe_hf_config_kwargs, moe_layer_from_hf,
                               moe_layer_to_hf, moe_model_cfg_kwargs)

ARCHES = ("gpt_neox", "llama", "gpt2", "mistral", "mixtral", "qwen2_moe")
HF_CLASSES = {"gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel",
              "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
_ARCH_ALIASES = {**{a: a for a in ARCHES}, **{cls: a for a, cls in HF_CLASSES.items()}}


@dataclass(frozen=True)
class _LlamaLike:
    """What a member of the Llama family (model.layers.N.self_attn.q_proj ..., RMSNorm, gated MLP) adds or lacks."""

    config_class: type
    attn_bias_key: str | None  # the HF key for q/k/v biases (None: never biased)
    dense_bias: bool  # o_proj has a bias when q/k/v have one
    mlp_bias_key: str | None
    sliding_window: bool  # one sliding window for every layer (HF sliding_window = our width + 1)


_LLAMA_LIKE = {
    "llama": _LlamaLike(LlamaConfig, "attention_bias", True, "mlp_bias", sliding_window=False),
    "mistral": _LlamaLike(MistralConfig, None, False, None, sliding_window=True),
    "mixtral": _LlamaLike(MixtralConfig, None, False, None, sliding_window=True),
    "qwen2_moe": _LlamaLike(Qwen2MoeConfig, "qkv_bias", False, None, sliding_window=False),
}
# neox activation -> HF hidden_act, for plain MLPs (GPT-NeoX, GPT-2) and for Llama's gated MLP.
_PLAIN_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu", "swish": "silu",
                "mish": "mish"}
_GATED_TO_HF = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu", "glu": "sigmoid", "bilinear": "linear"}
_HF_TO_PLAIN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                "silu": "silu", "swish": "silu", "mish": "mish"}
_HF_TO_GATED = {hf: ours for ours, hf in _GATED_TO_HF.items()}
# Buffers some HF checkpoints carry; they hold no weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias", ".attn.bias",
                     ".attn.masked_bias")

StateDict = dict[str, torch.Tensor]


def canonical_arch(arch: str) -> str:
    if arch not in _ARCH_ALIASES:
        raise ConfigError(f"unknown Hugging Face architecture {arch!r}; choose one of {', '.join(ARCHES)}")
    return _ARCH_ALIASES[arch]


def _round_up(n: int, multiple: int) -> int:
    return multiple * ((n + multiple - 1) // multiple)


# ------------------------------------------------------------------------------------------ configs
def check_exportable(cfg: ModelConfig, arch: str) -> str:
    """Raise ConfigError naming the first key `arch` cannot express; return the canonical arch name."""
    arch = canonical_arch(arch)
    cfg.validate()
    if cfg.pos_emb not in ("rotary", "learned"):
        raise ConfigError(f"'pos_emb: {cfg.pos_emb}' has no Hugging Face equivalent among {', '.join(ARCHES)}")

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"'{key}: {getattr(cfg, key)}' cannot be exported to {arch}: {why}")

    # gpt-neox options no exported class computes (apply_query_key_layer_scaling only reorders the arithmetic of
    # rotary/learned attention, and the checkpointing and parallel-layout keys change no function: they pass).
    need(all(kind in ("global", "flash") for kind in cfg.attention_types), "attention_config",
         "Hugging Face attention is global; 'local' layers have no equivalent")
    need(cfg.sliding_window_width is None or (arch in _LLAMA_LIKE and _LLAMA_LIKE[arch].sliding_window),
         "sliding_window_width", f"{arch} attends to every earlier token; export to mistral or mixtral")
    need(not cfg.use_qk_layernorm, "use_qk_layernorm", "the exported classes have no query/key norm")
    need(cfg.num_unique_layers in (None, cfg.num_layers), "num_unique_layers",
         "the exported classes give every layer its own weights")
    need(not (cfg.gpt_j_residual and cfg.gpt_j_tied), "gpt_j_tied", "the exported classes have two norms per layer")
    need(cfg.opt_pos_emb_offset == 0, "opt_pos_emb_offset", "the exported classes read position p from row p")
    check_moe_exportable(cfg, arch, need)

    if arch == "gpt_neox":
        need(cfg.pos_emb == "rotary", "pos_emb", "GPT-NeoX uses rotary positions")
        need(cfg.norm == "layernorm", "norm", "GPT-NeoX uses LayerNorm")
        need(cfg.kv_heads == cfg.num_attention_heads, "num_kv_heads", "GPT-NeoX has no grouped-query attention")
        need(cfg.activation in _PLAIN_TO_HF, "activation", f"GPT-NeoX takes one of {sorted(_PLAIN_TO_HF)}")
    elif arch in _LLAMA_LIKE:
        family = _LLAMA_LIKE[arch]
        need(cfg.pos_emb == "rotary", "pos_emb", f"{arch} uses rotary positions")
        need(cfg.rotary_pct == 1.0, "rotary_pct", f"{arch} rotates whole heads")
        need(cfg.norm == "rmsnorm", "norm", f"{arch} uses RMSNorm")
        need(not cfg.use_bias_in_norms, "use_bias_in_norms", f"{arch}'s RMSNorm has no bias")
        need(not cfg.gpt_j_residual, "gpt_j_residual", f"{arch} uses the sequential residual")
        need(cfg.activation in _GATED_TO_HF, "activation", f"{arch}'s MLP is gated: one of {sorted(_GATED_TO_HF)}")
        need(family.attn_bias_key is not None or not cfg.use_bias_in_attn_linear, "use_bias_in_attn_linear",
             f"{arch}'s attention projections have no biases")
        need(family.mlp_bias_key is not None or not cfg.use_bias_in_mlp, "use_bias_in_mlp",
             f"{arch}'s MLP projections have no biases")
    else:
        need(cfg.pos_emb == "learned", "pos_emb", "GPT-2 uses learned positions")
        need(cfg.norm == "layernorm", "norm", "GPT-2 uses LayerNorm")
        need(cfg.kv_heads == cfg.num_attention_heads, "num_kv_heads", "GPT-2 has no grouped-query attention")
        need(not cfg.gpt_j_residual, "gpt_j_residual", "GPT-2 uses the sequential residual")
        need(cfg.activation in _PLAIN_TO_HF, "activation", f"GPT-2 takes one of {sorted(_PLAIN_TO_HF)}")
    return arch


def model_cfg_to_hf_config(cfg: ModelConfig, arch: str, vocab_size: int | None = None) -> PretrainedConfig:
    """The HF config of `arch` describing `cfg`; vocab_size defaults to padded_vocab_size."""
    arch = check_exportable(cfg, arch)
    vocab = vocab_size if vocab_size is not None else cfg.padded_vocab_size
    if vocab is None or (cfg.padded_vocab_size is not None and vocab > cfg.padded_vocab_size):
        raise ConfigError(f"vocab_size {vocab} must be set and <= 'padded_vocab_size' ({cfg.padded_vocab_size})")
    tie = not cfg.no_weight_tying
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.mlp_inner_size,
            hidden_act=_PLAIN_TO_HF[cfg.activation],
            max_position_embeddings=cfg.max_positions,
            layer_norm_eps=cfg.layernorm_epsilon,
            use_parallel_residual=cfg.gpt_j_residual,
            attention_bias=cfg.use_bias_in_attn_linear,
            rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_emb_base),
                             "partial_rotary_factor": cfg.rotary_pct},
            attention_dropout=cfg.attention_dropout,
            hidden_dropout=cfg.hidden_dropout,
            tie_word_embeddings=tie,
            bos_token_id=None,
            eos_token_id=None,
        )
    if arch in _LLAMA_LIKE:
        family = _LLAMA_LIKE[arch]
        extra = {key: value for key, value in ((family.attn_bias_key, cfg.use_bias_in_attn_linear),
                                               (family.mlp_bias_key, cfg.use_bias_in_mlp)) if key is not None}
        if family.sliding_window:
            extra["sliding_window"] = None if cfg.sliding_window_width is None else cfg.sliding_window_width + 1
        if arch in MOE_ARCHES:
            extra.update(moe_hf_config_kwargs(cfg, arch))
        return family.config_class(**{
            "vocab_size": vocab,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.mlp_inner_size,
            "hidden_act": _GATED_TO_HF[cfg.activation],
            "max_position_embeddings": cfg.max_positions,
            "rms_norm_eps": cfg.rms_norm_epsilon,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rotary_emb_base)},
            "attention_dropout": cfg.attention_dropout,
            "tie_word_embeddings": tie,
            "bos_token_id": None,
            "eos_token_id": None,
            **extra,
        })
    return GPT2Config(
        vocab_size=vocab,
        n_positions=cfg.max_positions,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads,
        n_inner=cfg.mlp_inner_size,
        activation_function="gelu_new" if cfg.activation == "gelu_tanh" else _PLAIN_TO_HF[cfg.activation],
        layer_norm_epsilon=cfg.layernorm_epsilon,
        resid_pdrop=cfg.hidden_dropout,
        embd_pdrop=cfg.hidden_dropout,
        attn_pdrop=cfg.attention_dropout,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=None,
    )


def hf_config_to_model_cfg(hf_config: PretrainedConfig, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """The ModelConfig computing the same function as `hf_config` (padded vocab rounded up)."""
    arch = canonical_arch(hf_config.model_type)
    tie = bool(getattr(hf_config, "tie_word_embeddings", arch == "gpt2"))
    padded = _round_up(hf_config.vocab_size, make_vocab_size_divisible_by)
    common = dict(make_vocab_size_divisible_by=make_vocab_size_divisible_by, padded_vocab_size=padded,
                  no_weight_tying=not tie, init_method_std=hf_config.initializer_range)

    def act(table: dict[str, str], name: str) -> str:
        if name not in table:
            raise ConfigError(f"{arch} hidden_act {name!r} has no neox equivalent; supported: {sorted(table)}")
        return table[name]

    if arch != "gpt2":
        rope = dict(hf_config.rope_parameters or {})
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"{arch} rope_parameters.rope_type {rope['rope_type']!r} (RoPE scaling) is not "
                              "supported; only 'default' rotary embeddings load")
    if arch == "gpt_neox":
        cfg = ModelConfig(
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            num_attention_heads=hf_config.num_attention_heads,
            seq_length=hf_config.max_position_embeddings,
            max_position_embeddings=hf_config.max_position_embeddings,
            pos_emb="rotary",
            rotary_pct=rope.get("partial_rotary_factor", 1.0),
            rotary_emb_base=rope.get("rope_theta", 10000.0),
            norm="layernorm",
            layernorm_epsilon=hf_config.layer_norm_eps,
            gpt_j_residual=hf_config.use_parallel_residual,
            activation=act(_HF_TO_PLAIN, hf_config.hidden_act),
            intermediate_size=hf_config.intermediate_size,
            use_bias_in_attn_linear=hf_config.attention_bias,
            attention_dropout=float(hf_config.attention_dropout),
            hidden_dropout=float(hf_config.hidden_dropout),
            **common,
        )
    elif arch in _LLAMA_LIKE:
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        if head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
            raise ConfigError(f"{arch} head_dim {head_dim} x num_attention_heads {hf_config.num_attention_heads} != "
                              f"hidden_size {hf_config.hidden_size}: decoupled head sizes are not supported")
        cfg = ModelConfig(
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            num_attention_heads=hf_config.num_attention_heads,
            num_kv_heads=hf_config.num_key_value_heads,
            seq_length=hf_config.max_position_embeddings,
            max_position_embeddings=hf_config.max_position_embeddings,
            pos_emb="rotary",
            rotary_pct=1.0,
            rotary_emb_base=rope.get("rope_theta", 10000.0),
            norm="rmsnorm",
            rms_norm_epsilon=hf_config.rms_norm_eps,
            use_bias_in_norms=False,
            gpt_j_residual=False,
            activation=act(_HF_TO_GATED, hf_config.hidden_act),
            # gpt-neox sizes gated MLPs as int(2/3 * intermediate_size) // 2; 3x gives HF's width exactly.
            intermediate_size=3 * hf_config.intermediate_size,
            attention_dropout=float(hf_config.attention_dropout),
            **_llama_like_keys(hf_config, arch),
            **common,
        )
    else:
        if hf_config.scale_attn_by_inverse_layer_idx or not hf_config.scale_attn_weights:
            raise ConfigError("gpt2 scale_attn_by_inverse_layer_idx / scale_attn_weights=False change the attention "
                              "scale and are not supported")
        if getattr(hf_config, "add_cross_attention", False):
            raise ConfigError("gpt2 add_cross_attention: encoder-decoder GPT-2 is not supported")
        activation = hf_config.activation_function
        cfg = ModelConfig(
            num_layers=hf_config.n_layer,
            hidden_size=hf_config.n_embd,
            num_attention_heads=hf_config.n_head,
            seq_length=hf_config.n_positions,
            max_position_embeddings=hf_config.n_positions,
            pos_emb="learned",
            norm="layernorm",
            layernorm_epsilon=hf_config.layer_norm_epsilon,
            gpt_j_residual=False,
            activation=act(_HF_TO_PLAIN, activation),
            intermediate_size=hf_config.n_inner or 4 * hf_config.n_embd,
            attention_dropout=float(hf_config.attn_pdrop),
            hidden_dropout=float(hf_config.resid_pdrop),
            **common,
        )
    cfg.validate()
    return cfg


def _llama_like_keys(hf_config: PretrainedConfig, arch: str) -> dict:
    """The ModelConfig keys in which the members of the Llama family differ."""
    family = _LLAMA_LIKE[arch]
    keys = {"use_bias_in_attn_linear": bool(getattr(hf_config, family.attn_bias_key or "", False)),
            "use_bias_in_mlp": bool(getattr(hf_config, family.mlp_bias_key or "", False))}
    if family.sliding_window and hf_config.sliding_window is not None:
        keys["sliding_window_width"] = hf_config.sliding_window - 1
    layer_types = set(getattr(hf_config, "layer_types", None) or ())
    if not family.sliding_window and layer_types - {"full_attention"}:
        raise ConfigError(f"{arch} layer_types {sorted(layer_types)}: sliding-window layers among full-attention "
                          "ones (use_sliding_window) are not supported; neox slides the window on every layer or none")
    if arch in MOE_ARCHES:
        keys.update(moe_model_cfg_kwargs(hf_config, arch))
    return keys


# ------------------------------------------------------------------------------------------ weights
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Separate q/k/v rows (weights [rows, in] or biases [rows]) -> neox's grouped interleave."""
    rest = q.shape[1:]
    q = q.reshape(kv_heads, -1, head_dim, *rest)
    k = k.reshape(kv_heads, 1, head_dim, *rest)
    v = v.reshape(kv_heads, 1, head_dim, *rest)
    return torch.cat((q, k, v), dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv."""
    rest = qkv.shape[1:]
    grouped = qkv.reshape(kv_heads, -1, head_dim, *rest)
    q_per_group = grouped.shape[1] - 2
    q = grouped[:, :q_per_group].reshape(-1, *rest)
    return q, grouped[:, q_per_group].reshape(-1, *rest), grouped[:, q_per_group + 1].reshape(-1, *rest)


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t[:rows].clone()
    return torch.cat((t, t.new_zeros(rows - t.shape[0], *t.shape[1:])))


class _Source:
    """Reads keys from a state dict once each; leftovers at the end are a mapping bug or a foreign file."""

    def __init__(self, state_dict: StateDict, origin: str):
        self.state_dict = state_dict
        self.origin = origin
        self.unused = set(state_dict)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.state_dict:
            raise ConfigError(f"{self.origin} state dict has no '{key}': the weights do not match the config")
        self.unused.discard(key)
        return self.state_dict[key]

    def optional(self, key: str) -> torch.Tensor | None:
        return self.get(key) if key in self.state_dict else None

    def finish(self) -> None:
        left = sorted(k for k in self.unused if not k.endswith(_IGNORED_SUFFIXES))
        if left:
            raise ConfigError(f"{self.origin} state dict has {len(left)} unexpected keys, e.g. {left[:3]}: the "
                              "weights do not match the config")


def hf_layer_names(arch: str, i: int) -> dict[str, str]:
    """Layer i's HF module paths of our block modules (input_layernorm, attention.dense, mlp.linear1, ...), except
    query_key_value: GPT-NeoX's is one module of the same name, Llama's three (q/k/v_proj), GPT-2's c_attn."""
    return _hf_names(canonical_arch(arch), i)


def _hf_names(arch: str, i: int) -> dict[str, str]:
    """Per-layer HF key for each neox block sub-key (without .weight / .bias)."""
    if arch == "gpt_neox":
        p = f"gpt_neox.layers.{i}."
        return {"input_layernorm": p + "input_layernorm", "post_attention_layernorm": p + "post_attention_layernorm",
                "attention.dense": p + "attention.dense", "mlp.linear1": p + "mlp.dense_h_to_4h",
                "mlp.linear2": p + "mlp.dense_4h_to_h"}
    if arch in _LLAMA_LIKE:
        p = f"model.layers.{i}."
        return {"input_layernorm": p + "input_layernorm", "post_attention_layernorm": p + "post_attention_layernorm",
                "attention.dense": p + "self_attn.o_proj", "mlp.linear1": p + "mlp.up_proj",
                "mlp.gate": p + "mlp.gate_proj", "mlp.linear2": p + "mlp.down_proj"}
    p = f"transformer.h.{i}."
    return {"input_layernorm": p + "ln_1", "post_attention_layernorm": p + "ln_2", "attention.dense": p + "attn.c_proj",
            "mlp.linear1": p + "mlp.c_fc", "mlp.linear2": p + "mlp.c_proj"}


_TOP_LEVEL = {
    "gpt_neox": {"embed": "gpt_neox.embed_in.weight", "final_norm": "gpt_neox.final_layer_norm"},
    **{arch: {"embed": "model.embed_tokens.weight", "final_norm": "model.norm"} for arch in _LLAMA_LIKE},
    "gpt2": {"embed": "transformer.wte.weight", "final_norm": "transformer.ln_f",
             "positions": "transformer.wpe.weight"},
}


def to_hf_state_dict(cfg: ModelConfig, state_dict: StateDict, arch: str, vocab_size: int | None = None) -> StateDict:
    """neox weights -> the HF `arch` state dict (vocab rows trimmed to vocab_size if given)."""
    arch = check_exportable(cfg, arch)
    src = _Source(state_dict, "neox")
    vocab = vocab_size if vocab_size is not None else cfg.padded_vocab_size
    if vocab is None or vocab > cfg.padded_vocab_size:
        raise ConfigError(f"vocab_size {vocab} must be <= 'padded_vocab_size' ({cfg.padded_vocab_size})")
    conv1d = arch == "gpt2"  # GPT-2's Conv1D stores weights as [in, out]
    out: StateDict = {}

    def put(hf_key: str, ours_key: str, bias_rows: int | None = None) -> None:
        """Copy ours_key.weight/.bias to hf_key; a missing bias becomes zeros when bias_rows is given."""
        weight = src.get(ours_key + ".weight")
        out[hf_key + ".weight"] = weight.t().contiguous() if conv1d and weight.dim() == 2 else weight.clone()
        bias = src.optional(ours_key + ".bias")
        if bias is not None:
            out[hf_key + ".bias"] = bias.clone()
        elif bias_rows is not None:
            out[hf_key + ".bias"] = weight.new_zeros(bias_rows)

    top = _TOP_LEVEL[arch]
    embed = _resize_rows(src.get("embedding.word_embeddings.weight"), vocab)
    out[top["embed"]] = embed
    if "positions" in top:
        out[top["positions"]] = src.get("embedding.position_embeddings.weight").clone()
    h, kv, d = cfg.hidden_size, cfg.kv_heads, cfg.head_dim
    llama_like = arch in _LLAMA_LIKE
    norm_bias = None if llama_like else h  # GPT-NeoX and GPT-2 norms always have a bias
    moe_layers = set(cfg.moe_layer_indices)
    for i in range(cfg.num_layers):
        names = _hf_names(arch, i)
        b = f"blocks.{i}."
        for ours_name in ("input_layernorm", "post_attention_layernorm"):
            put(names[ours_name], b + ours_name, norm_bias)
        zero_mlp_bias = not llama_like and not cfg.use_bias_in_mlp
        if i in moe_layers:
            out.update(moe_layer_to_hf(src.get, cfg, arch, i))
        for ours_name in ("mlp.linear1", "mlp.gate", "mlp.linear2"):
            if ours_name in names and i not in moe_layers:
                rows = (h if ours_name == "mlp.linear2" else cfg.mlp_inner_size) if zero_mlp_bias else None
                put(names[ours_name], b + ours_name, rows)
        put(names["attention.dense"], b + "attention.dense", h if arch == "gpt2" else None)
        if llama_like and not _LLAMA_LIKE[arch].dense_bias and cfg.use_bias_in_attn_linear:
            dense_bias = out.pop(names["attention.dense"] + ".bias")
            if dense_bias.any():
                raise ConfigError(f"layer {i}'s attention.dense bias is not zero, and {arch}'s o_proj has none (only "
                                  "q/k/v are biased): this model cannot be exported to it exactly")

        qkv_w = src.get(b + "attention.query_key_value.weight")
        qkv_b = src.optional(b + "attention.query_key_value.bias")
        if arch == "gpt_neox":
            p = f"gpt_neox.layers.{i}.attention.query_key_value"
            out[p + ".weight"] = qkv_w.clone()
            if qkv_b is not None:
                out[p + ".bias"] = qkv_b.clone()
        elif llama_like:
            p = f"model.layers.{i}.self_attn."
            for name, t in zip(("q_proj", "k_proj", "v_proj"), split_qkv(qkv_w, kv, d)):
                out[p + name + ".weight"] = t.clone()
            if qkv_b is not None:
                for name, t in zip(("q_proj", "k_proj", "v_proj"), split_qkv(qkv_b, kv, d)):
                    out[p + name + ".bias"] = t.clone()
        else:
            p = f"transformer.h.{i}.attn.c_attn"
            out[p + ".weight"] = torch.cat(split_qkv(qkv_w, kv, d)).t().contiguous()
            qkv_bias = torch.cat(split_qkv(qkv_b, kv, d)) if qkv_b is not None else qkv_w.new_zeros(3 * h)
            out[p + ".bias"] = qkv_bias
    put(top["final_norm"], "final_norm", norm_bias)
    if cfg.no_weight_tying:
        out["lm_head.weight"] = _resize_rows(src.get("head.weight"), vocab)
    else:
        src.optional("head.weight")  # the embedding itself; deduplicating savers drop it
        out["lm_head.weight"] = embed
    src.finish()
    return out


def from_hf_state_dict(
    hf_config: PretrainedConfig, hf_state_dict: StateDict, make_vocab_size_divisible_by: int = 128
) -> tuple[ModelConfig, StateDict]:
    """An HF causal LM of one of ARCHES -> (ModelConfig, neox state dict), vocab rows padded."""
    cfg = hf_config_to_model_cfg(hf_config, make_vocab_size_divisible_by)
    arch = canonical_arch(hf_config.model_type)
    src = _Source(hf_state_dict, arch)
    conv1d = arch == "gpt2"
    out: StateDict = {}

    def take(ours_key: str, hf_key: str, bias: bool) -> None:
        weight = src.get(hf_key + ".weight")
        out[ours_key + ".weight"] = weight.t().contiguous() if conv1d and weight.dim() == 2 else weight.clone()
        if bias:
            out[ours_key + ".bias"] = src.get(hf_key + ".bias").clone()

    top = _TOP_LEVEL[arch]
    embed = _resize_rows(src.get(top["embed"]), cfg.padded_vocab_size)
    out["embedding.word_embeddings.weight"] = embed
    if "positions" in top:
        out["embedding.position_embeddings.weight"] = src.get(top["positions"]).clone()
    h, kv, d = cfg.hidden_size, cfg.kv_heads, cfg.head_dim
    # Qwen2-MoE: biased q/k/v, unbiased o_proj -> a zero attention.dense bias (the same function)
    zero_dense_bias = arch in _LLAMA_LIKE and not _LLAMA_LIKE[arch].dense_bias and cfg.use_bias_in_attn_linear
    moe_layers = set(cfg.moe_layer_indices)
    for i in range(cfg.num_layers):
        names = _hf_names(arch, i)
        b = f"blocks.{i}."
        for ours_name in ("input_layernorm", "post_attention_layernorm"):
            take(b + ours_name, names[ours_name], cfg.use_bias_in_norms)
        if i in moe_layers:
            out.update(moe_layer_from_hf(src, cfg, arch, i))
        for ours_name in ("mlp.linear1", "mlp.gate", "mlp.linear2"):
            if ours_name in names and i not in moe_layers:
                take(b + ours_name, names[ours_name], cfg.use_bias_in_mlp)
        take(b + "attention.dense", names["attention.dense"], cfg.use_bias_in_attn_linear and not zero_dense_bias)
        if zero_dense_bias:
            out[b + "attention.dense.bias"] = out[b + "attention.dense.weight"].new_zeros(h)
        qkv = b + "attention.query_key_value"
        if arch == "gpt_neox":
            take(qkv, f"gpt_neox.layers.{i}.attention.query_key_value", cfg.use_bias_in_attn_linear)
        elif arch in _LLAMA_LIKE:
            p = f"model.layers.{i}.self_attn."
            parts = [src.get(p + n + ".weight") for n in ("q_proj", "k_proj", "v_proj")]
            out[qkv + ".weight"] = fuse_qkv(*parts, kv, d)
            if cfg.use_bias_in_attn_linear:
                parts = [src.get(p + n + ".bias") for n in ("q_proj", "k_proj", "v_proj")]
                out[qkv + ".bias"] = fuse_qkv(*parts, kv, d)
        else:
            p = f"transformer.h.{i}.attn.c_attn"
            out[qkv + ".weight"] = fuse_qkv(*src.get(p + ".weight").t().split(h), kv, d)
            out[qkv + ".bias"] = fuse_qkv(*src.get(p + ".bias").split(h), kv, d)
    take("final_norm", top["final_norm"], cfg.use_bias_in_norms)
    head = src.optional("lm_head.weight")
    if head is None:
        head = src.optional("embed_out.weight")  # pre-v5 GPT-NeoX checkpoints
    if cfg.no_weight_tying:
        if head is None:
            raise ConfigError(f"{arch} config has untied embeddings but the state dict has no 'lm_head.weight'")
        out["head.weight"] = _resize_rows(head, cfg.padded_vocab_size)
    else:
        out["head.weight"] = embed
    src.finish()
    return cfg, out
