"""gpt-neox's model options against independent references: attention patterns as explicit masked softmaxes,
DeepSpeed's local block layout rebuilt by hand, a hand-computed T5 bucket table, norm formulas, layer sharing,
query-key layer scaling, fp16 cross entropy, activation checkpointing (torch's and DeepSpeed's), plan counts and
the Hugging Face export refusals."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from neox.config.errors import ConfigError
from neox.config.model import ModelConfig, check_model_combinations, expand_attention_types
from neox.model import GPTNeoX, KVCache, causal_lm_loss
from neox.model.hf import check_exportable
from neox.model.loss import half_token_cross_entropy
from neox.model.masks import Pattern, Visibility
from neox.model.positions import sinusoidal_embedding, t5_relative_buckets
from neox.plan.params import model_params

VOCAB = 64


def _cfg(**changes) -> ModelConfig:
    base = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=24, pos_emb="none",
                       padded_vocab_size=VOCAB)
    return dataclasses.replace(base, **changes)


def _model(seed: int = 0, **changes) -> GPTNeoX:
    torch.manual_seed(seed)
    return GPTNeoX(_cfg(**changes))


def _tokens(b: int = 2, s: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ attention_config
def test_attention_config_expands_as_gpt_neox():
    assert expand_attention_types(None, 3) == ["global"] * 3
    assert expand_attention_types([[["flash"], 6]], 6) == ["flash"] * 6
    # a pattern repeated n times, items in order
    assert expand_attention_types([[["global", "local"], 2], [["flash"], 1]], 5) == \
        ["global", "local", "global", "local", "flash"]
    # "all" fills every layer with the pattern and ends the list
    assert expand_attention_types([[["local", "global"], "all"]], 4) == ["local", "global", "local", "global"]
    assert expand_attention_types(["flash", "global"], 2) == ["flash", "global"]  # already expanded
    for bad, message in (([[["global"], 3]], "gives 3 layer types"), ([[["local", "global"], "all"]], "multiple"),
                         ([[["mamba"], 4]], "'mamba' is not built"), ([[["warp"], 4]], "'warp' is unknown"),
                         ([["global", 4]], "is not")):
        with pytest.raises(ConfigError, match=message):
            expand_attention_types(bad, 4 if message != "multiple" else 3)


def _reference_attention(model: GPTNeoX, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Layer 0's attention written out: multi-head, no positions, scores q.k/sqrt(d), masked softmax."""
    attn = model.blocks[0].attention
    b, s, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    qkv = attn.query_key_value(x).view(b, s, h, 3, d)  # per-head [q, k, v] (multi-head fused layout)
    q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, -1) @ v
    return attn.dense(out.transpose(1, 2).reshape(b, s, h * d))


def test_sliding_window_is_an_explicit_band_of_width_plus_one_keys():
    width = 3
    model = _model(sliding_window_width=width).eval()
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1))
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    band = (j <= i) & (j >= i - width)  # flash-attn window_size=(3, 0): keys i-3 .. i
    assert int(band[9].sum()) == width + 1
    # Hugging Face's sliding window W (Mistral) keeps W keys: width w here is its W = w + 1
    from transformers.masking_utils import sliding_window_causal_mask_function

    hf_mask = sliding_window_causal_mask_function(width + 1)
    zero = torch.tensor(0)
    assert torch.equal(band, torch.tensor([[bool(hf_mask(zero, zero, torch.tensor(q), torch.tensor(k)))
                                            for k in range(10)] for q in range(10)]))
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[0].attention(x), _reference_attention(model, x, band))
        # width 0: each query sees only itself
        zero = _model(sliding_window_width=0).eval()
        torch.testing.assert_close(zero.blocks[0].attention(x), _reference_attention(zero, x, j == i))


def _deepspeed_local_layout(seq: int, block: int, window_blocks: int) -> torch.Tensor:
    """DeepSpeed's LocalSlidingWindowSparsityConfig (unidirectional) made by hand, expanded to tokens, with the
    causal -10000 mask gpt-neox adds inside the diagonal blocks."""
    blocks = seq // block
    layout = torch.zeros(blocks, blocks, dtype=torch.bool)
    w = window_blocks // 2
    for row in range(blocks):
        layout[row, max(0, row - w):row + 1] = True
    tokens = layout.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return tokens & torch.ones(seq, seq, dtype=torch.bool).tril()


def test_local_layers_reproduce_deepspeeds_sliding_window_block_layout():
    cfg = dict(attention_config=[[["local", "global"], "all"]], sparsity_config={"block": 4, "num_local_blocks": 5})
    model = _model(**cfg).eval()
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(2))
    layout = _deepspeed_local_layout(24, 4, 5)
    vis = Visibility.build(None, 24, 0, torch.device("cpu"))
    assert torch.equal(vis.mask(model.blocks[0].attention.pattern)[0, 0], layout)
    assert model.blocks[1].attention.pattern == Pattern()  # the global layer
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[0].attention(x), _reference_attention(model, x, layout))
    # the 'num_sliding_window_blocks' spelling and the defaults (block 16, 4 blocks: 2 back)
    assert _cfg(sparsity_config={"num_sliding_window_blocks": 7}).local_attention_blocks == (16, 3)
    assert _cfg().local_attention_blocks == (16, 2)


CACHE_VARIANTS = {
    "window-local-rpe": dict(pos_emb="rpe", rpe_num_buckets=8, rpe_max_distance=12, sliding_window_width=4,
                             attention_config=[[["local", "flash"], "all"]],
                             sparsity_config={"block": 3, "num_local_blocks": 3}),
    "qk-layernorm-gqa-rotary-layer-scaling": dict(pos_emb="rotary", num_kv_heads=2, use_qk_layernorm=True,
                                                  apply_query_key_layer_scaling=True),
    "qk-scalenorm-sinusoidal-shared-tied": dict(pos_emb="sinusoidal", norm="scalenorm", use_qk_layernorm=True,
                                                num_unique_layers=2, gpt_j_residual=True, gpt_j_tied=True),
}


@pytest.mark.parametrize("variant", sorted(CACHE_VARIANTS))
def test_cached_and_left_padded_decoding_equal_recomputation(variant):
    model = _model(**CACHE_VARIANTS[variant]).eval()
    tokens = _tokens(2, 14, seed=3)
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(max_length=14)
        steps = [model(tokens[:, :6], cache=cache), model(tokens[:, 6:9], cache=cache)]
        steps += [model(tokens[:, i:i + 1], cache=cache) for i in range(9, 14)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        # a left-padded row decodes as the sequence alone (patterns count real tokens)
        pad = 3
        padded = torch.cat((torch.zeros(1, pad, dtype=torch.long), tokens[:1, :10]), 1)
        mask = torch.cat((torch.zeros(1, pad, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)), 1)
        cache = KVCache(max_length=pad + 14)
        out = model(padded, attention_mask=mask, cache=cache)
        torch.testing.assert_close(out[0, pad:], full[0, :10], atol=1e-5, rtol=1e-5)
        for i in range(10, 14):
            mask = torch.cat((mask, torch.ones(1, 1, dtype=torch.long)), 1)
            step = model(tokens[:1, i:i + 1], attention_mask=mask, cache=cache)
            torch.testing.assert_close(step[0, 0], full[0, i], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ positions
def test_t5_buckets_match_a_hand_computed_table():
    # num_buckets 8, max_distance 20: distances 0-3 exact; then 4 + floor(log(d/4) / log(5) * 4), at most 7
    expected = [0, 1, 2, 3, 4, 4, 5, 5, 5, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]
    distance = torch.arange(31)
    assert t5_relative_buckets(-distance, 8, 20).tolist() == expected  # key before the query: negative relative
    assert t5_relative_buckets(torch.tensor([1, 5]), 8, 20).tolist() == [0, 0]  # later keys: bucket 0


def test_rpe_adds_the_scaled_table_entry_of_each_bucket_and_one_table_serves_every_layer():
    model = _model(pos_emb="rpe", rpe_num_buckets=8, rpe_max_distance=20)
    table = model.blocks[0].attention.rpe
    assert all(block.attention._relative_bias[0] is table for block in model.blocks)
    assert [n for n in model.state_dict() if "rpe" in n] == ["blocks.0.attention.rpe.weight"]
    bias = table(torch.arange(5, 8), torch.arange(8))  # queries 5..7 over keys 0..7
    q, k = 6, 1  # distance 5 -> bucket 4
    torch.testing.assert_close(bias[0, :, q - 5, k], table.weight[4] * math.sqrt(32 // 4))
    # xavier-normal init, as gpt-neox's ParallelRelativePositionBias (std sqrt(2 / (buckets + heads)))
    big = _model(pos_emb="rpe", rpe_num_buckets=256, rpe_max_distance=512, num_attention_heads=4)
    assert abs(big.blocks[0].attention.rpe.weight.std().item() - math.sqrt(2 / 260)) < 0.015


def test_sinusoidal_positions_and_opt_offset_read_the_right_rows():
    emb = sinusoidal_embedding(torch.tensor([[0, 3, 7]]), 8, torch.float32)[0]
    for row, p in enumerate((0, 3, 7)):
        for i in range(4):
            angle = p / 10000 ** (2 * i / 8)
            assert emb[row, i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert emb[row, 4 + i].item() == pytest.approx(math.cos(angle), abs=1e-6)
    model = _model(pos_emb="sinusoidal").eval()
    tokens = _tokens(1, 5)
    expected = model.embedding.word_embeddings(tokens) + sinusoidal_embedding(torch.arange(5)[None], 32,
                                                                               torch.float32)
    torch.testing.assert_close(model.embedding(tokens), expected)
    opt = _model(pos_emb="learned", opt_pos_emb_offset=2, max_position_embeddings=26).eval()
    table = opt.embedding.position_embeddings.weight
    torch.testing.assert_close(opt.embedding(tokens), opt.embedding.word_embeddings(tokens) + table[2:7])
    with pytest.raises(ConfigError, match="opt_pos_emb_offset"):
        _cfg(pos_emb="learned", opt_pos_emb_offset=2).validate()  # the table needs seq_length + 2 rows


def test_rotary_inv_freq_buffer_is_saved_only_when_asked_and_either_state_dict_loads():
    plain, saving = _model(pos_emb="rotary"), _model(pos_emb="rotary", rotary_save_freqs_buffer=True)
    key = "blocks.0.attention.rotary_emb.inv_freq"
    assert key not in plain.state_dict()
    torch.testing.assert_close(saving.state_dict()[key], 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8))
    saving.load_state_dict(plain.state_dict())  # a checkpoint without the buffers
    plain.load_state_dict(saving.state_dict())  # a gpt-neox checkpoint carrying them
    assert len(saving.state_dict()) == len(plain.state_dict()) + 4


# ------------------------------------------------------------------------------------------------ norms
def test_scalenorm_and_qk_norms_follow_their_formulas():
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    model = _model(norm="scalenorm", scalenorm_epsilon=1e-5, use_qk_layernorm=True)
    norm = model.blocks[0].input_layernorm
    with torch.no_grad():
        norm.g.fill_(1.7)
    torch.testing.assert_close(norm(x), 1.7 * x / x.norm(dim=-1, keepdim=True).clamp(min=1e-5))
    heads = torch.randn(2, 4, 5, 8, generator=torch.Generator().manual_seed(5))  # [b, heads, s, d]
    torch.testing.assert_close(model.blocks[0].attention.qk_norm(heads),
                               heads / heads.norm(dim=-1, keepdim=True).clamp(min=1e-5))  # per head
    ln = _model(use_qk_layernorm=True).blocks[0].attention.qk_norm
    with torch.no_grad():
        ln.weight.normal_(generator=torch.Generator().manual_seed(6))
    per_token = heads.transpose(1, 2)  # [b, s, heads, d]: mean and variance over all heads' dims together
    mean = per_token.mean(dim=(-2, -1), keepdim=True)
    var = per_token.var(dim=(-2, -1), keepdim=True, unbiased=False)
    expected = ((per_token - mean) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias).transpose(1, 2)
    torch.testing.assert_close(ln(heads), expected, atol=1e-5, rtol=1e-5)
    rms = _model(use_qk_layernorm=True, norm="rmsnorm", rms_norm_epsilon=1e-6).blocks[0].attention.qk_norm
    assert rms.weight.shape == (4, 8) and float(rms.weight.detach().sum()) == 32.0  # gains 1, not drawn
    expected = heads / torch.sqrt(heads.square().mean(-1, keepdim=True) + 1e-6)  # per head
    torch.testing.assert_close(rms(heads), expected, atol=1e-5, rtol=1e-5)


def test_gpt_j_tied_equals_the_untied_model_with_both_norms_equal():
    tied = _model(gpt_j_residual=True, gpt_j_tied=True).eval()
    untied = _model(gpt_j_residual=True).eval()
    state = dict(tied.state_dict())
    for i in range(4):
        for leaf in ("weight", "bias"):
            state[f"blocks.{i}.post_attention_layernorm.{leaf}"] = state[f"blocks.{i}.input_layernorm.{leaf}"]
    untied.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(tied(_tokens()), untied(_tokens()))
    assert tied.blocks[0].post_attention_layernorm is None


# ------------------------------------------------------------------------------------------------ sharing
@pytest.mark.parametrize("style, owners", [("grouped", [0, 1, 0, 1]), ("spaced", [0, 0, 2, 2])])
def test_shared_layers_are_one_module_and_get_the_summed_gradient(style, owners):
    shared = _model(num_unique_layers=2, param_sharing_style=style, pos_emb="rotary")
    assert [owners.index(owners[i]) for i in range(4)] == owners
    assert all(shared.blocks[i] is shared.blocks[owners[i]] for i in range(4))
    assert sum(p.numel() for p in shared.parameters()) == model_params(shared.cfg, 1, 1, "uniform").total
    names = {k.split(".")[1] for k in shared.state_dict() if k.startswith("blocks.")}
    assert names == {str(o) for o in set(owners)}  # each shared parameter saved once, under its first layer
    # the same weights in every layer of an unshared model: per-layer gradients sum to the shared one
    unshared = _model(pos_emb="rotary")
    unshared.load_state_dict(shared.state_dict(keep_vars=False) | {
        f"blocks.{i}.{k.split('.', 2)[2]}": v for i in range(4) for k, v in shared.state_dict().items()
        if k.startswith(f"blocks.{owners[i]}.")})
    tokens = _tokens()
    for model in (shared, unshared):
        causal_lm_loss(model(tokens), tokens).backward()
    for name, p in shared.named_parameters():
        if name.startswith("blocks."):
            rest = name.split(".", 2)[2]
            layers = [i for i in range(4) if owners[i] == int(name.split(".")[1])]
            total = sum(dict(unshared.named_parameters())[f"blocks.{i}.{rest}"].grad for i in layers)
            torch.testing.assert_close(p.grad, total, atol=1e-6, rtol=1e-5)
    reloaded = _model(seed=9, num_unique_layers=2, param_sharing_style=style, pos_emb="rotary")
    reloaded.load_state_dict(shared.state_dict())
    assert reloaded.blocks[owners[3]] is reloaded.blocks[3]


def test_refusals_name_the_keys():
    with pytest.raises(ConfigError, match="num_unique_layers"):
        _cfg(num_unique_layers=3).validate()
    with pytest.raises(ConfigError, match="attention_config"):
        _cfg(num_unique_layers=2, param_sharing_style="spaced",
             attention_config=[[["local", "global"], "all"]]).validate()
    with pytest.raises(ConfigError, match="pipe_parallel_size"):
        check_model_combinations(_cfg(num_unique_layers=2), 1, "fp32")
    with pytest.raises(ConfigError, match="pipe_parallel_size"):
        check_model_combinations(_cfg(pos_emb="rpe"), 2, "fp32")
    check_model_combinations(_cfg(pos_emb="rpe"), 1, "fp32")
    with pytest.raises(ConfigError, match="fp16_lm_cross_entropy"):
        check_model_combinations(_cfg(fp16_lm_cross_entropy=True), 0, "bfloat16")
    with pytest.raises(ConfigError, match="contiguous_checkpointing"):
        _cfg(contiguous_checkpointing=True).validate()


# ------------------------------------------------------------------------------------------------ numerics
def test_query_key_layer_scaling_multiplies_position_bias_by_the_layer_index():
    cfg = dict(pos_emb="rpe", rpe_num_buckets=8, rpe_max_distance=20)
    scaled = _model(apply_query_key_layer_scaling=True, **cfg).eval()
    attn = scaled.blocks[3].attention  # coefficient max(1, 3) = 3
    assert [b.attention.layer_scale for b in scaled.blocks] == [1, 1, 2, 3]
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        b, s = 2, 9
        q, k, v = (attn.query_key_value(x).view(b, s, 4, 3, 8)[:, :, :, i].transpose(1, 2) for i in range(3))
        bias = attn._relative_bias[0](torch.arange(s), torch.arange(s))
        scores = q @ k.transpose(-1, -2) / math.sqrt(8) + 3 * bias
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
        expected = attn.dense((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, s, 32))
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
        # without a position bias the scaling only reorders the arithmetic
        plain, scaled = _model(pos_emb="rotary").eval(), _model(pos_emb="rotary",
                                                                 apply_query_key_layer_scaling=True).eval()
        torch.testing.assert_close(plain(_tokens()), scaled(_tokens()), atol=1e-5, rtol=1e-5)
        # bf16: scores in bf16 / (sqrt(d) c), then fp32 x c and softmax, probabilities back in bf16
        low = scaled.to(torch.bfloat16)
        assert low(_tokens()).dtype == torch.bfloat16


def test_fp16_cross_entropy_computes_each_token_in_half_precision():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(8)) * 4
    labels = torch.randint(0, 50, (6,), generator=torch.Generator().manual_seed(9))
    exact = F.cross_entropy(logits.double(), labels, reduction="none")
    half = half_token_cross_entropy(logits.half(), labels)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), exact, atol=2e-2, rtol=5e-3)
    assert not torch.equal(half.float(), F.cross_entropy(logits.half().float(), labels, reduction="none"))
    loss = causal_lm_loss(logits.half()[None], labels[None], half_precision=True)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), exact.mean(), atol=1e-2, rtol=5e-3)


# ------------------------------------------------------------------------------------------------ checkpointing
def _loss_and_grads(model: GPTNeoX) -> tuple[float, dict[str, torch.Tensor]]:
    model.train().zero_grad()
    tokens = _tokens()
    loss = causal_lm_loss(model(tokens), tokens)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def single_process_deepspeed():
    """A world of one in this process (deepspeed.checkpointing reads the process group); the environment variables
    init_runtime sets are restored afterwards, so later tests launching ranks do not inherit them."""
    import os

    from neox.parallel.runtime import init_runtime

    saved = dict(os.environ)
    started = not torch.distributed.is_initialized()
    init_runtime("gloo")
    yield
    if started and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("options", [
    dict(deepspeed_activation_checkpointing=False, checkpoint_num_layers=3),
    dict(checkpoint_num_layers=2, partition_activations=True, contiguous_checkpointing=True, checkpoint_in_cpu=True,
         synchronize_each_layer=True, profile_backward=True),
    dict(checkpoint_num_layers=1, checkpoint_in_cpu=True),
])
def test_activation_checkpointing_changes_no_number(single_process_deepspeed, options):
    from neox.parallel.activation_checkpoint import install_activation_checkpointing

    changes = dict(pos_emb="rotary", hidden_dropout=0.1, attention_dropout=0.1)
    reference = _model(**changes)
    torch.manual_seed(1)
    ref_loss, ref_grads = _loss_and_grads(reference)
    model = _model(checkpoint_activations=True, **changes, **options)  # the reference's weights (same seed)
    function = install_activation_checkpointing(model, model.cfg, None)
    assert (function is None) == (not model.cfg.deepspeed_activation_checkpointing)
    calls = []
    inner = model.activation_checkpoint
    model.activation_checkpoint = lambda fn, *args: calls.append(1) or inner(fn, *args)
    torch.manual_seed(1)  # the same dropout masks: recomputation replays them
    loss, grads = _loss_and_grads(model)
    assert len(calls) == math.ceil(4 / model.cfg.checkpoint_num_layers)
    assert loss == ref_loss
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=0, rtol=0, msg=name)


# ------------------------------------------------------------------------------------------------ plan, export
@pytest.mark.parametrize("changes", [
    dict(pos_emb="rpe"), dict(use_qk_layernorm=True, num_kv_heads=2), dict(norm="scalenorm", use_qk_layernorm=True),
    dict(norm="non_parametric_layernorm"), dict(gpt_j_residual=True, gpt_j_tied=True, no_weight_tying=True),
    dict(num_unique_layers=1, use_qk_layernorm=True, norm="rmsnorm", pos_emb="rpe"),
])
def test_plan_counts_the_new_parameters_once(changes):
    cfg = _cfg(**changes)
    assert model_params(cfg, 1, 1, "uniform").total == sum(p.numel() for p in GPTNeoX(cfg).parameters())


@pytest.mark.parametrize("changes, key", [
    (dict(attention_config=[[["local", "global"], "all"]]), "attention_config"),
    (dict(sliding_window_width=8), "sliding_window_width"),
    (dict(use_qk_layernorm=True), "use_qk_layernorm"),
    (dict(num_unique_layers=2), "num_unique_layers"),
    (dict(gpt_j_residual=True, gpt_j_tied=True), "gpt_j_tied"),
    (dict(pos_emb="rpe"), "pos_emb"),
    (dict(pos_emb="sinusoidal"), "pos_emb"),
    (dict(pos_emb="learned", opt_pos_emb_offset=2, max_position_embeddings=26), "opt_pos_emb_offset"),
])
def test_hf_export_refuses_what_gpt_neox_cannot_express(changes, key):
    base = dict(pos_emb="rotary")
    with pytest.raises(ConfigError, match=key):
        check_exportable(_cfg(**{**base, **changes}), "gpt_neox" if changes.get("pos_emb") != "learned" else "gpt2")
    assert check_exportable(_cfg(pos_emb="rotary", attention_config=[[["flash"], 4]],
                                 apply_query_key_layer_scaling=True, output_layer_parallelism="row",
                                 checkpoint_num_layers=2), "gpt_neox") == "gpt_neox"
