"""Hugging Face <-> neox weight mapping: tiny random HF models, logits compared, round trips exact."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from neox.config.errors import ConfigError
from neox.config.model import ModelConfig
from neox.model import GPTNeoX
from neox.model.hf import (
    from_hf_state_dict,
    fuse_qkv,
    model_cfg_to_hf_config,
    split_qkv,
    to_hf_state_dict,
)

VOCAB = 101  # odd: padded to 128 on import


def _gpt_neox(rotary_pct: float, parallel: bool, tied: bool, bias: bool) -> GPTNeoXForCausalLM:
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": rotary_pct},
        use_parallel_residual=parallel, tie_word_embeddings=tied, attention_bias=bias, hidden_act="gelu",
        bos_token_id=None, eos_token_id=None,
    )
    return GPTNeoXForCausalLM(cfg)


def _llama(kv_heads: int, tied: bool, bias: bool) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
        intermediate_size=40, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=tied,
        attention_bias=bias, mlp_bias=bias, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        bos_token_id=None, eos_token_id=None,
    )
    return LlamaForCausalLM(cfg)


def _gpt2(tied: bool) -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=tied,
                     bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(cfg)


CASES = {
    "neox-quarter-rotary-parallel-untied": lambda: _gpt_neox(0.25, True, False, True),
    "neox-full-rotary-sequential-tied-nobias": lambda: _gpt_neox(1.0, False, True, False),
    "neox-half-rotary-parallel-tied": lambda: _gpt_neox(0.5, True, True, True),
    "llama-gqa-untied": lambda: _llama(2, False, False),
    "llama-mqa-tied-bias": lambda: _llama(1, True, True),
    "llama-mha": lambda: _llama(4, False, False),
    "gpt2-tied": lambda: _gpt2(True),
    "gpt2-untied": lambda: _gpt2(False),
}


def _randomise(model: torch.nn.Module) -> None:
    """Random values everywhere (HF inits biases to 0 and norms to 1, which would hide mapping bugs)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] == 32 else 0.0))


@pytest.mark.parametrize("name", sorted(CASES))
def test_import_matches_hf_logits_and_round_trips(name: str) -> None:
    torch.manual_seed(0)
    hf = CASES[name]().eval()
    _randomise(hf)
    hf_sd = hf.state_dict()
    cfg, sd = from_hf_state_dict(hf.config, hf_sd)
    assert cfg.padded_vocab_size == 128

    ours = GPTNeoX(cfg).eval()
    result = ours.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
        got = ours(tokens)
    assert got.shape == (2, 11, 128)
    torch.testing.assert_close(got[..., :VOCAB], expected, atol=1e-4, rtol=0)
    assert torch.count_nonzero(got[..., VOCAB:]) == 0  # padded rows are zero

    # HF -> ours -> HF is exact and the HF config rebuilt from ours loads into the HF class.
    back = to_hf_state_dict(cfg, ours.state_dict(), hf.config.model_type, vocab_size=VOCAB)
    assert set(back) == set(hf_sd) - {k for k in hf_sd if k.endswith(".attn.bias")}
    for key, tensor in back.items():
        assert torch.equal(tensor, hf_sd[key]), key
    hf_cfg = model_cfg_to_hf_config(cfg, hf.config.model_type, vocab_size=VOCAB)
    rebuilt = type(hf)(hf_cfg).eval()
    rebuilt.load_state_dict(back, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=tokens).logits, expected, atol=1e-5, rtol=0)

    # ours -> HF -> ours is exact too (all padded rows survive when the vocab is not trimmed).
    cfg2, sd2 = from_hf_state_dict(model_cfg_to_hf_config(cfg, hf.config.model_type),
                                   to_hf_state_dict(cfg, ours.state_dict(), hf.config.model_type))
    assert cfg2 == cfg
    assert set(sd2) == set(ours.state_dict())
    for key, tensor in ours.state_dict().items():
        assert torch.equal(sd2[key], tensor), key


def test_pythia_style_hf_config_without_bias_in_neox_exports_zero_biases() -> None:
    cfg = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, pos_emb="rotary",
                      use_bias_in_mlp=False, use_bias_in_norms=False, padded_vocab_size=64)
    ours = GPTNeoX(cfg).eval()
    hf = GPTNeoXForCausalLM(model_cfg_to_hf_config(cfg, "gpt_neox")).eval()
    hf_sd = to_hf_state_dict(cfg, ours.state_dict(), "gpt_neox")
    assert torch.count_nonzero(hf_sd["gpt_neox.layers.0.mlp.dense_h_to_4h.bias"]) == 0
    deduplicated = {k: v for k, v in ours.state_dict().items() if k != "head.weight"}  # as safetensors saves it
    assert torch.equal(to_hf_state_dict(cfg, deduplicated, "gpt_neox")["lm_head.weight"], ours.head.weight)
    with pytest.raises(ConfigError, match="padded_vocab_size"):
        to_hf_state_dict(cfg, ours.state_dict(), "gpt_neox", vocab_size=65)
    hf.load_state_dict(hf_sd, strict=True)
    tokens = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=tokens).logits, ours(tokens), atol=1e-5, rtol=0)


def test_qkv_layout_keeps_groups_contiguous() -> None:
    heads, kv, d = 4, 2, 3
    q = torch.arange(heads * d).float()
    k = 100 + torch.arange(kv * d).float()
    v = 200 + torch.arange(kv * d).float()
    fused = fuse_qkv(q, k, v, kv, d)
    # group 0: q heads 0, 1 then k0 then v0; group 1: q heads 2, 3, k1, v1
    expected = torch.cat([q[0:6], k[0:3], v[0:3], q[6:12], k[3:6], v[3:6]])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, kv, d), (q, k, v)))


BASE = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=4, seq_length=8, pos_emb="rotary",
                   padded_vocab_size=64)


@pytest.mark.parametrize(
    "arch, changes, key",
    [
        ("gpt_neox", {"pos_emb": "alibi"}, "pos_emb"),
        ("gpt_neox", {"num_kv_heads": 2}, "num_kv_heads"),
        ("gpt_neox", {"norm": "rmsnorm"}, "norm"),
        ("gpt_neox", {"activation": "swiglu"}, "activation"),
        ("llama", {"norm": "rmsnorm"}, "use_bias_in_norms"),
        ("llama", {"norm": "rmsnorm", "use_bias_in_norms": False, "activation": "swiglu", "rotary_pct": 0.5},
         "rotary_pct"),
        ("llama", {"norm": "rmsnorm", "use_bias_in_norms": False, "activation": "gelu"}, "activation"),
        ("llama", {"norm": "rmsnorm", "use_bias_in_norms": False, "activation": "swiglu", "gpt_j_residual": True},
         "gpt_j_residual"),
        ("gpt2", {}, "pos_emb"),
        ("gpt2", {"pos_emb": "learned", "gpt_j_residual": True}, "gpt_j_residual"),
    ],
)
def test_inexpressible_options_name_the_key(arch: str, changes: dict, key: str) -> None:
    cfg = dataclasses.replace(BASE, **changes)
    with pytest.raises(ConfigError, match=key):
        model_cfg_to_hf_config(cfg, arch)
    with pytest.raises(ConfigError, match=key):
        to_hf_state_dict(cfg, GPTNeoX(cfg).state_dict(), arch)


def test_mismatched_weights_are_reported() -> None:
    hf = _gpt2(True)
    sd = dict(hf.state_dict())
    sd["transformer.h.5.ln_1.weight"] = torch.ones(32)
    with pytest.raises(ConfigError, match="unexpected keys"):
        from_hf_state_dict(hf.config, sd)
    del sd["transformer.h.5.ln_1.weight"], sd["transformer.ln_f.bias"]
    with pytest.raises(ConfigError, match="transformer.ln_f.bias"):
        from_hf_state_dict(hf.config, sd)
