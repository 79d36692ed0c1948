"""The single-device model: cache decoding, checkpointing, init, tying, loss, config validation."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from neox.config.errors import ConfigError
from neox.config.model import ModelConfig
from neox.model import CacheFullError, GPTNeoX, KVCache, causal_lm_loss
from neox.model.init import init_std
from neox.model.positions import alibi_slopes

VOCAB = 96


def _cfg(**changes) -> ModelConfig:
    base = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, pos_emb="rotary",
                       padded_vocab_size=VOCAB)
    return dataclasses.replace(base, **changes)


VARIANTS = {
    "rotary-gqa-swiglu-rmsnorm": dict(num_kv_heads=2, activation="swiglu", norm="rmsnorm", rotary_pct=0.5),
    "rotary-parallel-mqa": dict(num_kv_heads=1, gpt_j_residual=True),
    "learned-untied": dict(pos_emb="learned", no_weight_tying=True, activation="gelu_tanh"),
    "alibi": dict(pos_emb="alibi", use_bias_in_attn_linear=False),
}


def _model(seed: int = 0, **changes) -> GPTNeoX:
    torch.manual_seed(seed)
    return GPTNeoX(_cfg(**changes)).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cache_decoding_equals_full_forward(variant: str) -> None:
    model = _model(**VARIANTS[variant])
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(max_length=12)
        steps = [model(tokens[:, :5], cache=cache)]  # prefill
        steps.append(model(tokens[:, 5:8], cache=cache))  # a multi-token chunk on a warm cache
        steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(8, 12)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(CacheFullError, match="max_length"):
        model(tokens[:, :1], cache=cache)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_left_padded_batch_decodes_like_each_sequence_alone(variant: str) -> None:
    model = _model(**VARIANTS[variant])
    gen = torch.Generator().manual_seed(1)
    prompt_lens, new = (3, 4), 3
    seqs = [torch.randint(1, VOCAB, (n + new,), generator=gen) for n in prompt_lens]
    pad = max(prompt_lens)
    prompts = torch.zeros(2, pad, dtype=torch.long)
    mask = torch.zeros(2, pad, dtype=torch.long)
    for row, (seq, n) in enumerate(zip(seqs, prompt_lens)):
        prompts[row, pad - n :] = seq[:n]
        mask[row, pad - n :] = 1
    with torch.no_grad():
        cache = KVCache(max_length=pad + new)
        logits = model(prompts, attention_mask=mask, cache=cache)
        for row, (seq, n) in enumerate(zip(seqs, prompt_lens)):
            alone = model(seq[None, : n + new])
            torch.testing.assert_close(logits[row, pad - n :], alone[0, :n], atol=1e-5, rtol=1e-5)
        for step in range(new):
            nxt = torch.stack([seq[n + step] for seq, n in zip(seqs, prompt_lens)])[:, None]
            mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), dim=1)
            out = model(nxt, attention_mask=mask, cache=cache)
            for row, (seq, n) in enumerate(zip(seqs, prompt_lens)):
                alone = model(seq[None, : n + new])
                torch.testing.assert_close(out[row, 0], alone[0, n + step], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(logits).all()  # padding queries attend to themselves, never to nothing


def test_full_forward_with_padding_mask_matches_unpadded() -> None:
    model = _model(num_kv_heads=2)
    seq = torch.randint(0, VOCAB, (1, 6))
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), seq), dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, 3:], model(seq), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["rotary-gqa-swiglu-rmsnorm", "learned-untied"])
def test_activation_checkpointing_gives_identical_loss_and_grads(variant: str) -> None:
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    results = []
    for recompute in (False, True):
        model = _model(checkpoint_activations=recompute, hidden_dropout=0.1, attention_dropout=0.1,
                       **VARIANTS[variant]).train()
        calls = []
        model.blocks[0].mlp.register_forward_hook(lambda *_: calls.append(1))
        torch.manual_seed(123)  # same dropout masks in both runs
        loss = causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        assert len(calls) == (2 if recompute else 1)  # recomputed in backward
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-7, rtol=1e-6, msg=name)


def test_dropout_only_in_training() -> None:
    model = _model(hidden_dropout=0.5, attention_dropout=0.5)
    tokens = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(tokens), model(tokens))
        model.train()
        assert not torch.equal(model(tokens), model(tokens))


@pytest.mark.parametrize("method", ["normal", "scaled_normal", "single_residual_scaled_normal", "wang_init",
                                    "small_init"])
def test_init_std_per_method(method: str) -> None:
    torch.manual_seed(0)
    cfg = _cfg(hidden_size=256, num_attention_heads=4, num_layers=4, init_method=method,
               output_layer_init_method=method, init_method_std=0.03, padded_vocab_size=512)
    expected = {
        "normal": 0.03,
        "scaled_normal": 0.03 / math.sqrt(8),
        "single_residual_scaled_normal": 0.03 / 2,
        "wang_init": 2 / 4 / 16,
        "small_init": math.sqrt(2 / (5 * 256)),
    }[method]
    assert init_std(method, cfg) == pytest.approx(expected)
    model = GPTNeoX(cfg)
    block = model.blocks[0]
    for weight in (block.attention.query_key_value.weight, block.mlp.linear2.weight, model.head.weight):
        assert weight.std().item() == pytest.approx(expected, rel=0.03)
        assert abs(weight.mean().item()) < expected / 10
    assert torch.all(block.input_layernorm.weight == 1) and torch.all(block.input_layernorm.bias == 0)
    assert torch.all(block.attention.query_key_value.bias == 0)


def test_default_init_scales_residual_outputs_and_orthogonal_methods() -> None:
    torch.manual_seed(0)
    cfg = _cfg(hidden_size=128, num_layers=8, init_method_std=0.02, padded_vocab_size=128)
    block = GPTNeoX(cfg).blocks[0]
    assert block.attention.query_key_value.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attention.dense.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # scaled_normal, 8 layers
    cfg = _cfg(hidden_size=64, num_layers=8, init_method="orthogonal", output_layer_init_method="scaled_orthogonal")
    block = GPTNeoX(cfg).blocks[0]
    w = block.attention.dense.weight  # square: w w^T = gain^2 I
    torch.testing.assert_close(w @ w.T, torch.eye(64) * (2 / 8), atol=1e-5, rtol=0)
    w = block.mlp.linear1.weight  # [256, 64]: orthonormal columns scaled by sqrt(2)
    torch.testing.assert_close(w.T @ w, torch.eye(64) * 2, atol=1e-4, rtol=0)


def test_tied_weights_are_one_parameter() -> None:
    model = _model()
    assert model.head.weight is model.embedding.word_embeddings.weight
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})
    assert sum(p is model.head.weight for p in model.parameters()) == 1
    tokens = torch.randint(0, VOCAB, (1, 8))
    model.train()
    causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    grad = model.embedding.word_embeddings.weight.grad
    assert grad is not None and torch.count_nonzero(grad[tokens.unique()]) > 0
    unused = sorted(set(range(VOCAB)) - set(tokens.tolist()[0]))
    assert torch.count_nonzero(grad[unused]) > 0  # the head's share of the gradient reaches every row

    untied = _model(no_weight_tying=True)
    assert untied.head.weight is not untied.embedding.word_embeddings.weight
    assert not torch.equal(untied.head.weight, untied.embedding.word_embeddings.weight)


def test_loss_is_fp32_mean_over_unmasked_tokens() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=gen).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5), generator=gen)
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 1, 0]])
    per_token = torch.nn.functional.cross_entropy(logits.float().reshape(10, 11), labels.reshape(10),
                                                  reduction="none")
    expected = per_token[mask.reshape(10).bool()].mean()
    loss = causal_lm_loss(logits, labels, mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)
    garbage = logits.clone()
    garbage[0, 2] = 100.0  # a masked position cannot move the loss
    torch.testing.assert_close(causal_lm_loss(garbage, labels, mask), expected)
    torch.testing.assert_close(causal_lm_loss(logits, labels), per_token.mean())
    assert causal_lm_loss(logits, labels, torch.zeros_like(mask)).item() == 0.0


def test_alibi_slopes_and_mlp_width_rules() -> None:
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    six = alibi_slopes(6)  # 4 from the power of two, then every other one of the 8-head sequence
    torch.testing.assert_close(six, torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))
    assert _cfg(hidden_size=64).mlp_inner_size == 256
    assert _cfg(hidden_size=64, expansion_factor=2.0).mlp_inner_size == 128
    # gpt-neox's Llama-7B numbers: intermediate_size 32768, multiple of 256 -> 11008 wide SwiGLU
    llama = _cfg(hidden_size=4096, num_attention_heads=32, activation="swiglu", intermediate_size=32768,
                 mlp_multiple_of=256)
    assert llama.mlp_inner_size == 11008


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"num_layers": None}, "num_layers"),
        ({"hidden_size": 30}, "hidden_size"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"rotary_pct": 0.0}, "rotary_pct"),
        ({"rotary_pct": 1.5}, "rotary_pct"),
        ({"hidden_size": 24, "num_attention_heads": 4, "rotary_pct": 0.5}, "rotary_pct"),  # 3 rotary dims
        ({"pos_emb": "xpos"}, "pos_emb"),
        ({"norm": "groupnorm"}, "norm"),
        ({"activation": "tanh"}, "activation"),
        ({"init_method": "uniform"}, "init_method"),
        ({"output_layer_init_method": "zeros"}, "output_layer_init_method"),
        ({"max_position_embeddings": 16}, "max_position_embeddings"),
        ({"hidden_dropout": 1.0}, "hidden_dropout"),
        ({"layernorm_epsilon": 0.0}, "layernorm_epsilon"),
        ({"intermediate_size": 1, "activation": "swiglu"}, "intermediate_size"),
    ],
)
def test_config_validation_names_the_key(changes: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        _cfg(**changes).validate()


def test_model_requires_padded_vocab() -> None:
    with pytest.raises(ConfigError, match="padded_vocab_size"):
        GPTNeoX(_cfg(padded_vocab_size=None))


@pytest.mark.parametrize("kv_heads,group,rotary_ndims,per_row_positions",
                         [(2, 3, 4, False), (4, 1, 8, True), (1, 4, 0, False), (3, 2, 2, True)])
def test_split_heads_matches_slicing_and_rotation_with_exact_gradients(kv_heads, group, rotary_ndims,
                                                                         per_row_positions) -> None:
    from neox.model.heads import split_heads

    b, s, d = 2, 5, 8
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(b, s, kv_heads * (group + 2) * d, dtype=torch.double, generator=gen, requires_grad=True)
    angles = torch.randn(b if per_row_positions else 1, s, rotary_ndims // 2, dtype=torch.double, generator=gen)
    cos, sin = (angles.cos(), angles.sin()) if rotary_ndims else (None, None)

    def reference(t: torch.Tensor) -> list[torch.Tensor]:  # views of the fused layout, "rotate half" by cat
        fused = t.view(b, s, kv_heads, group + 2, d)

        def rotate(x: torch.Tensor) -> torch.Tensor:
            if not rotary_ndims:
                return x
            c, sn = (torch.cat((a, a), -1)[:, :, None, None] for a in (cos, sin))
            part, half = x[..., :rotary_ndims], rotary_ndims // 2
            turned = torch.cat((-part[..., half:], part[..., :half]), -1)
            return torch.cat((part * c + turned * sn, x[..., rotary_ndims:]), -1)

        q = rotate(fused[:, :, :, :group]).reshape(b, s, kv_heads * group, d).transpose(1, 2)
        k = rotate(fused[:, :, :, group : group + 1])[:, :, :, 0].transpose(1, 2)
        return [q, k, fused[:, :, :, group + 1].transpose(1, 2)]

    outputs = split_heads(qkv, cos, sin, kv_heads, group, d, rotary_ndims)
    for got, expected in zip(outputs, reference(qkv)):
        assert got.is_contiguous()
        torch.testing.assert_close(got, expected)
    assert torch.autograd.gradcheck(lambda t: split_heads(t, cos, sin, kv_heads, group, d, rotary_ndims), (qkv,))
    for rows in (slice(None), slice(2, 3)):  # the in-place no-grad path (eval, prefill, one decoding step)
        part = qkv.detach()[:, rows]
        tables = [t if t is None else t[:, rows] for t in (cos, sin)]
        with_grad = split_heads(part.clone().requires_grad_(), *tables, kv_heads, group, d, rotary_ndims)
        with torch.no_grad():
            without = split_heads(part.clone(), *tables, kv_heads, group, d, rotary_ndims)
        for got, expected in zip(without, with_grad):
            assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_cross_entropy_equals_torch_in_value_and_gradient(dtype) -> None:
    from neox.model.loss import token_cross_entropy

    gen = torch.Generator().manual_seed(6)
    logits = (torch.randn(300, 5003, generator=gen) * 3).to(dtype).requires_grad_()  # many row slices
    labels = torch.randint(0, 5003, (300,), generator=gen)
    weights = torch.rand(300, generator=gen)
    ours = token_cross_entropy(logits, labels)
    theirs = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (grad_theirs,) = torch.autograd.grad((theirs * weights).sum(), logits)
    assert grad_ours.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-6, rtol=1e-5)
    else:
        # Both round an fp32 gradient to bf16; two fp32 values a hair apart may round to neighbouring bf16
        # values (one element in ~1.5M did), so the contract is at most one bf16 ulp apart.
        a, b = grad_ours.float(), grad_theirs.float()
        magnitude = torch.maximum(a.abs(), b.abs()).clamp(min=torch.finfo(torch.bfloat16).tiny)
        ulp = torch.exp2(torch.floor(torch.log2(magnitude)) - 7)  # bf16 keeps 7 explicit mantissa bits
        assert bool(((a - b).abs() <= ulp).all()), float(((a - b).abs() / ulp).max())
    with torch.no_grad():
        torch.testing.assert_close(token_cross_entropy(logits, labels), theirs)
