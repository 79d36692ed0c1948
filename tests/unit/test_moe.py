"""The mixture-of-experts block (neox/model/moe.py) against references: transformers' Mixtral and Qwen2-MoE blocks
and loss function on the same weights, a hand computation of gpt-neox's Sinkhorn router, a dense per-token loop for
the sorted dispatch, the formulas of the auxiliary losses, and the plan's counts against a built model."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from neox.config import ConfigError
from neox.config.model import ModelConfig
from neox.model import GPTNeoX
from neox.model.moe import (MoE, Router, Experts, grouped_linear, inactive_params, load_balancing_loss, moe_blocks,
                            z_loss)
from neox.plan.memory import layer_activation_elements
from neox.plan.params import model_params
from neox.parallel.sharding import shard_state_dict
from neox.train.moe_metrics import MoEMetrics
from tests.unit.test_plan_estimates import saved_elements_per_token

H = 16


def moe_cfg(**changes) -> ModelConfig:
    base = ModelConfig(num_layers=2, hidden_size=H, num_attention_heads=2, seq_length=8, pos_emb="rotary",
                       padded_vocab_size=64, activation="swiglu", moe_num_experts=4, moe_top_k=2,
                       moe_router_type="topk", moe_intermediate_size=24, use_bias_in_mlp=False)
    return dataclasses.replace(base, **changes)


def block(**changes) -> MoE:
    torch.manual_seed(0)
    moe = MoE(moe_cfg(**changes))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


# --- router -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalise", [False, True])
def test_topk_router_equals_transformers(normalise):
    """softmax then top-k (gpt-neox, Qwen2-MoE's norm_topk_prob false) and its renormalised form (Mixtral: a softmax
    over the top-k logits; Qwen2-MoE / OLMoE norm_topk_prob true)."""
    from transformers import MixtralConfig, Qwen2MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    router = block(moe_norm_topk_prob=normalise).router.eval()
    x = torch.randn(10, H)
    routing = router(x)
    if normalise:
        hf = MixtralTopKRouter(MixtralConfig(hidden_size=H, num_local_experts=4, num_experts_per_tok=2))
        top = torch.topk(router.weight @ x.T, 2, dim=0).values.T  # the two largest logits of each token
        torch.testing.assert_close(routing.weights, torch.softmax(top, dim=-1), rtol=1e-6, atol=1e-7)
    else:
        hf = Qwen2MoeTopKRouter(Qwen2MoeConfig(hidden_size=H, num_experts=4, num_experts_per_tok=2,
                                               norm_topk_prob=False))
    hf.weight.data.copy_(router.weight.data)
    _, hf_weights, hf_experts = hf(x)
    assert torch.equal(routing.experts, hf_experts)
    torch.testing.assert_close(routing.weights, hf_weights.float(), rtol=1e-6, atol=1e-7)


def _hand_sinkhorn(logits: list[list[float]], rounds: int = 3) -> list[list[float]]:
    """gpt-neox's Sinkhorn (megatron/model/router.py) in plain Python floats."""
    cost = [[math.exp(v) for v in row] for row in logits]
    n, e = len(cost), len(cost[0])
    rows = [1.0] * n
    cols = [1.0 / (e * sum(cost[t][j] for t in range(n))) for j in range(e)]
    for _ in range(rounds):
        rows = [1.0 / n / (sum(cols[j] * cost[t][j] for j in range(e)) + 1e-8) for t in range(n)]
        new = [1.0 / e / (sum(rows[t] * cost[t][j] for t in range(n)) + 1e-8) for j in range(e)]
        done = sum(abs(a - b) for a, b in zip(cols, new)) / e < 1e-4
        cols = new
        if done:
            break
    return [[cols[j] * cost[t][j] * rows[t] for j in range(e)] for t in range(n)]


def test_sinkhorn_router_matches_a_hand_computation():
    """Training: experts by the Sinkhorn-balanced scores, weights sigmoid(logit) (k = 1); evaluation: plain top-k.
    Every token prefers expert 0, which Sinkhorn spreads over both experts."""
    router = Router(moe_cfg(hidden_size=2, moe_num_experts=2, moe_top_k=1, moe_router_type="sinkhorn"))
    router.weight.data = torch.eye(2)  # logits = x
    logits = [[2.0, 0.0], [1.5, 1.0], [1.2, 0.2], [3.0, 2.9]]
    balanced = _hand_sinkhorn(logits)
    chosen = [max(range(2), key=lambda j: row[j]) for row in balanced]
    assert sorted(set(chosen)) == [0, 1]
    routing = router.train()(torch.tensor(logits))
    assert routing.experts.flatten().tolist() == chosen
    expected = [1 / (1 + math.exp(-logits[t][c])) for t, c in enumerate(chosen)]
    torch.testing.assert_close(routing.weights.flatten(), torch.tensor(expected), rtol=1e-6, atol=1e-7)
    evaluated = router.eval()(torch.tensor(logits))
    assert evaluated.experts.flatten().tolist() == [0, 0, 0, 0]
    # k > 1: softmax weights of the chosen experts
    router2 = Router(moe_cfg(hidden_size=3, moe_num_experts=3, moe_top_k=2, moe_router_type="sinkhorn")).train()
    router2.weight.data = torch.eye(3)
    x = torch.tensor([[1.0, 0.5, -1.0], [0.9, 0.6, -0.5], [2.0, 0.1, 0.0]])
    r = router2(x)
    torch.testing.assert_close(r.weights, torch.softmax(x, -1).gather(1, r.experts))


def test_jitter_only_in_training():
    router = block(moe_jitter_eps=0.1).router
    x = torch.randn(6, H)
    plain = F.linear(x, router.weight)
    torch.testing.assert_close(router.eval()(x).logits, plain)
    state = torch.get_rng_state()
    jittered = router.train()(x).logits
    assert not torch.allclose(jittered, plain)
    torch.set_rng_state(state)
    noise = torch.empty_like(x).uniform_(0.9, 1.1)
    torch.testing.assert_close(jittered, F.linear(x * noise, router.weight))


# --- dispatch and experts -----------------------------------------------------------------------------------------

def _dense_reference(experts: Experts, x, weights, chosen, gated: bool):
    """Token by token, choice by choice: weight x expert MLP(token)."""
    rows = []
    for t in range(x.shape[0]):
        total = torch.zeros(x.shape[1])
        for c in range(chosen.shape[1]):
            e = int(chosen[t, c])
            up = x[t] @ experts.linear1.weight[e].T
            hidden = F.silu(x[t] @ experts.gate.weight[e].T) * up if gated else F.gelu(up)
            total = total + weights[t, c] * (hidden @ experts.linear2.weight[e])
        rows.append(total)
    return torch.stack(rows)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_sorted_dispatch_equals_a_dense_per_token_loop(activation):
    experts = block(activation=activation).experts
    x = torch.randn(13, H, requires_grad=True)
    weights = torch.rand(13, 2, requires_grad=True)
    chosen = torch.stack([torch.randperm(4)[:2] for _ in range(13)])
    chosen[:5, 0] = 3  # an expert gets several tokens, another maybe none
    out, dropped = experts(x, weights, chosen)
    ref = _dense_reference(experts, x, weights, chosen, activation == "swiglu")
    assert dropped == 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), [x, weights, experts.linear1.weight, experts.linear2.weight])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, weights, experts.linear1.weight, experts.linear2.weight])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("transposed", [True, False])
def test_grouped_mm_kernel_equals_the_per_expert_loop(transposed):
    """torch's grouped matmul (used on GPUs in bf16) and the per-expert loop give the same values and gradients."""
    weight = torch.randn(4, 24, H, requires_grad=True)
    x = torch.randn(11, H if transposed else 24, requires_grad=True)
    counts = [3, 0, 6, 2]
    outs = [grouped_linear(x, weight, counts, transposed, use_grouped_mm=kernel) for kernel in (False, True)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(o.square().sum(), [x, weight]) for o in outs]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_capacity_drops_later_assignments_in_training_only():
    """Capacity ceil(0.5 x 8 tokens x 2 / 4) = 2: every token picks experts 0 (first) and 1 (second), so each of the
    two keeps its first two tokens (first choices before second ones); evaluation stays dropless."""
    moe = block(moe_capacity_factor=0.5, activation="gelu")
    x = torch.randn(8, H)
    moe.router.weight.data = torch.zeros(4, H)
    moe.router.weight.data[0, 0], moe.router.weight.data[1, 0] = 2.0, 1.0
    x[:, 0] = 5.0  # every token: expert 0 first, expert 1 second
    assert moe.train().capacity(8) == 2
    routing = moe.router(x)
    out, dropped = moe.experts(x, routing.weights, routing.experts, 2)
    assert dropped == 12
    kept = torch.zeros_like(routing.weights)
    kept[:2] = routing.weights[:2]  # tokens 0 and 1 keep both choices
    ref = _dense_reference(moe.experts, x, kept, routing.experts, gated=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    full, none_dropped = moe.experts(x, routing.weights, routing.experts, moe.eval().capacity(8))
    assert none_dropped == 0 and not torch.allclose(full[2:], torch.zeros_like(full[2:]))


# --- the block against transformers ---------------------------------------------------------------------------

def _mixtral_like(moe: MoE, hf_experts) -> None:
    e = moe.experts
    hf_experts.gate_up_proj.data.copy_(torch.cat([e.gate.weight, e.linear1.weight], dim=1).data)
    hf_experts.down_proj.data.copy_(e.linear2.weight.transpose(1, 2).data)


def test_block_equals_transformers_mixtral():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    moe = block(moe_norm_topk_prob=True).eval()
    hf = MixtralSparseMoeBlock(MixtralConfig(hidden_size=H, intermediate_size=24, num_local_experts=4,
                                             num_experts_per_tok=2, hidden_act="silu")).eval()
    hf.gate.weight.data.copy_(moe.router.weight.data)
    _mixtral_like(moe, hf.experts)
    x = torch.randn(2, 7, H)
    torch.testing.assert_close(moe(x), hf(x), rtol=1e-5, atol=1e-6)


def test_shared_expert_equals_transformers_qwen2_moe():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    moe = block(moe_num_shared_experts=1, moe_shared_expert_gate=True, moe_shared_expert_intermediate_size=40).eval()
    hf = Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=24, num_experts=4,
                                               num_experts_per_tok=2, norm_topk_prob=False,
                                               shared_expert_intermediate_size=40, hidden_act="silu")).eval()
    hf.gate.weight.data.copy_(moe.router.weight.data)
    _mixtral_like(moe, hf.experts)
    shared = moe.shared_expert
    for ours, theirs in ((shared.gate, "gate_proj"), (shared.linear1, "up_proj"), (shared.linear2, "down_proj")):
        getattr(hf.shared_expert, theirs).weight.data.copy_(ours.weight.data)
    hf.shared_expert_gate.weight.data.copy_(moe.shared_expert_gate.weight.data)
    x = torch.randn(2, 7, H)
    torch.testing.assert_close(moe(x), hf(x), rtol=1e-5, atol=1e-6)
    # without the gate the shared expert is added as it is
    ungated = block(moe_num_shared_experts=2).eval()
    flat = x.reshape(-1, H)
    routing = ungated.router(flat)
    routed, _ = ungated.experts(flat, routing.weights, routing.experts)
    torch.testing.assert_close(ungated(x), (routed + ungated.shared_expert(flat)).view_as(x))
    assert ungated.shared_expert.linear1.weight.shape == (48, H)  # 2 shared experts of the expert width 24


# --- auxiliary losses -----------------------------------------------------------------------------------------------

def test_losses_equal_their_formulas_and_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(20, 4)
    probs = torch.softmax(logits, -1)
    chosen = probs.topk(2, dim=-1).indices
    balance = load_balancing_loss(probs, chosen)
    by_hand = 4 * sum(float((chosen == e).any(-1).float().mean() * probs[:, e].mean()) for e in range(4))
    assert float(balance) == pytest.approx(by_hand, rel=1e-6)
    assert float(balance) == pytest.approx(float(load_balancing_loss_func((logits,), 4, 2)), rel=1e-6)
    assert float(z_loss(logits)) == pytest.approx(float((torch.logsumexp(logits, -1) ** 2).mean()), rel=1e-6)
    uniform = torch.full((8, 4), 0.25)
    assert float(load_balancing_loss(uniform, torch.tensor([[0, 1], [2, 3]] * 4))) == pytest.approx(2.0)  # k


def test_aux_losses_reach_the_backward_with_the_engine_scale():
    """loss.backward() of the LM loss alone gives the gradients of lm + scale x (aux_coeff x balance + z_coeff x z)
    summed over the MoE layers, computed here explicitly on a twin without coefficients."""
    cfg = moe_cfg(moe_aux_loss_coeff=0.3, moe_z_loss_coeff=0.2, moe_jitter_eps=None)
    torch.manual_seed(1)
    model = GPTNeoX(cfg).train()
    twin = GPTNeoX(dataclasses.replace(cfg, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=0.0)).train()
    twin.load_state_dict(model.state_dict())
    captured = []
    for _, moe in moe_blocks(twin):
        moe.router.register_forward_hook(lambda module, args, routing: captured.append(routing))
    tokens = torch.randint(0, 64, (2, 8))
    for _, moe in moe_blocks(model):
        moe.aux_loss_scale = 0.5
    model(tokens).logsumexp(-1).mean().backward()
    lm = twin(tokens).logsumexp(-1).mean()
    aux = sum(0.3 * load_balancing_loss(r.probs, r.experts) + 0.2 * z_loss(r.logits) for r in captured)
    (lm + 0.5 * aux).backward()
    assert len(captured) == 2
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_metrics_report_losses_and_expert_load():
    cfg = moe_cfg(moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01, moe_expert_interval=2, num_layers=3)
    torch.manual_seed(2)
    model = GPTNeoX(cfg).train()
    captured = []
    for _, moe in moe_blocks(model):
        moe.router.register_forward_hook(lambda module, args, routing: captured.append(routing))
    for _ in range(3):
        model(torch.randint(0, 64, (2, 8))).sum().backward()
    with torch.no_grad():
        model.eval()(torch.randint(0, 64, (2, 8)))  # evaluation forwards are not counted
    metrics = MoEMetrics(model, cfg, tp_rank=0, device=torch.device("cpu")).collect()
    assert len(captured) == 6 + 2 and sorted(metrics["moe_expert_load"]) == ["0", "2"]
    train = captured[:6]
    layer0 = torch.cat([r.experts for r in train[0::2]]).flatten()
    torch.testing.assert_close(torch.tensor(metrics["moe_expert_load"]["0"]),
                               torch.bincount(layer0, minlength=4) / layer0.numel(), atol=1e-6, rtol=0)
    balance = [float(load_balancing_loss(r.probs, r.experts).detach()) for r in train]
    zs = [float(z_loss(r.logits).detach()) for r in train]
    assert metrics["moe_aux_loss"] == pytest.approx(sum(balance) / 6, rel=1e-6)
    assert metrics["moe_z_loss"] == pytest.approx(sum(zs) / 6, rel=1e-6)
    assert metrics["moe_loss"] == pytest.approx((0.1 * sum(balance) + 0.01 * sum(zs)) / 3, rel=1e-6)
    assert metrics["moe_dropped_fraction"] == 0.0
    assert MoEMetrics(model, cfg, 0, torch.device("cpu")).collect()["moe_aux_loss"] == 0.0  # taken: reset


# --- layers, config, decoding ---------------------------------------------------------------------------------------

def test_expert_interval_counts_from_layer_zero_as_gpt_neox():
    assert moe_cfg(num_layers=5, moe_expert_interval=2).moe_layer_indices == (0, 2, 4)
    assert moe_cfg(num_layers=5, moe_layers=[1, 3]).moe_layer_indices == (1, 3)
    assert moe_cfg(num_layers=5, moe_num_experts=1).moe_layer_indices == ()
    torch.manual_seed(0)
    model = GPTNeoX(moe_cfg(num_layers=5, moe_expert_interval=2))
    assert [isinstance(b.mlp, MoE) for b in model.blocks] == [True, False, True, False, True]
    names = {n for n, _ in model.named_parameters()}
    assert "blocks.0.mlp.experts.linear2.weight" in names and "blocks.1.mlp.linear2.weight" in names


@pytest.mark.parametrize(("changes", "message"), [
    ({"moe_top_k": 5}, "moe_top_k"),
    ({"moe_capacity_factor": 0.0}, "moe_capacity_factor"),
    ({"moe_shared_expert_gate": True}, "moe_num_shared_experts"),
    ({"moe_layers": [0, 7]}, "moe_layers"),
    ({"moe_router_type": "expert_choice"}, "moe_router_type"),
    ({"moe_jitter_eps": 1.5}, "moe_jitter_eps"),
])
def test_bad_moe_keys_name_the_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        moe_cfg(**changes).validate()


@pytest.mark.parametrize(("extra", "message"), [
    ({"sequence_parallel": True, "model_parallel_size": 2, "num_gpus": 2}, "'sequence_parallel' with MoE layers"),
    ({"use_mup": True, "base_shapes_file": "shapes.bsh"}, "'use_mup' with MoE layers"),
    ({"moe_expert_parallel_size": 2, "num_gpus": 2, "moe_num_experts": 1},
     "'moe_expert_parallel_size' is 2 but the model has no MoE layers"),
    ({"moe_expert_parallel_size": 3, "num_gpus": 3}, r"'moe_expert_parallel_size' \(3\) must divide 'moe_num_experts'"),
    ({"moe_expert_parallel_size": 0}, "'moe_expert_parallel_size' must be an integer >= 1"),
])
def test_moe_combinations_refused_at_load_time_name_the_key(tmp_path, extra, message):
    from neox.config import load_config

    values = {"num_layers": 2, "hidden_size": H, "num_attention_heads": 2, "seq_length": 8,
              "max_position_embeddings": 8, "moe_num_experts": 4, "moe_top_k": 2, **extra}
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=message):
        load_config([path], vocab_size=64)


@pytest.mark.parametrize(("extra", "message"), [
    ({"num_gpus": 2, "model_parallel_size": 2}, r"must divide the data-parallel size \(1 = world size"),
    ({"num_gpus": 2, "zero_optimization": {"stage": 3}}, "'moe_expert_parallel_size' 2 with ZeRO stage 3"),
])
def test_expert_parallel_layout_is_checked_for_training_only(tmp_path, extra, message):
    """An ep-trained config still evaluates / generates on other layouts: the experts then run whole."""
    from neox.config import load_config
    from neox.config.validate import require_for_training

    values = {"num_layers": 2, "hidden_size": H, "num_attention_heads": 2, "seq_length": 8,
              "max_position_embeddings": 8, "moe_num_experts": 4, "moe_top_k": 2, "moe_expert_parallel_size": 2,
              "train_iters": 1, "train_micro_batch_size_per_gpu": 1, "data_path": "data", "save": "ckpt", **extra}
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(values))
    cfg = load_config([path], vocab_size=64)
    with pytest.raises(ConfigError, match=message):
        require_for_training(cfg)


def test_hugging_face_export_refuses_moe_layers_by_key():
    from neox.model.hf import check_exportable

    with pytest.raises(ConfigError, match="'moe_num_experts: 4' cannot be exported to llama"):
        check_exportable(moe_cfg(rotary_pct=1.0, norm="rmsnorm"), "llama")


def test_cached_decoding_equals_the_full_forward():
    torch.manual_seed(3)
    model = GPTNeoX(moe_cfg(moe_capacity_factor=0.5, moe_num_shared_experts=1)).eval()
    tokens = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(8)
        steps = [model(tokens[:, :3], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache) for i in range(3, 8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


# --- initialisation and the plan ------------------------------------------------------------------------------------

def test_expert_weights_are_drawn_per_expert_and_per_block():
    """Each expert matrix has its own tiles (no two experts alike) at the configured std, and any block of the
    stack (a tp or ep shard) is the same block of the whole value."""
    torch.manual_seed(4)
    model = GPTNeoX(moe_cfg(num_layers=2, init_method="normal", init_method_std=0.05))
    name = "blocks.0.mlp.experts.linear1.weight"
    weight = dict(model.named_parameters())[name].detach()
    assert not torch.equal(weight[0], weight[1])
    assert float(weight.std()) == pytest.approx(0.05, rel=0.1)
    block_value = model.init_plan.value(name, (slice(1, 3), slice(12, 24), slice(None)))
    assert torch.equal(block_value, weight[1:3, 12:24])
    down = dict(model.named_parameters())["blocks.0.mlp.experts.linear2.weight"].detach()
    assert float(down.std()) == pytest.approx(0.05 / math.sqrt(2 * 2), rel=0.1)  # scaled_normal, as linear2


VARIANTS = {
    "mixtral-like": dict(moe_norm_topk_prob=True),
    "qwen-shared-gated": dict(moe_num_shared_experts=1, moe_shared_expert_gate=True,
                              moe_shared_expert_intermediate_size=32, use_bias_in_mlp=True),
    "gpt-neox-dmoe-interval": dict(activation="gelu", moe_router_type="sinkhorn", moe_top_k=1, num_layers=3,
                                   moe_expert_interval=2, moe_intermediate_size=None),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_plan_counts_equal_the_built_model(variant):
    cfg = moe_cfg(**VARIANTS[variant])
    torch.manual_seed(0)
    model = GPTNeoX(cfg)
    named = dict(model.named_parameters())
    experts = sum(p.numel() for n, p in named.items() if ".mlp.experts." in n)
    plan = model_params(cfg, tp=1, pp=1, partition_method="parameters")
    assert plan.total == sum(p.numel() for p in named.values())
    assert plan.experts == experts
    assert plan.active == plan.total - experts * (cfg.moe_num_experts - cfg.moe_top_k) // cfg.moe_num_experts
    assert inactive_params(cfg) == plan.total - plan.active
    tp2 = model_params(cfg, tp=2, pp=1, partition_method="parameters")
    shard = shard_state_dict({n: p.detach() for n, p in named.items()}, 0, 2)
    assert tp2.stages[0].params == sum(t.numel() for t in shard.values())
    assert tp2.experts_per_tp_rank == sum(t.numel() for n, t in shard.items() if ".mlp.experts." in n)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_moe_activation_count_matches_autograd(variant):
    cfg = moe_cfg(**{**VARIANTS[variant], "hidden_size": 64, "num_attention_heads": 8, "seq_length": 32,
                     "moe_intermediate_size": 96, "moe_expert_interval": 1})
    assert layer_activation_elements(cfg, tp=1, moe=True) == pytest.approx(saved_elements_per_token(cfg), rel=0.10)


def test_expert_major_order_regroups_arrived_rows_by_local_expert():
    from neox.parallel.expert_parallel import _expert_major_order

    # rows per (source rank, local expert): source 0 sent 2 rows for expert 0 and 1 for expert 1, source 1 sent 0 and
    # 3. They arrived source-major: [s0e0, s0e0, s0e1, s1e1, s1e1, s1e1]; expert-major reads s0e0 x2, then s0e1, s1e1.
    received = torch.tensor([[2, 1], [0, 3]])
    assert _expert_major_order(received).tolist() == [0, 1, 2, 3, 4, 5]
    received = torch.tensor([[1, 2], [3, 1]])  # arrived: s0e0 | s0e1 s0e1 | s1e0 x3 | s1e1
    assert _expert_major_order(received).tolist() == [0, 3, 4, 5, 1, 2, 6]
    assert _expert_major_order(torch.zeros(2, 2, dtype=torch.long)).tolist() == []
